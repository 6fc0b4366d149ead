"""Quantized training of linear layers (Chitsaz et al. 2024, chandar-lab/EfficientLLMs).

Forward:   Y = Q_a(X) . Q_w(W)^T + b
Backward:  dW = Q_gw( Q_go(G)^T . X )      G = dL/dY, X and W the saved FP tensors (STE)
           dX = Q_gi(G) . W                 Q_gi off by default: the previous layer gets
           db = sum(G)                      the exact G (the paper's default)

Every Q_* is optional (off = exact FP) and has its own TensorQuant spec (bits,
granularity, rounding, symmetric). The scale is the absmax of the current tensor
(uniform.fake_quantize with init="minmax"), computed on the 2-D view [tokens, features]
of activations and gradients, so "token" means one scale per token and "channel" with
axis=-1 one per feature; weights and dW are [out, in], "channel" (axis 0) = per output row.

A `Recipe` bundles the five linear-layer specs with the optimizer-state specs
(quant/qoptim.py). Short names concatenate tokens; each enables one tensor kind:

    w<b>  weight, per output channel        g<b>   grad_output (G for dW), per token
    a<b>  activation (input), per token     gx<b>  grad_input (G for dX), per token
    gw<b> weight gradient dW, per channel   m<b>   AdamW first moment, blocks of 256 (4 bit: 128)
    (weights and activations round to nearest; the three gradient kinds round stochastically)
    v<b>  AdamW second moment (sqrt code, blocks of 256; 4 bit: 128)  fp  nothing quantized

followed by optional overrides ``:kind.field=value,...``, e.g. ``w8a8g8``, ``w4``,
``m4v8``, ``v8:opt_v.code=linear``, ``w8a8:act.rounding=stochastic``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TensorQuant
from .layers import is_conv1d
from .qoptim import QAdamW, StateQuant
from .uniform import fake_quantize

LINEAR_KINDS = ("weight", "act", "grad_output", "grad_input", "grad_weight")
OPT_KINDS = ("opt_m", "opt_v")
KINDS = LINEAR_KINDS + OPT_KINDS
_TOKENS = {"w": "weight", "a": "act", "g": "grad_output", "gx": "grad_input", "gw": "grad_weight",
           "m": "opt_m", "v": "opt_v"}
_TOKEN_RE = re.compile(r"(gx|gw|w|a|g|m|v)(\d+)")


def default_spec(kind: str, bits: int) -> TensorQuant | StateQuant:
    """The spec a short-name token enables."""
    if kind == "opt_m":
        return StateQuant(bits=bits, block_size=256 if bits == 8 else 128, code="linear")
    if kind == "opt_v":  # sqrt code: no table search, unlike 'dynamic'
        return StateQuant(bits=bits, block_size=256 if bits == 8 else 128, code="sqrt")
    if not 2 <= bits <= 8:
        raise ValueError(f"{kind}.bits={bits} is out of range 2..8")
    # Gradients round stochastically (unbiased): round-to-nearest zeroes every entry below half a
    # step of its token's absmax, e.g. the small softmax gradients at the LM head.
    # "...:grad_output.rounding=nearest" selects nearest rounding.
    rounding = "stochastic" if kind.startswith("grad") else "nearest"
    if kind in ("weight", "grad_weight"):
        return TensorQuant(bits=bits, granularity="channel", axis=0, rounding=rounding)
    return TensorQuant(bits=bits, granularity="token", rounding=rounding)


def check_spec(kind: str, spec: Any) -> None:
    """Raise ValueError naming `kind.field` if spec cannot be used for this tensor kind."""
    if kind in OPT_KINDS:
        if not isinstance(spec, StateQuant):
            raise ValueError(f"{kind}={spec!r} must be a StateQuant")
        spec.validate(kind, signed=kind == "opt_m")
        return
    if not isinstance(spec, TensorQuant):
        raise ValueError(f"{kind}={spec!r} must be a TensorQuant")
    spec.validate(kind)
    if spec.scheme != "uniform":
        raise ValueError(f"{kind}.scheme={spec.scheme!r}: quantized training supports 'uniform' only")
    if spec.learnable:
        raise ValueError(f"{kind}.learnable=True: quantized training uses the absmax of each tensor, no learned step")
    if spec.granularity == "channel" and kind not in ("weight", "grad_weight") and spec.axis not in (-1, 1):
        raise ValueError(f"{kind}.axis={spec.axis}: per-channel {kind} must use axis=-1 (features)")


@dataclass
class Recipe:
    """Which tensors of quantized training are quantized, and how (None = FP)."""

    weight: TensorQuant | None = None
    act: TensorQuant | None = None
    grad_output: TensorQuant | None = None
    grad_input: TensorQuant | None = None
    grad_weight: TensorQuant | None = None
    opt_m: StateQuant | None = None
    opt_v: StateQuant | None = None

    def __post_init__(self) -> None:
        for kind in KINDS:
            if getattr(self, kind) is not None:
                check_spec(kind, getattr(self, kind))

    @property
    def quantizes_linear(self) -> bool:
        return any(getattr(self, k) is not None for k in LINEAR_KINDS)

    @classmethod
    def parse(cls, name: str | dict | Recipe) -> Recipe:
        """Recipe from a short name (module docstring), a `to_dict`/`from_dict` mapping, or a Recipe."""
        if isinstance(name, Recipe):
            return name
        if isinstance(name, dict):
            return cls.from_dict(name)
        if not isinstance(name, str):
            raise ValueError(f"recipe={name!r} must be a string such as 'w8a8g8' or 'fp'")
        base, _, overrides = name.strip().lower().partition(":")
        recipe = cls._parse_base(base)
        for item in filter(None, (s.strip() for s in overrides.split(","))):
            recipe = recipe._override(item)
        return recipe

    @classmethod
    def _parse_base(cls, base: str) -> Recipe:
        if base in ("fp", "fp32", ""):
            return cls()
        specs: dict[str, Any] = {}
        pos = 0
        for m in _TOKEN_RE.finditer(base.replace("-", "").replace("_", "")):
            if m.start() != pos:
                break
            kind = _TOKENS[m.group(1)]
            if kind in specs:
                raise ValueError(f"recipe {base!r}: {kind} is given twice")
            specs[kind] = default_spec(kind, int(m.group(2)))
            pos = m.end()
        rest = base.replace("-", "").replace("_", "")[pos:]
        if rest:
            raise ValueError(f"recipe {base!r}: cannot parse {rest!r}; expected 'fp' or tokens "
                             "w<bits> a<bits> g<bits> gx<bits> gw<bits> m<bits> v<bits>")
        return cls(**specs)

    def _override(self, item: str) -> Recipe:
        key, eq, value = item.partition("=")
        kind, _, attr = key.strip().partition(".")
        if not eq or not attr:
            raise ValueError(f"recipe override {item!r} must look like <kind>.<field>=<value>")
        return self.with_overrides({kind: {attr: _scalar(value.strip())}})

    def with_overrides(self, overrides: dict[str, dict[str, Any] | None]) -> Recipe:
        """Update fields per kind; a kind that is off is switched on with its 8-bit defaults."""
        d = {k: getattr(self, k) for k in KINDS}
        for kind, upd in overrides.items():
            if kind not in KINDS:
                raise ValueError(f"unknown tensor kind {kind!r}; known kinds: {', '.join(KINDS)}")
            if upd is None:
                continue
            if not isinstance(upd, dict):
                raise ValueError(f"{kind}: expected a mapping of fields, got {upd!r}")
            cur = d[kind] or default_spec(kind, 8)
            known = {f.name for f in fields(cur)}
            bad = sorted(set(upd) - known)
            if bad:
                raise ValueError(f"{kind}.{bad[0]} is not a field; known fields: {', '.join(sorted(known))}")
            try:
                d[kind] = dataclasses.replace(cur, **upd)
            except ValueError as err:
                raise ValueError(f"{kind}.{err}") from None
        return Recipe(**d)

    def to_dict(self) -> dict[str, dict | None]:
        return {k: (dataclasses.asdict(getattr(self, k)) if getattr(self, k) else None) for k in KINDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """{"name": "w8a8", <kind>: {fields}} or the to_dict() form."""
        d = dict(d)
        base = cls.parse(d.pop("name", "fp"))
        return base.with_overrides(d)

    def __str__(self) -> str:
        """Canonical short name, with overrides where a spec differs from its token's default."""
        tokens, diffs = [], []
        for tok, kind in _TOKENS.items():
            spec = getattr(self, kind)
            if spec is None:
                continue
            tokens.append(f"{tok}{spec.bits}")
            ref = default_spec(kind, spec.bits)
            diffs += [f"{kind}.{f.name}={getattr(spec, f.name)}".lower() for f in fields(spec)
                      if getattr(spec, f.name) != getattr(ref, f.name)]
        return ("".join(tokens) or "fp") + (":" + ",".join(diffs) if diffs else "")


