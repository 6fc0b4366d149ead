"""PreQuant numerics: outlier-column selection and a frozen low-bit Linear with FP outlier columns.

PreQuant (Gong et al., Findings of ACL 2023) quantizes a *pre-trained* model once and then
fine-tunes only a tiny set of weights kept in higher precision. Here that set is r whole
input columns per Linear weight, chosen by a scoring criterion:

    y = Qa(x with x[..., idx] = 0) @ Wq^T + x[..., idx] @ O^T + b

Wq is the low-bit weight (frozen; its columns idx are zero and, for per-row and per-tensor
grids, left out when the grid is fitted), O = W[:, idx] the FP outlier columns [out, r]
(trainable), Qa the input quantizer of aN configs: the outlier features bypass it in FP
(LLM.int8()-style), so its range comes from the other features.

Column scores (`CRITERIA`; add your own with `register_criterion`), higher = kept in FP:
  weight      max_i |W[i, j]| / std(W): columns holding the matrix's extreme values
  activation  max |x_j| of the layer's input on unlabelled calibration text; for
              query/key/value/intermediate that input is a LayerNorm output, so these are
              the known LayerNorm outlier dimensions of BERT-like models
  random      uniform random scores (ablation)

Budget: `allocate` turns a global number of trainable parameters into r per matrix
(r * out_features parameters each), equal r everywhere plus one extra column for the
matrices whose next column stands out most from their mean score, so the total misses the
target by less than one matrix's out_features.

    report = prequantize(model, OutlierConfig("w4", criterion="weight", budget=0.005))
    mark_trainable(model, outliers=True)            # + the task head; everything else frozen
    save_outlier_model(model, "out/", meta={})      # packed codes + FP outlier columns
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import QuantConfig
from .convert import HEADS, find_targets
from .export import to_unsigned, unpack_codes
from .gptq import gptq_round
from .modules import Quantizer
from .pack import is_legacy_format, pack

WEIGHTS_FILE = "prequant.safetensors"  # not model.safetensors: HF from_pretrained must not half-load it
MANIFEST_FILE = "prequant.json"
FORMAT = "plmq-prequant-v2"  # v2: dense 3/5/6/7-bit packing
LEGACY_FORMAT = "plmq-prequant-v1"  # still read

# ---------------------------------------------------------------- quantizers

# The weight quantizers PreQuant compares, as overrides of the QuantConfig's weight spec;
# "config" keeps the spec the QuantConfig string gives (e.g. w4g128).
WEIGHT_QUANTIZERS: dict[str, dict] = {
    "row": {"granularity": "channel", "axis": 0, "init": "minmax"},      # per-row (per output channel) min-max
    "row-mse": {"granularity": "channel", "axis": 0, "init": "mse"},     # per-row MSE clipping
    # per group of 128 input weights in a row, MSE clipping (+16 bits of scale per 128 weights)
    "group-mse": {"granularity": "group", "group_size": 128, "init": "mse"},
    # the same with a zero point per group: all 2^b levels (W3: 8 instead of 7), ~23% less weight error
    # on MiniLM at W3 and W4 (+16 bits of zero point per 128 weights)
    "group-mse-asym": {"granularity": "group", "group_size": 128, "init": "mse", "symmetric": False},
    "minmax": {"granularity": "tensor", "init": "minmax"},               # per-tensor min-max
    "mse": {"granularity": "tensor", "init": "mse"},                     # per-tensor MSE clipping
    "config": {},
}


def with_quantizer(quant: QuantConfig | str, quantizer: str) -> QuantConfig:
    """`quant` with its weight spec set to one of WEIGHT_QUANTIZERS."""
    if quantizer not in WEIGHT_QUANTIZERS:
        raise ValueError(f"quantizer={quantizer!r} is not one of {sorted(WEIGHT_QUANTIZERS)}")
    cfg = QuantConfig.parse(quant)
    if cfg.weight is None:
        raise ValueError(f"{cfg}: PreQuant needs quantized weights (e.g. w4)")
    d = cfg.to_dict()
    d["weight"].update(WEIGHT_QUANTIZERS[quantizer])
    return QuantConfig.from_dict(d)

# ---------------------------------------------------------------- criteria


@dataclass(frozen=True)
class Criterion:
    """fn(weight [out, in], act_absmax [in] | None, generator) -> score per input column."""
    fn: Callable[[Tensor, Tensor | None, torch.Generator], Tensor]
    needs_activations: bool = False
    doc: str = ""


def _weight_scores(w: Tensor, act: Tensor | None, gen: torch.Generator) -> Tensor:
    return w.abs().amax(0) / w.std().clamp_min(1e-12)


def _activation_scores(w: Tensor, act: Tensor | None, gen: torch.Generator) -> Tensor:
    if act is None:
        raise ValueError("criterion 'activation' needs activation statistics (activation_absmax)")
    return act.to(w.device, torch.float32)


def _random_scores(w: Tensor, act: Tensor | None, gen: torch.Generator) -> Tensor:
    return torch.rand(w.shape[1], generator=gen)


CRITERIA: dict[str, Criterion] = {
    "weight": Criterion(_weight_scores, doc="largest |w| of the column / std of the matrix"),
    "activation": Criterion(_activation_scores, needs_activations=True,
                            doc="largest |x_j| of the layer input on calibration text"),
    "random": Criterion(_random_scores, doc="random columns (ablation)"),
}


def register_criterion(name: str, fn: Callable, needs_activations: bool = False, doc: str = "") -> None:
    """Add a column-scoring function usable as OutlierConfig(criterion=name)."""
    CRITERIA[name] = Criterion(fn, needs_activations, doc)


def column_scores(criterion: str, weight: Tensor, act: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """One score per input column of `weight` [out, in]."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {sorted(CRITERIA)}")
    scores = CRITERIA[criterion].fn(weight.detach().float(), act, generator or torch.Generator().manual_seed(0))
    if scores.shape != (weight.shape[1],):
        raise ValueError(f"criterion {criterion!r} returned shape {tuple(scores.shape)}, expected ({weight.shape[1]},)")
    return scores


