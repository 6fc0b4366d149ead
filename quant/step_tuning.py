"""End-to-end step-size tuning: a quantized model whose only trainable parameters are its quantizers' steps.

After block-wise reconstruction (MREM), the weights are kept as their integer codes and every static uniform
step, of weights and of inputs, is trained on the whole model's loss (EfficientQAT's E2E-QP). Because the codes
cannot move, the result exports exactly like the model it started from, only with new steps.

    steps = tune_steps(model, lambda: model(**batch))   # one forward groups the Linears that read one tensor
    ... train `steps` ...
    release_codes(model)                                # the weights become codes x the trained steps
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .convert import quant_modules, quantizers, tie_input_quantizers
from .layers import QuantLinear
from .modules import STEP_EPS, Quantizer


def _tunable(q: Quantizer | None) -> bool:
    """A static step: a uniform grid's, or the scale of held codes (ternary, binary)."""
    held = q is not None and q._buffers.get("fixed_codes") is not None
    return q is not None and not q.dynamic and q.step is not None and (held or q.spec.scheme == "uniform")


def tune_steps(model: nn.Module, forward: Callable[[], object]) -> list[nn.Parameter]:
    """Freeze every parameter of `model`, hold each quantized Linear's weight as integer codes and make the
    static uniform steps (weights, inputs, outputs) trainable; returns those steps, each once. `forward` runs
    the model on one batch, so that Linears reading one tensor (q, k, v) share one input quantizer and so one
    step. A weight grid still recomputed from the weights is fixed first; ternary and binary weights train their
    scale. Embedding tables and dynamic activation quantizers (per token) stay as they are."""
    tie_input_quantizers(model, forward)
    for p in model.parameters():
        p.requires_grad_(False)
    steps: dict[int, nn.Parameter] = {}
    for _, m in quant_modules(model):
        if not isinstance(m, QuantLinear):
            continue
        w = m.linear_weight()
        if m.weight_q is not None:
            if m.weight_q.dynamic:
                m.weight_q.freeze(w)  # a grid recomputed from the weights: fixed where it is now
            m.weight_q.fix_codes(w)
        for q in (m.weight_q, m.act_q, m.out_q):
            if _tunable(q) and id(q) not in steps:
                steps[id(q)] = q.learn_step()
    return list(steps.values())


def release_codes(model: nn.Module) -> int:
    """Write each held weight back as codes x its trained step (what the packed export re-encodes to the same
    codes) and drop the codes; returns the number of weights written. Every trained step is stored as the
    forward used it (at least STEP_EPS), so a loader that does not clamp reads the same model."""
    for _, q in quantizers(model):
        if isinstance(q.step, nn.Parameter) and q.step.requires_grad:
            with torch.no_grad():
                q.step.clamp_(min=STEP_EPS)
    count = 0
    for _, m in quant_modules(model):
        q = m.weight_q
        if q is None or q._buffers.get("fixed_codes") is None:
            continue
        w = q.release_codes()
        with torch.no_grad():
            m.weight.copy_(w.t() if getattr(m, "transposed", False) else w)
        count += 1
    return count
