"""Quantization configs and their short string names.

Grammar of a config name (case-insensitive, used on the CLI and in YAML)::

    name      := weight [act] ("-" extra)* [":" overrides]
    weight    := "w" BITS ["g" GROUP]   1 = binary, 2 = ternary (TWN), 3..8 = uniform,
                                        16 = FP; "gG" = uniform groups of G along the
                                        input dim (so "w2g64" is uniform 2-bit, not TWN)
    act       := "a" BITS               2..8 uniform, 16 or omitted = FP
    extra     := "e" BITS               word embeddings (same bit meaning as weights)
               | "o" BITS               outputs of quantized linears (like act)
    overrides := FIELD "." ATTR "=" VALUE ("," ...)
                                        any TensorQuant attribute, e.g.
                                        "w4a8:weight.learnable=true,act.init=mse"

Defaults implied by a short name: weights and embeddings are symmetric, per output
channel (axis 0, i.e. per row), min-max; activations and outputs are symmetric,
per tensor, min-max calibrated. Examples: ``w8a8``, ``w4a8``, ``w2a8`` (ternary),
``w1a8`` (binary), ``w4g128a16``, ``w4a8-e8``. ``str(config)`` gives the canonical
name, which parses back to an equal config.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from typing import Any

SCHEMES = ("uniform", "ternary", "binary")
GRANULARITIES = ("tensor", "channel", "token", "group")
ROUNDINGS = ("nearest", "stochastic")
INITS = ("minmax", "percentile", "mse")
FP_BITS = 16  # "w16"/"a16" in names: not quantized


@dataclass
class TensorQuant:
    """How one tensor (weights, activations, embeddings) is quantized."""

    bits: int = 8  # 2..8 uniform; 2 for ternary, 1 for binary
    scheme: str = "uniform"  # "uniform" | "ternary" | "binary"
    symmetric: bool = True
    granularity: str = "tensor"  # "tensor" | "channel" | "token" | "group"
    axis: int = 0  # channel axis (weights: 0 = output channels; activations: use -1)
    group_size: int = 128  # elements per group along the last dim
    rounding: str = "nearest"  # "nearest" | "stochastic" (stochastic only in training)
    init: str = "minmax"  # "minmax" | "percentile" | "mse"
    percentile: float = 99.99
    learnable: bool = False  # LSQ step (and LSQ+ offset when asymmetric)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, name: str = "") -> None:
        """Raise ValueError naming the offending field (prefixed by `name`)."""
        p = f"{name}." if name else ""

        def bad(field: str, msg: str) -> ValueError:
            return ValueError(f"{p}{field}={getattr(self, field)!r} {msg}")

        if self.scheme not in SCHEMES:
            raise bad("scheme", f"is not one of {SCHEMES}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise bad("bits", "must be an int")
        if self.scheme == "uniform" and not 2 <= self.bits <= 8:
            raise ValueError(f"{p}bits={self.bits} is out of range 2..8")
        if self.scheme == "ternary" and self.bits != 2:
            raise bad("bits", "must be 2 for scheme 'ternary'")
        if self.scheme == "binary" and self.bits != 1:
            raise bad("bits", "must be 1 for scheme 'binary'")
        if self.scheme != "uniform" and not self.symmetric:
            raise bad("symmetric", f"must be True for scheme {self.scheme!r}")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"is not one of {GRANULARITIES}")
        if self.rounding not in ROUNDINGS:
            raise bad("rounding", f"is not one of {ROUNDINGS}")
        if self.init not in INITS:
            raise bad("init", f"is not one of {INITS}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise bad("group_size", "must be a positive int")
        if not isinstance(self.axis, int):
            raise bad("axis", "must be an int")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise bad("percentile", "is out of range (50, 100]")

    @property
    def levels(self) -> int:
        """Number of representable values."""
        if self.scheme == "ternary":
            return 3
        if self.scheme == "binary":
            return 2
        return 2**self.bits - 1 if self.symmetric else 2**self.bits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "tensor") -> TensorQuant:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except ValueError as e:  # re-raise with the config field name in front
            raise ValueError(f"{name}.{e}") from None


def weight_spec(bits: int, group: int | None = None) -> TensorQuant:
    """Default weight/embedding spec for a short name's bit width."""
    if bits == 1:
        if group is not None:
            raise ValueError("weight.group_size: groups are not supported for binary (w1)")
        return TensorQuant(bits=1, scheme="binary", granularity="channel", axis=0)
    if bits == 2 and group is None:
        return TensorQuant(bits=2, scheme="ternary", granularity="channel", axis=0)
    if group is not None:
        return TensorQuant(bits=bits, granularity="group", group_size=group)
    return TensorQuant(bits=bits, granularity="channel", axis=0)


def act_spec(bits: int) -> TensorQuant:
    """Default activation/output spec: symmetric per-tensor, min-max calibrated."""
    return TensorQuant(bits=bits, granularity="tensor")


_ROLES = ("weight", "act", "embedding", "output")
_NAME_RE = re.compile(r"^w(\d+)(?:g(\d+))?(?:a(\d+))?((?:-[eo]\d+)*)$")