@torch.no_grad()
def input_stats(model: nn.Module, names: list[str], batches: Iterable[dict],
                hessian: bool = False) -> dict[str, dict[str, Tensor]]:
    """Per named layer, over all tokens of its input: "absmax", max |x_j| (the activation
    criterion), "sumsq" (sum of x_j^2) and "count" (tokens), and with hessian=True "hessian",
    X^T X (GPTQ). Pass unpadded batches."""
    stats: dict[str, dict[str, Tensor]] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats.setdefault(name, {"absmax": torch.zeros(x.shape[1]), "sumsq": torch.zeros(x.shape[1]),
                                        "count": 0})
            s["absmax"] = torch.maximum(s["absmax"], x.abs().amax(0).cpu())
            s["sumsq"] += x.square().sum(0).cpu()
            s["count"] += x.shape[0]
            if hessian:
                s["hessian"] = s.get("hessian", 0) + (x.T @ x).cpu()
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def activation_absmax(model: nn.Module, names: list[str], batches: Iterable[dict]) -> dict[str, Tensor]:
    """max |x_j| over all tokens of each named layer's input (pass unpadded batches)."""
    return {n: s["absmax"] for n, s in input_stats(model, names, batches).items()}

# ---------------------------------------------------------------- budget


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

# ---------------------------------------------------------------- the layer


def _keeps_row_grid(q: Quantizer) -> bool:
    """Whether the grid is per row or per tensor, so dropping columns leaves its shape alone."""
    s = q.spec
    return s.granularity == "tensor" or (s.granularity == "channel" and s.axis % 2 == 0)


