"""AdamW with block-wise quantized optimizer states (stored as integers).

The first moment m and the second moment v are kept as integer codes plus one float32
absmax per block (bitsandbytes / torchao style), dequantized for the update and
re-quantized right after it, so the memory saving is real:

    8-bit state: 1 byte + 4 / block_size bytes per value   (FP32: 4 bytes)
    4-bit state: 0.5 byte (two codes packed in a uint8) + 4 / block_size bytes

A code is a sorted table of 2**bits values in [-1, 1] (signed, for m) or [0, 1]
(unsigned, for v); a value x of a block with absmax s is stored as the index of the
table entry nearest to x / s. Codes:

* ``linear``: uniform grid with zero (signed: k / (2**(b-1)-1); unsigned: k / (2**b-1)).
  The paper's choice. For v it is unstable: every v below absmax / (2 * (2**b-1)) of its
  block rounds to 0 and the update m / (sqrt(v) + eps) blows up (see test_qoptim.py).
* ``sqrt`` (unsigned only): sqrt(v) is quantized on a linear grid *without* zero,
  ((k+1) / 2**b)**2; the smallest stored v is (1/2**b)**2 of the block's absmax, so the
  denominator never collapses to eps (the zero-excluded linear code of lpmm / torchao 4-bit).
* ``dynamic``: bitsandbytes' dynamic tree code (sign, a decimal exponent given by the
  number of leading zero bits, then a linear fraction); covers 7 decades at 8 bits.

Tensors with fewer than `min_quant_numel` elements (biases, LayerNorm) keep FP32 states,
as bitsandbytes does: quantizing them saves nothing and costs accuracy.

`m` uses the linear code and `v` the sqrt code by default (the dynamic code needs a table
search); `rounding` is "nearest" by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .uniform import qrange

CODES = ("linear", "sqrt", "dynamic")


@dataclass
class StateQuant:
    """How one optimizer state (m or v) is stored."""

    bits: int = 8  # 4 (two codes per byte) or 8
    block_size: int = 256  # values sharing one absmax
    code: str = "linear"  # linear | sqrt | dynamic (see module docstring)
    rounding: str = "nearest"  # nearest | stochastic (unbiased: E[dequant] = value)

    def validate(self, name: str = "state", signed: bool = True) -> None:
        """Raise ValueError naming the offending field (prefixed by `name`)."""
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"{name}.bits={self.bits!r} is not supported: optimizer states use 4 or 8 bits")
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"{name}.block_size={self.block_size!r} must be an even int >= 2")
        if self.code not in CODES:
            raise ValueError(f"{name}.code={self.code!r} is not one of {CODES}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"{name}.rounding={self.rounding!r} is not one of ('nearest', 'stochastic')")
        if self.code == "sqrt" and signed:
            raise ValueError(f"{name}.code='sqrt' is for the (non-negative) second moment only")

    def bytes_for(self, numel: int) -> int:
        """Storage of one state tensor of `numel` values (codes + float32 absmax)."""
        blocks = math.ceil(numel / self.block_size)
        padded = blocks * self.block_size
        return (padded if self.bits == 8 else padded // 2) + 4 * blocks


def dynamic_map(signed: bool, bits: int) -> list[float]:
    """bitsandbytes' dynamic tree code (create_dynamic_map), 2**bits sorted values."""
    exp_bits = bits - 1  # every non-sign bit may act as an exponent bit
    values: list[float] = [0.0, 1.0]
    for i in range(exp_bits):
        n = 2 ** (i + (0 if signed else 1))  # linear fractions in decade i
        edges = torch.linspace(0.1, 1.0, n + 1)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - (exp_bits - 1))).tolist()
        values += means + ([-v for v in means] if signed else [])
    return sorted(values)


