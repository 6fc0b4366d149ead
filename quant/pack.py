"""Bit packing of unsigned integer codes into uint8.

Codes are stored densely: n codes of b bits take ceil(n*b/8) bytes, so 3-bit weights are
really 3/8 of a byte. Layout: every group of 8 codes forms one little-endian bit string of
b bytes, code i at bits [i*b, (i+1)*b); the last group is zero-padded and cut to the byte
count. For b in {1, 2, 4, 8} this is the plain "value i of a byte at bits [i*b, (i+1)*b)".

Checkpoints of format v1 stored 3-bit codes in 4 bits and 5..7-bit codes in 8 bits:
`legacy_width(bits)` gives that width, and pack/unpack take it as `width` to read them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def legacy_width(bits: int) -> int:
    """Bits that format-v1 checkpoints used to store one `bits`-bit code."""
    _check(bits, bits)
    return 1 if bits == 1 else 2 if bits == 2 else 4 if bits <= 4 else 8


def is_legacy_format(found: str | None, current: str, legacy: str, where: object) -> bool:
    """Whether a file of format `found` has the v1 code layout (legacy_width); others raise."""
    if found not in (current, legacy):
        raise ValueError(f"{where}: unknown format {found!r} (this plmq reads {current} and {legacy})")
    return found == legacy


def _check(bits: int, width: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range 1..8")
    if not bits <= width <= 8:
        raise ValueError(f"storage width {width} must lie in {bits}..8 for bits={bits}")


def packed_numel(numel: int, bits: int, width: int | None = None) -> int:
    """Number of bytes pack() produces for numel codes."""
    width = bits if width is None else width
    _check(bits, width)
    return math.ceil(numel * width / 8)


def pack(q: Tensor, bits: int, width: int | None = None) -> Tensor:
    """Pack codes in [0, 2**bits) (any int dtype, any shape) into a flat uint8 tensor."""
    width = bits if width is None else width
    _check(bits, width)
    flat = q.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    if width == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    flat = torch.cat([flat, flat.new_zeros((-n) % 8)])
    shifts = torch.arange(0, 8 * width, width, device=flat.device)
    words = (flat.reshape(-1, 8) << shifts).sum(-1, keepdim=True)  # 8*width <= 56 bits: fits int64
    byte_shifts = torch.arange(0, 8 * width, 8, device=flat.device)
    packed = ((words >> byte_shifts) & 0xFF).reshape(-1)
    return packed[:packed_numel(n, bits, width)].to(torch.uint8)


def unpack(packed: Tensor, bits: int, shape: int | tuple[int, ...] | torch.Size,
           width: int | None = None) -> Tensor:
    """Inverse of pack(): uint8 codes of the given shape (or element count)."""
    width = bits if width is None else width
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if packed.numel() != packed_numel(numel, bits, width):
        raise ValueError(f"packed has {packed.numel()} bytes, expected {packed_numel(numel, bits, width)}")
    if width == 8:
        return packed.reshape(shape).to(torch.uint8)
    flat = packed.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % width)])
    byte_shifts = torch.arange(0, 8 * width, 8, device=flat.device)
    words = (flat.reshape(-1, width) << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(0, 8 * width, width, device=flat.device)
    vals = (words >> shifts) & (2**width - 1)
    return vals.reshape(-1)[:numel].to(torch.uint8).reshape(shape)