@dataclass
class QuantConfig:
    """Per-role quantization specs for a model; None means floating point."""

    weight: TensorQuant | None = None
    act: TensorQuant | None = None
    embedding: TensorQuant | None = None
    output: TensorQuant | None = None

    def __post_init__(self) -> None:
        for role in _ROLES:
            spec = getattr(self, role)
            if isinstance(spec, dict):
                spec = TensorQuant.from_dict(spec, role)
                setattr(self, role, spec)
            if spec is None:
                continue
            if not isinstance(spec, TensorQuant):
                raise ValueError(f"{role}={spec!r} must be a TensorQuant, dict or None")
            spec.validate(role)
            if role in ("act", "output") and spec.scheme != "uniform":
                raise ValueError(f"{role}.scheme={spec.scheme!r} is not supported for activations")

    @classmethod
    def parse(cls, s: str | dict | QuantConfig) -> QuantConfig:
        """Build a config from a short name (see module docstring) or a dict."""
        if isinstance(s, QuantConfig):
            return s
        if isinstance(s, dict):
            return cls.from_dict(s)
        if not isinstance(s, str):
            raise ValueError(f"config={s!r} must be a string or dict")
        base, _, overrides = s.strip().lower().partition(":")
        cfg = cls._parse_base(base)
        if overrides:
            cfg = cfg._apply_overrides(overrides)
        return cfg

    @classmethod
    def _parse_base(cls, base: str) -> QuantConfig:
        m = _NAME_RE.match(base)
        if not m:
            raise ValueError(f"config name {base!r} does not match w<bits>[g<group>][a<bits>][-e<bits>][-o<bits>]")
        wbits, group, abits, extras = m.groups()
        out: dict[str, Any] = {}
        out["weight"] = _short_spec("weight", int(wbits), int(group) if group else None)
        out["act"] = _short_spec("act", int(abits)) if abits else None
        for tok in filter(None, extras.split("-")):
            role = "embedding" if tok[0] == "e" else "output"
            out[role] = _short_spec(role, int(tok[1:]))
        return cls(**out)

    def _apply_overrides(self, overrides: str) -> QuantConfig:
        d = self.to_dict()
        for item in overrides.split(","):
            key, eq, value = item.strip().partition("=")
            role, _, attr = key.partition(".")
            if not eq or role not in _ROLES or not attr:
                raise ValueError(f"override {item!r} must look like <role>.<attr>=<value>")
            if d[role] is None:
                raise ValueError(f"{role}.{attr}: {role} is not quantized in this config")
            types = {f.name: f.type for f in fields(TensorQuant)}
            if attr not in types:
                raise ValueError(f"{role}.{attr} is not a TensorQuant field")
            d[role][attr] = _convert(role, attr, value, types[attr])
        return QuantConfig.from_dict(d)

    def short_name(self) -> str:
        """The name without overrides: w/g/a/e/o part only."""
        w = self.weight
        s = f"w{w.bits}" if w else f"w{FP_BITS}"
        if w is not None and w.granularity == "group":
            s += f"g{w.group_size}"
        s += f"a{self.act.bits}" if self.act else f"a{FP_BITS}"
        if self.embedding:
            s += f"-e{self.embedding.bits}"
        if self.output:
            s += f"-o{self.output.bits}"
        return s

    def __str__(self) -> str:
        base = self.short_name()
        ref = QuantConfig._parse_base(base)
        diffs = []
        for role in _ROLES:
            mine, theirs = getattr(self, role), getattr(ref, role)
            if mine is None:
                continue
            for f in fields(TensorQuant):
                v = getattr(mine, f.name)
                if v != getattr(theirs, f.name):
                    diffs.append(f"{role}.{f.name}={_fmt(v)}")
        return base + (":" + ",".join(diffs) if diffs else "")

    def to_dict(self) -> dict[str, Any]:
        return {r: (getattr(self, r).to_dict() if getattr(self, r) else None) for r in _ROLES}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Accept the `to_dict` form, or {"name": "w4a8", <role>: {partial overrides}}."""
        d = dict(d)
        base = cls.parse(d.pop("name")) if "name" in d else None
        unknown = set(d) - set(_ROLES)
        if unknown:
            raise ValueError(f"config: unknown field(s) {sorted(unknown)}")
        out: dict[str, Any] = {}
        for role in _ROLES:
            start = getattr(base, role) if base else None
            v = d.get(role, start.to_dict() if start else None)
            if isinstance(v, dict) and start is not None:
                v = {**start.to_dict(), **v}
            out[role] = TensorQuant.from_dict(v, role) if isinstance(v, dict) else v
        return cls(**out)


def _short_spec(role: str, bits: int, group: int | None = None) -> TensorQuant | None:
    if bits == FP_BITS:
        return None
    if role in ("weight", "embedding"):
        if not 1 <= bits <= 8:
            raise ValueError(f"{role}.bits={bits} is out of range 1..8 (or 16 for FP)")
        return weight_spec(bits, group)
    if not 2 <= bits <= 8:
        raise ValueError(f"{role}.bits={bits} is out of range 2..8 (or 16 for FP)")
    return act_spec(bits)


def _convert(role: str, attr: str, value: str, typ: Any) -> Any:
    typ = str(typ)
    try:
        if typ == "bool":
            if value not in ("true", "false", "1", "0"):
                raise ValueError
            return value in ("true", "1")
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
    except ValueError:
        raise ValueError(f"{role}.{attr}={value!r} is not a valid {typ}") from None
    return value


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
