"""The verbs over a whole model: plan the FP columns within a budget, `prequantize` in place,
choose what trains.

Budget: `allocate` turns a global number of trainable parameters into r columns per matrix
(r * out_features parameters each), equal r everywhere plus one extra column for the
matrices whose next column stands out most from their mean score, so the total misses the
target by less than one matrix's out_features.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..convert import HEADS, find_targets
from .config import OutlierConfig
from .criteria import column_scores
from .layer import OutlierLinear


@dataclass
class OutlierReport:
    modules: dict[str, int]          # converted Linear -> number of FP outlier columns
    outlier_params: int
    body_params: int                 # the model's parameters without the head
    target_params: int               # budget * body_params - reserved

    @property
    def pct(self) -> float:
        """Outlier parameters as % of the body's parameters."""
        return 100.0 * self.outlier_params / max(self.body_params, 1)


def allocate(costs: dict[str, int], caps: dict[str, int], target: int,
             priority: dict[str, float] | None = None) -> dict[str, int]:
    """Units per item (columns, LoRA ranks) with sum(units * cost) <= target and as close as
    the costs allow: the same count everywhere, then +1 by descending priority."""
    capacity = sum(costs[n] * caps[n] for n in costs)
    if not 0 <= target <= capacity:
        raise ValueError(f"target={target} parameters is outside what the layers hold (0..{capacity})")
    base = target // max(sum(costs.values()), 1)
    units = {n: min(base, caps[n]) for n in costs}
    left = target - sum(units[n] * costs[n] for n in costs)
    order = sorted(costs, key=lambda n: -(priority or {}).get(n, 0.0))
    grew = True
    while grew:  # usually one pass; more only when small matrices hit their cap
        grew = False
        for n in order:
            if costs[n] <= left and units[n] < caps[n]:
                units[n], left, grew = units[n] + 1, left - costs[n], True
    return units


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The top-level children that make the task head. A model whose `base_model_prefix` (Hugging
    Face's) names one of its children: every other child with parameters (classifier, score,
    lm_head, DistilBERT's pre_classifier, DeBERTa's pooler); any other model: quant.HEADS."""
    children = dict(model.named_children())
    base = getattr(model, "base_model_prefix", None)
    if not base or base not in children:
        return HEADS
    return tuple(n for n, c in children.items() if n != base and next(c.parameters(), None) is not None)


def is_head(name: str, model: nn.Module) -> bool:
    """Whether a parameter or module name of `model` belongs to its task head (head_names)."""
    return name.split(".")[0] in head_names(model)


def body_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not is_head(n, model))


def linear_weight(module: nn.Module) -> Tensor:
    """[out, in] weight of nn.Linear or HF Conv1D (stored [in, out])."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def targets(model: nn.Module, config: OutlierConfig) -> list[str]:
    """The Linears (and HF Conv1Ds) prequantize converts: all but the head (head_names) and `skip`."""
    skip = [*config.skip, *(p for h in head_names(model) for p in (h, f"{h}.*"))]
    names, _ = find_targets(model, QuantConfig(weight=QuantConfig.parse(config.quant).weight), skip)
    return names


def plan_outliers(model: nn.Module, config: OutlierConfig, act: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Column indices kept FP per target Linear, within the budget (none without a criterion)."""
    names = targets(model, config)
    none = {n: torch.zeros(0, dtype=torch.long) for n in names}
    if config.criterion is None or not names:
        return none
    gen = torch.Generator().manual_seed(config.seed)
    scores = {n: column_scores(config.criterion, linear_weight(model.get_submodule(n)),
                               (act or {}).get(n), gen) for n in names}
    shapes = {n: tuple(linear_weight(model.get_submodule(n)).shape) for n in names}
    target = int(config.budget * body_params(model)) - config.reserved
    if target <= 0:
        raise ValueError(f"budget {100 * config.budget:g}% leaves no room for outlier columns "
                         f"after {config.reserved} other trainable parameters")
    capacity = sum(o * i for o, i in shapes.values())
    if target > capacity:
        raise ValueError(f"budget {100 * config.budget:g}% = {target} parameters exceeds the {capacity} "
                         "weights of the quantized layers; lower it")
    ranked = {n: s.sort(descending=True) for n, s in scores.items()}
    base = target // sum(shapes[n][0] for n in names)
    # Who gets one more column: the matrix whose next column stands out most from its mean.
    prio = {n: float(v.values[min(base, len(v.values) - 1)] / v.values.mean().clamp_min(1e-12))
            for n, v in ranked.items()}
    r = allocate({n: shapes[n][0] for n in names}, {n: shapes[n][1] for n in names}, target, prio)
    return none | {n: ranked[n].indices[:r[n]].cpu() for n in names}


def prequantize(model: nn.Module, config: OutlierConfig, act: dict[str, Tensor] | None = None,
                hessians: dict[str, Tensor] | None = None) -> OutlierReport:
    """Select outlier columns and replace every target Linear by an OutlierLinear, in place.
    act: per Linear its input's max |x_j| (criterion=activation); hessians: its input X^T X
    (input_stats): GPTQ rounding instead of nearest."""
    qcfg = QuantConfig.parse(config.quant)
    if qcfg.weight is None:
        raise ValueError(f"{qcfg}: PreQuant needs quantized weights (e.g. w4)")
    total = body_params(model)
    plan = plan_outliers(model, config, act)
    for name, idx in plan.items():
        old = model.get_submodule(name)
        h = None if hessians is None else hessians[name]
        replace_module(model, name, OutlierLinear.from_linear(linear_weight(old), old.bias, qcfg, idx, h))
    outliers = sum(m.outlier.numel() for _, m in outlier_modules(model))
    target = int(config.budget * total) - config.reserved if config.criterion else 0
    return OutlierReport({n: len(i) for n, i in plan.items()}, outliers, total, target)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def outlier_modules(model: nn.Module) -> Iterable[tuple[str, OutlierLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, OutlierLinear):
            yield name, m


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's LayerNorm/RMSNorm/GroupNorm or a model's own (LlamaRMSNorm, T5LayerNorm)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def trainable_selection(model: nn.Module, outliers: bool = True, biases: bool = False, norms: bool = False,
                        head: bool = True,
                        extra: Callable[[str], bool] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters of the chosen groups: FP outlier columns, biases, normalisation layers
    (is_norm), the task head (head_names) and names where `extra` is true (e.g. LoRA adapters)."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}

    def body_group(n: str, p: nn.Parameter) -> bool:  # the head is chosen by `head` alone
        return ((outliers and n.endswith(".outlier")) or (biases and n.endswith(".bias"))
                or (norms and id(p) in norm_params) or bool(extra and extra(n)))

    return [(n, p) for n, p in model.named_parameters()
            if p.numel() and (head if is_head(n, model) else body_group(n, p))]


def mark_trainable(model: nn.Module, **groups) -> list[str]:
    """Freeze everything but trainable_selection(model, **groups); returns the trainable names."""
    chosen = {id(p) for _, p in trainable_selection(model, **groups)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
