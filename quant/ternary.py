"""Ternary (TWN, Li et al. 2016) and binary weights, with a straight-through gradient.

Ternary: per group (default: per row / output channel)
    delta = 0.7 * mean|W|,  alpha = mean(|W| over |W| > delta),
    W_hat = alpha * sign(W) * [|W| > delta]
Binary: alpha = mean|W|, W_hat = alpha * sign(W) (sign(0) = +1 so there are 2 levels).

alpha and delta are closed-form functions of the current weights (they are never
trained by gradient, even with learnable=True); the latent FP weights get the
gradient unchanged (STE), which is how TernaryBERT-style training updates them.
"""

from __future__ import annotations

import torch
from torch import Tensor

TWN_FACTOR = 0.7  # delta = 0.7 * mean|W|: TWN's approximation of the optimal threshold


class _PassThrough(torch.autograd.Function):
    """Forward returns x_hat, backward hands the gradient to x unchanged."""

    @staticmethod
    def forward(ctx, x, x_hat):
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(x: Tensor, x_hat: Tensor) -> Tensor:
    """x_hat in the forward pass, identity gradient to x."""
    return _PassThrough.apply(x, x_hat.detach())


def ternary_params(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(alpha, delta) per group, keepdim shape."""
    with torch.no_grad():
        a = x.detach().abs()
        delta = TWN_FACTOR * a.mean(dims, keepdim=True)
        kept = a > delta
        count = kept.sum(dims, keepdim=True).clamp_min(1)  # all-zero group: alpha = 0
        alpha = (a * kept).sum(dims, keepdim=True) / count
        return alpha, delta


def binary_params(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """alpha = mean|x| per group, keepdim shape."""
    with torch.no_grad():
        return x.detach().abs().mean(dims, keepdim=True)


def ternary_codes(x: Tensor, delta: Tensor) -> Tensor:
    """Codes in {-1, 0, 1} (int8)."""
    return (torch.sign(x) * (x.abs() > delta)).to(torch.int8)


def binary_codes(x: Tensor) -> Tensor:
    """Codes in {-1, 1} (int8)."""
    return torch.where(x >= 0, 1, -1).to(torch.int8)


def ternary_quant(x: Tensor, alpha: Tensor, delta: Tensor) -> Tensor:
    """alpha * ternary code, STE gradient to x."""
    with torch.no_grad():
        x_hat = ternary_codes(x, delta).to(alpha.dtype) * alpha
    return ste(x, x_hat)


def binary_quant(x: Tensor, alpha: Tensor) -> Tensor:
    """alpha * sign(x), STE gradient to x."""
    with torch.no_grad():
        x_hat = binary_codes(x).to(alpha.dtype) * alpha
    return ste(x, x_hat)
