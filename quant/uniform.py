"""Uniform fake quantization: STE/LSQ autograd, stochastic rounding, range init.

Grid: symmetric uses the narrow signed range [-(2^(b-1)-1), 2^(b-1)-1] (so the grid is
symmetric around 0); asymmetric uses [0, 2^b-1] with a zero point z (a float tensor,
integer-valued unless learned). Fake quantization is

    x_hat = (round(clamp(x / s + z, qmin, qmax)) - z) * s

and its backward is written out (not traced) so that:
  * d x_hat / d x = 1 inside the clipping range, 0 outside (STE), exactly;
  * d x_hat / d s = round(v) - v inside, (q_bound - z) outside, with v = x/s + z
    (LSQ, Esser et al. 2020), multiplied by the gradient scale g;
  * d x_hat / d z = 0 inside, -s outside (LSQ+, Bhalgat et al. 2020, with offset
    beta = -z * s), also multiplied by g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import TensorQuant

MSE_RATIOS = torch.linspace(0.2, 1.0, 33).tolist()  # clipping ratios searched by init="mse"


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of the grid."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_scale(n: int, qmax: int) -> float:
    """LSQ gradient scale g = 1/sqrt(N * Qp); N = elements sharing one step."""
    return 1.0 / math.sqrt(max(n, 1) * max(qmax, 1))


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, zp, qmin, qmax, stochastic, g, generator):
        # In place on one fresh buffer (same arithmetic as quantize_int / dequantize).
        v = torch.div(x, step)
        if zp is not None:
            v.add_(zp)
        v.clamp_(float(qmin), float(qmax))  # float bounds: int ones hit a slow path
        if stochastic:  # floor(v + u), u ~ U[0,1): unbiased
            v.add_(torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)).floor_()
        else:
            v.round_()
        ctx.qmin, ctx.qmax, ctx.g, ctx.has_zp = qmin, qmax, g, zp is not None
        # Nearest rounding is recomputed in backward; stochastic draws must be kept.
        q = v.to(torch.int16) if stochastic else None
        ctx.save_for_backward(x, step, zp if zp is not None else step, q)
        if zp is not None:
            v.sub_(zp)
        return v.mul_(step)

    @staticmethod
    def backward(ctx, grad):
        x, step, zp, q = ctx.saved_tensors
        zp = zp if ctx.has_zp else None
        v = x / step if zp is None else x / step + zp
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        gx = gs = gz = None
        if ctx.needs_input_grad[0]:
            gx = grad * inside
        if ctx.needs_input_grad[1] or (zp is not None and ctx.needs_input_grad[2]):
            q = torch.round(torch.clamp(v, float(ctx.qmin), float(ctx.qmax))) if q is None else q.to(v.dtype)
            if ctx.needs_input_grad[1]:
                qz = q if zp is None else q - zp
                ds = torch.where(inside, q - v, qz)
                gs = (grad * ds).sum_to_size(step.shape) * ctx.g
            if zp is not None and ctx.needs_input_grad[2]:
                gz = (grad * torch.where(inside, 0.0, -step)).sum_to_size(zp.shape) * ctx.g
        return gx, gs, gz, None, None, None, None, None


def fake_quant(
    x: Tensor,
    step: Tensor,
    zero_point: Tensor | None = None,
    bits: int = 8,
    symmetric: bool = True,
    stochastic: bool = False,
    grad_scale: float = 1.0,
    generator: torch.Generator | None = None,
    qmin: int | None = None,
) -> Tensor:
    """Fake-quantize x on the grid (step, zero_point); differentiable in all three. `qmin`: the grid's lowest
    code when not qrange's (activations: -2**(bits-1))."""
    lo, qmax = qrange(bits, symmetric)
    qmin = lo if qmin is None else qmin
    zp = zero_point if not symmetric else None
    if step.dtype != x.dtype:  # e.g. fp32 steps with a bf16 model: compute in x's dtype
        step, zp = step.to(x.dtype), (zp.to(x.dtype) if zp is not None else None)
    return _FakeQuant.apply(x, step, zp, qmin, qmax, stochastic, grad_scale, generator)


def quantize_int(x: Tensor, step: Tensor, zero_point: Tensor | None, bits: int, symmetric: bool,
                 qmin: int | None = None) -> Tensor:
    """Integer codes (int16) of x, nearest rounding; same arithmetic as fake_quant."""
    lo, qmax = qrange(bits, symmetric)
    qmin = lo if qmin is None else qmin
    v = x / step if symmetric else x / step + zero_point
    return torch.round(torch.clamp(v, float(qmin), float(qmax))).to(torch.int16)