class OutlierLinear(nn.Linear):
    """Linear with a frozen low-bit weight and trainable FP outlier columns.

    `weight` (frozen Parameter) holds the dequantized low-bit values with the outlier
    columns set to 0; `outlier` [out, r] the FP columns at `outlier_idx`. Subclassing
    nn.Linear lets peft put LoRA adapters on it (QLoRA-style baselines).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: QuantConfig | str = "w4", num_outliers: int = 0):
        nn.Module.__init__(self)  # skip nn.Linear's random FP weight
        config = QuantConfig.parse(config)
        if config.weight is None:
            raise ValueError(f"{config}: OutlierLinear needs quantized weights (e.g. w4)")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.outlier = nn.Parameter(torch.zeros(out_features, num_outliers))
        self.register_buffer("outlier_idx", torch.zeros(num_outliers, dtype=torch.long))
        # Per FP column, the factor its optimizer steps are scaled by (scale_outlier_steps); not saved.
        self.register_buffer("outlier_lr", torch.ones(num_outliers), persistent=False)
        self.weight_q = Quantizer(config.weight, "weight", "weight", dynamic=False)
        self.act_q = Quantizer(config.act, "act", "act") if config.act else None
        if self.act_q is not None:
            self.act_q.reserve((1, in_features))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, weight: Tensor, bias: Tensor | None, config: QuantConfig | str,
                    idx: Tensor, hessian: Tensor | None = None) -> "OutlierLinear":
        """Quantize `weight` [out, in] except the columns `idx`, which stay FP. hessian: the
        layer's input X^T X: GPTQ rounding (the FP columns take the rounding error) instead of
        round-to-nearest."""
        out_f, in_f = weight.shape
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        m = cls(in_f, out_f, bias is not None, config, len(idx)).to(weight.device)
        w = weight.detach().float()
        rest = w.clone()
        rest[:, idx] = 0.0
        keep = torch.ones(in_f, dtype=torch.bool, device=w.device)
        keep[idx] = False
        # The grid comes from the non-outlier columns only: that is what keeping outliers buys.
        m.weight_q.init_from(w[:, keep] if _keeps_row_grid(m.weight_q) and keep.any() else rest)
        if hessian is not None:  # same grid, GPTQ's rounding; the FP columns absorb its error
            w = gptq_round(w, hessian, m.weight_q, keep_fp=idx)
            rest = w.clone()
            rest[:, idx] = 0.0
        m.outlier_idx.copy_(idx)  # before _set_codes, which zeroes these columns
        m.outlier.copy_(w[:, idx])
        codes, params = m.weight_q.codes(rest)
        m._set_codes(codes, params)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @torch.no_grad()
    def _set_codes(self, codes: Tensor, params: dict[str, Tensor]) -> None:
        w = self.weight_q.decode(codes, params)
        w[:, self.outlier_idx] = 0.0  # binary codes have no 0: the FP columns replace them
        self.weight.copy_(w)

    @property
    def num_outliers(self) -> int:
        return self.outlier.shape[1]

    def effective_weight(self) -> Tensor:
        """The [out, in] weight the layer computes with (low-bit + FP columns)."""
        return self.weight.index_copy(1, self.outlier_idx, self.outlier)

    def forward(self, x: Tensor) -> Tensor:
        x_out = x.index_select(-1, self.outlier_idx) if self.num_outliers else None
        if self.act_q is not None:
            # LLM.int8()-style split: the outlier features reach only their FP columns, so they
            # skip the low-bit input (zeroed, their weight columns are 0); left in, the largest of
            # them would set the input grid of every other feature.
            x = self.act_q(x.index_fill(-1, self.outlier_idx, 0.0) if self.num_outliers else x)
        y = F.linear(x, self.weight, self.bias)
        if x_out is not None:  # a small FP matmul on the FP outlier features only
            y = y + F.linear(x_out, self.outlier)
        return y

    @torch.no_grad()
    def packed_state(self) -> dict[str, Tensor]:
        """weight.packed (+ step/zero_point/threshold); fails if the frozen weight left its grid."""
        spec = self.weight_q.spec
        codes, params = self.weight_q.codes(self.weight)
        again = self.weight_q.decode(codes, params)
        again[:, self.outlier_idx] = 0.0
        if not torch.equal(again, self.weight):
            raise ValueError("the frozen low-bit weight was modified: it is no longer on its quantization grid")
        out = {"weight.packed": pack(to_unsigned(codes, spec), spec.bits)}
        return out | {f"weight.{k}": v.cpu() for k, v in params.items()}

    @torch.no_grad()
    def load_packed(self, tensors: dict[str, Tensor], legacy: bool = False) -> None:
        """Inverse of packed_state (outlier_idx must already be loaded); legacy: a v1 file."""
        spec = self.weight_q.spec
        dev = self.weight.device
        params = {k: tensors[f"weight.{k}"].to(dev) for k in ("step", "zero_point", "threshold")
                  if f"weight.{k}" in tensors}
        self.weight_q.set_params(params["step"], params.get("zero_point"), params.get("threshold"))
        codes = unpack_codes(tensors["weight.packed"], spec, self.weight.shape, legacy).to(dev)
        self._set_codes(codes, params)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config}, outliers={self.num_outliers}"

# ---------------------------------------------------------------- whole models


@dataclass
class OutlierConfig:
    """How `prequantize` converts a model.

    criterion None: no outlier columns at all (the plain low-bit base of the LoRA/BitFit
    baselines). budget: fraction of the model's parameters that may be trained;
    reserved: parameters trained besides the outlier columns (biases/LayerNorm), taken
    out of the budget. Heads (quant.HEADS) stay FP and are not counted.
    """
    quant: QuantConfig | str = "w4"
    criterion: str | None = "weight"
    budget: float = 0.005
    reserved: int = 0
    seed: int = 0
    skip: list[str] = field(default_factory=list)  # fnmatch patterns of Linears kept FP
    # FP columns only in the Linears of the last `column_blocks` transformer blocks (the whole budget
    # goes there: more columns each, and backward need not reach the blocks below); None: every block.
    column_blocks: int | None = None


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


def is_head(name: str) -> bool:
    return name.split(".")[0] in HEADS


def body_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not is_head(n))


def linear_weight(module: nn.Module) -> Tensor:
    """[out, in] weight of nn.Linear or HF Conv1D (stored [in, out])."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def targets(model: nn.Module, config: OutlierConfig) -> list[str]:
    """The Linears (and HF Conv1Ds) prequantize converts: all but heads and `skip`."""
    names, _ = find_targets(model, QuantConfig(weight=QuantConfig.parse(config.quant).weight), config.skip)
    return names


