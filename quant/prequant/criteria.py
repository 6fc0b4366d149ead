"""Column scores: which input columns of a weight stay FP (higher score = kept), and the layer
input statistics the activation criterion and GPTQ read."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