def dequantize(q: Tensor, step: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """Inverse of quantize_int; bit-identical to fake_quant's forward."""
    qf = q.to(step.dtype)
    return qf * step if zero_point is None else (qf - zero_point) * step


# ---------------------------------------------------------------- granularity


def reduce_dims(ndim: int, granularity: str, axis: int = 0) -> tuple[int, ...]:
    """Dims reduced to one step. For "group" x must already be group_view()-ed."""
    if granularity == "tensor":
        return tuple(range(ndim))
    if granularity == "channel":
        a = axis % ndim if ndim else 0
        return tuple(d for d in range(ndim) if d != a)
    return (ndim - 1,)  # token: per row; group: per group (last dim of the group view)


def group_view(x: Tensor, group_size: int, name: str = "tensor") -> Tensor:
    """View [..., D] as [..., D // G, G]; the last dim must be divisible by G."""
    d = x.shape[-1] if x.dim() else 1
    if d % group_size:
        raise ValueError(f"{name}.group_size={group_size} does not divide the last dim {d} of shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], d // group_size, group_size)


# ---------------------------------------------------------------- range init


def qparams_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """(step, zero_point) covering [lo, hi]; zero is always exactly representable."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        step = torch.maximum(lo.abs(), hi.abs()) / qmax
        return torch.where(step > 0, step, torch.ones_like(step)), None
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    step = (hi - lo) / (qmax - qmin)
    step = torch.where(step > 0, step, torch.ones_like(step))
    zp = torch.clamp(torch.round(-lo / step), qmin, qmax)
    return step, zp


def minmax(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-group min and max (keepdim), in one pass when a single dim is reduced."""
    if len(dims) == 1:
        lo, hi = torch.aminmax(x, dim=dims[0], keepdim=True)
        return lo, hi
    return x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)


def _flat(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Move the reduced dims last and flatten them: [*kept, n]."""
    kept = [d for d in range(x.dim()) if d not in dims]
    xp = x.permute(*kept, *dims)
    return xp.reshape(*[x.shape[d] for d in kept], -1)


def _keepdim_shape(x: Tensor, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(x.shape)]


def percentile_range(x: Tensor, dims: tuple[int, ...], p: float, symmetric: bool) -> tuple[Tensor, Tensor]:
    """p-th percentile of |x| (symmetric) or (100-p, p)-th percentiles of x, per group."""
    xf = _flat(x, dims)
    n = xf.shape[-1]
    k_hi = min(max(math.ceil(p / 100.0 * n), 1), n)
    shape = _keepdim_shape(x, dims)
    if symmetric:
        a = torch.kthvalue(xf.abs(), k_hi, dim=-1).values.reshape(shape)
        return -a, a
    lo = torch.kthvalue(xf, n - k_hi + 1, dim=-1).values.reshape(shape)
    hi = torch.kthvalue(xf, k_hi, dim=-1).values.reshape(shape)
    return lo, hi


def mse_range(x: Tensor, dims: tuple[int, ...], bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Shrink the min-max range by the ratio in MSE_RATIOS minimising ||x - q(x)||^2."""
    lo0, hi0 = minmax(x, dims)
    best_err = best_r = None
    for r in MSE_RATIOS:  # loop over candidates only; each is vectorised over groups
        step, zp = qparams_from_range(lo0 * r, hi0 * r, bits, symmetric)
        qmin, qmax = qrange(bits, symmetric)
        v = x / step if zp is None else x / step + zp
        q = torch.round(torch.clamp(v, float(qmin), float(qmax)))
        xq = q * step if zp is None else (q - zp) * step
        err = (xq - x).square().sum(dims, keepdim=True)
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(err, r), best_r)
    return lo0 * best_r, hi0 * best_r


def init_range(x: Tensor, dims: tuple[int, ...], spec: TensorQuant) -> tuple[Tensor, Tensor]:
    """(lo, hi) per group with keepdim shape, by spec.init."""
    x = x.detach()
    if spec.init == "percentile":
        return percentile_range(x, dims, spec.percentile, spec.symmetric)
    if spec.init == "mse":
        return mse_range(x, dims, spec.bits, spec.symmetric)
    return minmax(x, dims)


def compute_qparams(x: Tensor, spec: TensorQuant, dims: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """(step, zero_point) for x per spec, reduced over dims (keepdim)."""
    with torch.no_grad():
        lo, hi = init_range(x, dims, spec)
        return qparams_from_range(lo, hi, spec.bits, spec.symmetric)


def fake_quantize(x: Tensor, spec: TensorQuant, training: bool = False, name: str = "tensor") -> Tensor:
    """Dynamic uniform fake quantization: ranges from x itself, STE gradient to x.
    training=True enables stochastic rounding when spec.rounding says so."""
    spec.validate(name)
    if spec.scheme != "uniform":
        raise ValueError(f"{name}.scheme={spec.scheme!r}: use quant.fake_quantize for ternary/binary")
    shape = x.shape
    xg = group_view(x, spec.group_size, name) if spec.granularity == "group" else x
    dims = reduce_dims(xg.dim(), spec.granularity, spec.axis)
    step, zp = compute_qparams(xg, spec, dims)
    stochastic = training and spec.rounding == "stochastic"
    return fake_quant(xg, step, zp, spec.bits, spec.symmetric, stochastic).reshape(shape)