_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def code_table(code: str, bits: int, signed: bool, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(table, midpoints) of a code; the table is in the stored domain (sqrt(v) for 'sqrt')."""
    key = (code, bits, signed, str(device))
    if key not in _TABLES:
        if code == "dynamic":
            vals = torch.tensor(dynamic_map(signed, bits))
        elif code == "sqrt":
            vals = torch.arange(1, 2**bits + 1) / 2**bits  # zero excluded
        elif signed:
            lo, hi = qrange(bits, symmetric=True)
            vals = torch.arange(lo, hi + 1) / hi
        else:
            vals = torch.arange(0, 2**bits) / (2**bits - 1)
        vals = vals.to(torch.float32).to(device)
        _TABLES[key] = (vals, (vals[1:] + vals[:-1]) / 2)
    return _TABLES[key]


def _round_to_table(x: Tensor, table: Tensor, mids: Tensor, stochastic: bool, spec: StateQuant,
                    signed: bool) -> Tensor:
    """Index of the nearest table entry, or of one of the two neighbours with probabilities
    that make the result unbiased (values outside the table are clamped to its ends)."""
    if not stochastic:
        if spec.code == "dynamic":
            return torch.bucketize(x, mids)
        # Uniform tables: the nearest index is arithmetic (same result, much faster than a search).
        n = table.numel() - 1
        if spec.code == "sqrt":  # table (k+1)/2^b
            return torch.round(x * (n + 1) - 1).clamp_(0, n)
        return torch.round((x + 1) * (n / 2) if signed else x * n).clamp_(0, n)
    hi = torch.bucketize(x, table).clamp(1, table.numel() - 1)  # first entry >= x
    lo_v, hi_v = table[hi - 1], table[hi]
    p_hi = ((x - lo_v) / (hi_v - lo_v)).clamp(0, 1)
    return hi - (torch.rand_like(x) >= p_hi).long()


def pack_nibbles(idx: Tensor) -> Tensor:
    """Two 4-bit codes per byte, first in the low nibble: quant.pack's layout, without its
    range check and int32 round trip (this runs for every parameter at every step)."""
    return idx[0::2] | (idx[1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)


def quantize_blockwise(x: Tensor, spec: StateQuant, signed: bool) -> tuple[Tensor, Tensor]:
    """(uint8 codes, float32 absmax per block); 4-bit codes are packed two per byte."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % spec.block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, spec.block_size)
    if spec.code == "sqrt":
        blocks = blocks.clamp_min(0).sqrt()
    absmax = blocks.abs().amax(1)
    table, mids = code_table(spec.code, spec.bits, signed, x.device)
    norm = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    idx = _round_to_table(norm, table, mids, spec.rounding == "stochastic", spec, signed)
    idx = idx.to(torch.uint8).reshape(-1)
    return (idx if spec.bits == 8 else pack_nibbles(idx)), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, spec: StateQuant, signed: bool,
                         shape: torch.Size) -> Tensor:
    """Float32 tensor of `shape` from quantize_blockwise's output."""
    idx = codes if spec.bits == 8 else unpack_nibbles(codes)
    table, _ = code_table(spec.code, spec.bits, signed, codes.device)
    if spec.code == "dynamic":
        vals = table[idx.long()]
    else:  # uniform tables: arithmetic instead of a gather (equal to table[idx])
        n = table.numel() - 1
        vals = (idx.float() + 1) / (n + 1) if spec.code == "sqrt" else \
            (idx.float() * (2 / n) - 1 if signed else idx.float() / n)
    vals = (vals.view(-1, spec.block_size) * absmax.unsqueeze(1)).reshape(-1)
    if spec.code == "sqrt":
        vals = vals.square()
    return vals[: math.prod(shape)].view(shape)


class QAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with optionally quantized m and v.

    With `m=None, v=None` it is numerically identical to `torch.optim.AdamW(foreach=False)`.
    State per parameter: `step`, and per moment either an FP32 tensor (`m` / `v`) or
    `m_codes` / `v_codes` (uint8) with `m_absmax` / `v_absmax` (float32 per block).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, m: StateQuant | None = None, v: StateQuant | None = None,
                 min_quant_numel: int = 4096):
        if m is not None:
            m.validate("opt_m", signed=True)
        if v is not None:
            v.validate("opt_v", signed=False)
        if not 0.0 <= lr or not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"bad AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        self.m_spec, self.v_spec, self.min_quant_numel = m, v, min_quant_numel
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _spec(self, p: Tensor, which: str) -> StateQuant | None:
        spec = self.m_spec if which == "m" else self.v_spec
        return spec if spec is not None and p.numel() >= self.min_quant_numel else None

    def _load(self, p: Tensor, which: str) -> Tensor:
        state, spec = self.state[p], self._spec(p, which)
        if which not in state and f"{which}_codes" not in state:
            return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if spec is None:
            return state[which]
        return dequantize_blockwise(state[f"{which}_codes"], state[f"{which}_absmax"], spec, which == "m", p.shape)

    def _store(self, p: Tensor, which: str, value: Tensor) -> None:
        state, spec = self.state[p], self._spec(p, which)
        if spec is None:
            state[which] = value
        else:
            state[f"{which}_codes"], state[f"{which}_absmax"] = quantize_blockwise(value, spec, which == "m")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                t = state["step"].item()
                m, v = self._load(p, "m"), self._load(p, "v")
                p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)  # as torch does
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                self._store(p, "m", m)
                self._store(p, "v", v)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every non-step state tensor to the parameter's dtype; codes stay uint8
        # (0..255 survive the float round trip exactly).
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in [k for k in state if k.endswith("_codes")]:
                state[key] = state[key].to(torch.uint8)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state tensors (codes, scales, FP32 moments, step)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, Tensor))
