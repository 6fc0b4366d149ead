"""Bit packing of unsigned integer codes into uint8.

Codes are stored densely: n codes of b bits take ceil(n*b/8) bytes, so 3-bit weights are
really 3/8 of a byte. Layout: every group of 8 codes forms one little-endian bit string of
b bytes, code i at bits [i*b, (i+1)*b); the last group is zero-padded and cut to the byte
count. For b in {1, 2, 4, 8} this is the plain "value i of a byte at bits [i*b, (i+1)*b)".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range 1..8")


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes pack() produces for numel codes."""
    _check(bits)
    return math.ceil(numel * bits / 8)


def pack(q: Tensor, bits: int) -> Tensor:
    """Pack codes in [0, 2**bits) (any int dtype, any shape) into a flat uint8 tensor."""
    _check(bits)
    flat = q.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    if bits == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    flat = torch.cat([flat, flat.new_zeros((-n) % 8)])
    shifts = torch.arange(0, 8 * bits, bits, device=flat.device)
    words = (flat.reshape(-1, 8) << shifts).sum(-1, keepdim=True)  # 8*bits <= 56 bits: fits int64
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device)
    packed = ((words >> byte_shifts) & 0xFF).reshape(-1)
    return packed[:packed_numel(n, bits)].to(torch.uint8)


def unpack(packed: Tensor, bits: int, shape: int | tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of pack(): uint8 codes of the given shape (or element count)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"packed has {packed.numel()} bytes, expected {packed_numel(numel, bits)}")
    if bits == 8:
        return packed.reshape(shape).to(torch.uint8)
    flat = packed.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % bits)])
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device)
    words = (flat.reshape(-1, bits) << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(0, 8 * bits, bits, device=flat.device)
    vals = (words >> shifts) & (2**bits - 1)
    return vals.reshape(-1)[:numel].to(torch.uint8).reshape(shape)