def block_index(name: str) -> int | None:
    """The transformer block a module name sits in ("encoder.layer.3.output.dense" -> 3), if any."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def top_block_targets(names: list[str], column_blocks: int | None) -> list[str]:
    """The names in the last `column_blocks` blocks (names outside any block count as on top)."""
    if column_blocks is None:
        return names
    blocks = sorted({b for b in map(block_index, names) if b is not None})
    if not 1 <= column_blocks <= len(blocks):
        raise ValueError(f"column_blocks={column_blocks}: the model's quantized Linears sit in {len(blocks)} blocks; "
                         f"use 1..{len(blocks)} or None for all")
    keep = set(blocks[-column_blocks:])
    return [n for n in names if block_index(n) is None or block_index(n) in keep]


def column_targets(names: list[str], config: OutlierConfig) -> list[str]:
    """Of the target Linears `names`, those that get FP columns (none without a criterion); raises on a
    bad column_blocks."""
    if config.criterion is None:
        return []
    return top_block_targets(names, config.column_blocks)


def plan_outliers(model: nn.Module, config: OutlierConfig, act: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Column indices kept FP per target Linear, within the budget."""
    all_names = targets(model, config)
    none = {n: torch.zeros(0, dtype=torch.long) for n in all_names}
    names = column_targets(all_names, config)
    if not names:
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
    hessians: per Linear its input X^T X (input_stats): GPTQ rounding instead of nearest."""
    qcfg = QuantConfig.parse(config.quant)
    if qcfg.weight is None:
        raise ValueError(f"{qcfg}: PreQuant needs quantized weights (e.g. w4)")
    total = body_params(model)
    plan = plan_outliers(model, config, act)
    for name, idx in plan.items():
        old = model.get_submodule(name)
        h = None if hessians is None else hessians[name]
        _replace(model, name, OutlierLinear.from_linear(linear_weight(old), old.bias, qcfg, idx, h))
    outliers = sum(m.outlier.numel() for _, m in outlier_modules(model))
    target = int(config.budget * total) - config.reserved if config.criterion else 0
    return OutlierReport({n: len(i) for n, i in plan.items()}, outliers, total, target)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def outlier_modules(model: nn.Module) -> Iterable[tuple[str, OutlierLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, OutlierLinear):
            yield name, m


def trainable_selection(model: nn.Module, outliers: bool = True, biases: bool = False, norms: bool = False,
                        head: bool = True,
                        extra: Callable[[str], bool] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters of the chosen groups: FP outlier columns, biases, LayerNorm, the task head
    (quant.HEADS) and names where `extra` is true (e.g. LoRA adapters)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}

    def body_group(n: str, p: nn.Parameter) -> bool:  # the head is chosen by `head` alone
        return ((outliers and n.endswith(".outlier")) or (biases and n.endswith(".bias"))
                or (norms and id(p) in norm_params) or bool(extra and extra(n)))

    return [(n, p) for n, p in model.named_parameters()
            if p.numel() and (head if is_head(n) else body_group(n, p))]


def mark_trainable(model: nn.Module, **groups) -> list[str]:
    """Freeze everything but trainable_selection(model, **groups); returns the trainable names."""
    chosen = {id(p) for _, p in trainable_selection(model, **groups)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def set_outlier_lr(model: nn.Module, batches: Iterable[dict]) -> dict[str, Tensor]:
    """Each FP column's step factor: min(1, median input RMS of its layer / the column's input RMS).

    A step of size lr on column j moves the layer's output by about lr * |x_j|; the columns the
    activation criterion keeps see inputs several times the median (MiniLM: 4x, up to 11x), so
    plain Adam moves them that much faster than the rest of the model. Returns the factors."""
    mods = dict(outlier_modules(model))
    stats = input_stats(model, list(mods), batches)
    for name, m in mods.items():
        rms = (stats[name]["sumsq"] / max(stats[name]["count"], 1)).sqrt()
        factor = (rms.median() / rms[m.outlier_idx.cpu()].clamp(min=1e-12)).clamp(max=1.0)
        m.outlier_lr.copy_(factor)
    return {name: m.outlier_lr.cpu() for name, m in mods.items()}


def scale_outlier_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Scale every optimizer step of the FP outlier columns by their `outlier_lr`, column by column.
    Adam's step ignores the gradient's scale, so this works on the step itself (a hook around
    optimizer.step). Returns how many layers are scaled."""
    pairs = [(m.outlier, m.outlier_lr) for _, m in outlier_modules(model)
             if m.num_outliers and m.outlier.requires_grad and bool((m.outlier_lr != 1).any())]
    before: list[Tensor] = []

    def save(*_):
        before[:] = [p.detach().clone() for p, _ in pairs]

    @torch.no_grad()
    def scale(*_):
        for (p, factor), old in zip(pairs, before):
            p.copy_(torch.lerp(old, p, factor))  # old + factor * step

    if pairs:
        optimizer.register_step_pre_hook(save)
        optimizer.register_step_post_hook(scale)
    return len(pairs)