def _scalar(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            pass
    return value


# ------------------------------------------------------------------ autograd


def quantize(x: Tensor, spec: TensorQuant | None, training: bool = True) -> Tensor:
    """Fake-quantize with the absmax of x itself; identity when spec is None."""
    if spec is None:
        return x
    return fake_quantize(x, spec, training=training)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class QLinearFunction(torch.autograd.Function):
    """Y = Q_a(X) Q_w(W)^T + b with quantized gradients; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, recipe: Recipe, training: bool,
                transposed: bool = False) -> Tensor:
        xq = x if recipe.act is None else quantize(_rows(x), recipe.act, training).view_as(x)
        wq = quantize(w, recipe.weight, training)
        ctx.save_for_backward(x, w)
        ctx.recipe, ctx.has_bias, ctx.transposed = recipe, b is not None, transposed
        return F.linear(xq, wq, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        r = ctx.recipe
        g = _rows(grad)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = quantize(g, r.grad_input).mm(w).view(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            gq = quantize(g, r.grad_output)
            # The products autograd computes for nn.Linear (G^T X) and for Conv1D ((X^T G) in its
            # [in, out] layout), so that with everything off the gradients are bit-exact.
            gw = _rows(x).t().mm(gq).t() if ctx.transposed else gq.t().mm(_rows(x))
            gw = quantize(gw, r.grad_weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None, None, None


class QTrainLinear(nn.Module):
    """Linear layer trained with quantized weights, activations and gradients.

    Shares the wrapped layer's Parameters (so tied weights stay tied and the state dict
    keys and shapes are unchanged); HF Conv1D keeps its [in, out] layout (`transposed`).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, recipe: Recipe, transposed: bool = False):
        super().__init__()
        self.weight, self.bias, self.recipe, self.transposed = weight, bias, recipe, transposed
        self.out_features, self.in_features = self.linear_weight().shape

    @classmethod
    def from_float(cls, module: nn.Module, recipe: Recipe | str) -> QTrainLinear:
        recipe = Recipe.parse(recipe)
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias, recipe)
        if is_conv1d(module):
            return cls(module.weight, module.bias, recipe, transposed=True)
        raise TypeError(f"cannot convert {type(module).__name__} to QTrainLinear")

    def linear_weight(self) -> Tensor:
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: Tensor) -> Tensor:
        return QLinearFunction.apply(x, self.linear_weight(), self.bias, self.recipe, self.training, self.transposed)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, recipe={self.recipe}, transposed={self.transposed}"


def convert_qtrain(model: nn.Module, recipe: Recipe | str, include_head: bool = True,
                   skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every nn.Linear / Conv1D (GPT-2: c_attn, c_proj, c_fc, mlp.c_proj; Llama: q/k/v/o_proj,
    gate/up/down_proj; and, as in the paper, lm_head) by a QTrainLinear; embeddings and norms stay FP.
    Returns the converted names (none when the recipe quantizes only optimizer states)."""
    recipe = Recipe.parse(recipe)
    if not recipe.quantizes_linear:
        return []
    names = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or is_conv1d(m)) and n not in skip
             and (include_head or n.split(".")[0] != "lm_head")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QTrainLinear.from_float(getattr(parent, child), recipe))
    return names


def make_optimizer(params, recipe: Recipe | str, **adamw_kwargs):
    """QAdamW storing m / v as the recipe says (FP32 when off)."""
    recipe = Recipe.parse(recipe)
    return QAdamW(params, m=recipe.opt_m, v=recipe.opt_v, **adamw_kwargs)
