"""GPTQ rounding (Frantar et al., ICLR 2023) onto a fixed low-bit grid.

Round-to-nearest rounds every weight on its own. GPTQ rounds one input column at a time and
moves that column's rounding error onto the columns not rounded yet, weighted by the inverse
of the layer's input Hessian H = X^T X (X: the layer's inputs on unlabelled calibration text),
so the layer's *output* error on such inputs shrinks, not the weight error:

    for each column i:  q_i = Q(w_i);  w_j -= (w_i - q_i) * Hinv[i, j] / Hinv[i, i]   (j > i)

Columns listed in `keep_fp` are never rounded: they come last and absorb the error of all the
others (PreQuant's FP outlier columns, SpQR-style). The grid (step, zero point) is the
quantizer's, fitted beforehand; only the rounding changes, so the codes pack as before.

    H = prequant.input_stats(model, names, batches, hessian=True)[name]["hessian"]
    w_q = gptq_round(w, H, quantizer, keep_fp=idx)     # on the grid except columns idx
"""
from __future__ import annotations

import torch
from torch import Tensor

from .modules import Quantizer
from .uniform import fake_quant


def _grid(q: Quantizer, shape: torch.Size) -> tuple[Tensor, Tensor | None]:
    """The quantizer's static step (and zero point) expanded to one per weight [out, in]."""
    p = q._static(None)

    def full(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if q.spec.granularity == "group":  # [out, in / g, 1] -> [out, in]
            return t.reshape(shape[0], -1, 1).expand(shape[0], shape[1] // q.spec.group_size,
                                                     q.spec.group_size).reshape(shape)
        return t.expand(shape) if t.dim() == len(shape) else t.reshape(-1, 1).expand(shape)

    return full(p["step"]), full(p["zero_point"])


@torch.no_grad()
def gptq_round(weight: Tensor, hessian: Tensor, quantizer: Quantizer, keep_fp: Tensor | None = None,
               damp: float = 0.01, block: int = 128) -> Tensor:
    """`weight` [out, in] rounded onto `quantizer`'s fitted grid by GPTQ; columns `keep_fp` stay FP
    and take the others' error. damp: added to H's diagonal, as a fraction of its mean."""
    spec = quantizer.spec
    if spec.scheme != "uniform" or quantizer.dynamic:
        raise ValueError(f"GPTQ rounds onto a fixed uniform grid; {quantizer.name} is {spec.scheme}"
                         f"{' (dynamic)' if quantizer.dynamic else ''}")
    w = weight.detach().float().clone()
    n = w.shape[1]
    if hessian.shape != (n, n):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match {n} input columns")
    step, zp = _grid(quantizer, w.shape)
    fp = torch.zeros(n, dtype=torch.bool, device=w.device)
    if keep_fp is not None:
        fp[torch.as_tensor(keep_fp, dtype=torch.long, device=w.device)] = True
    h = hessian.to(w.device, torch.float32).clone()
    dead = h.diagonal() == 0  # inputs that never fire: any value is as good, keep the nearest
    h[dead, dead] = 1.0
    # Rounded columns in descending H order ("act-order"), the FP columns last.
    order = torch.argsort(h.diagonal() - fp.float() * (h.diagonal().max() + 1), descending=True)
    h = h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w, step, zp = w[:, order], step[:, order], (zp[:, order] if zp is not None else None)
    rounded = int((~fp).sum())
    for b0 in range(0, rounded, block):  # lazy batched updates (the paper's blocks)
        b1 = min(b0 + block, rounded)
        err = torch.zeros(w.shape[0], b1 - b0, device=w.device)
        for i in range(b0, b1):
            q = fake_quant(w[:, i], step[:, i], None if zp is None else zp[:, i], spec.bits, spec.symmetric)
            err[:, i - b0] = (w[:, i] - q) / hinv[i, i]
            w[:, i] = q
            w[:, i + 1:b1] -= err[:, i - b0, None] * hinv[i, i + 1:b1]
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return w[:, torch.argsort(order)].to(weight.dtype)