# ---------------------------------------------------------------- export


def _canonical(key: str) -> str:
    """peft's LoRA wrapper moves a layer to `<name>.base_layer`: store it under `<name>`."""
    return key.replace(".base_layer.", ".").removesuffix(".base_layer")


def save_outlier_model(model: nn.Module, directory: str | os.PathLike, meta: dict | None = None,
                       drop: Callable[[str], bool] | None = None) -> int:
    """prequant.safetensors (packed low-bit weights, FP outlier columns and their indices, every
    other tensor as is, minus keys where `drop` is true) + prequant.json; returns the bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules, skip = {}, {}, set()
    for name, m in outlier_modules(model):
        c = _canonical(name)
        tensors.update({f"{c}.{k}": v for k, v in m.packed_state().items()})
        modules[c] = {"shape": [m.out_features, m.in_features], "outliers": m.num_outliers,
                      "bias": m.bias is not None, "bits": m.weight_q.spec.bits, "config": str(m.config)}
        skip.add(f"{name}.weight")
    for k, v in model.state_dict().items():
        if k in skip or ".weight_q." in k or (drop and drop(_canonical(k))):
            continue
        tensors[_canonical(k)] = v.detach().cpu().clone()  # clone: safetensors refuses tied (shared) tensors
    if not modules:
        raise ValueError("model has no OutlierLinear layers (run prequantize first)")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    size = os.path.getsize(directory / WEIGHTS_FILE)
    manifest = {"format": FORMAT, **(meta or {}), "modules": modules, "bytes": size}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return size


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no pre-quantized model ({MANIFEST_FILE} missing)")
    manifest = json.loads(path.read_text())
    manifest["legacy"] = is_legacy_format(manifest.get("format"), FORMAT, LEGACY_FORMAT, directory)
    return manifest


def to_skeleton(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Replace the Linears listed in the manifest by empty OutlierLinears; returns the manifest."""
    manifest = read_manifest(directory)
    for name, info in manifest["modules"].items():
        out_f, in_f = info["shape"]
        _replace(model, name, OutlierLinear(in_f, out_f, info["bias"], info["config"], info["outliers"]))
    return manifest


def load_weights(model: nn.Module, directory: str | os.PathLike,
                 allow_missing: Callable[[str], bool] | None = None) -> nn.Module:
    """Load save_outlier_model's tensors into a skeleton (to_skeleton, then any peft wrapping).
    allow_missing(name): model tensors the file may lack (a fresh task head, new adapters)."""
    manifest = read_manifest(directory)
    modules, legacy = manifest["modules"], manifest["legacy"]
    packed: dict[str, dict[str, Tensor]] = {c: {} for c in modules}
    rest = {}
    for key, value in load_file(str(Path(directory) / WEIGHTS_FILE)).items():
        owner, sep, sub = key.partition(".weight.")
        if sep and owner in modules:
            packed[owner][f"weight.{sub}"] = value
        else:
            rest[key] = value
    actual = {_canonical(k): k for k in model.state_dict()}
    missing, unexpected = model.load_state_dict({actual.get(k, k): v for k, v in rest.items()}, strict=False)
    for name, m in outlier_modules(model):  # after outlier_idx is loaded
        m.load_packed(packed[_canonical(name)], legacy)
    frozen = {f"{c}.weight" for c in modules}
    missing = [k for k in missing if _canonical(k) not in frozen and ".weight_q." not in k
               and not (allow_missing and allow_missing(_canonical(k)))]
    if missing or unexpected:
        raise ValueError(f"{directory} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model
