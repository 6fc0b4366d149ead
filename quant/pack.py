"""Bit packing of unsigned integer codes into uint8.

Storage width per value: 1 bit for binary (8 per byte), 2 bits for 2-bit codes (4 per
byte), 4 bits for 3- and 4-bit codes (2 per byte; 3-bit is stored in 4 so values never
straddle a byte), 8 bits for 5..8-bit codes. Little-endian within a byte: value i of a
byte sits at bits [i*w, (i+1)*w).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def storage_bits(bits: int) -> int:
    """Bits used to store one `bits`-bit code."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range 1..8")
    return 1 if bits == 1 else 2 if bits == 2 else 4 if bits <= 4 else 8


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes pack() produces for numel codes."""
    return math.ceil(numel / (8 // storage_bits(bits)))


def pack(q: Tensor, bits: int) -> Tensor:
    """Pack codes in [0, 2**bits) (any int dtype, any shape) into a flat uint8 tensor."""
    w = storage_bits(bits)
    flat = q.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    if w == 8:
        return flat.to(torch.uint8)
    per = 8 // w
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, w, dtype=torch.int32, device=flat.device)
    return (flat.reshape(-1, per) << shifts).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, shape: int | tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of pack(): uint8 codes of the given shape (or element count)."""
    w = storage_bits(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"packed has {packed.numel()} bytes, expected {packed_numel(numel, bits)}")
    if w == 8:
        return packed.reshape(shape).to(torch.uint8)
    shifts = torch.arange(0, 8, w, dtype=torch.int32, device=packed.device)
    vals = (packed.to(torch.int32).reshape(-1, 1) >> shifts) & (2**w - 1)
    return vals.reshape(-1)[:numel].to(torch.uint8).reshape(shape)
