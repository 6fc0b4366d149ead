"""The Quantizer module: fake quantization of one tensor role (weights, activations, outputs).

A Quantizer is either
  * static: its step (and zero point) live in the module, as nn.Parameters when
    learnable (LSQ/LSQ+) and buffers otherwise; set from the first tensor it sees,
    by init_from(), by calibration (observe mode), or by loading a state dict; or
  * dynamic: the step is recomputed from every tensor (no state). This is the case
    for non-learnable weight quantizers (so the grid follows the weights while they
    are trained), per-token activations, per-group activations, and ternary/binary.
    freeze() turns a weight quantizer static at its current weights.

Stochastic rounding is applied only in training mode; eval mode rounds to nearest so
that evaluation and export are deterministic.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from . import ternary as tq
from .config import TensorQuant
from .uniform import (
    compute_qparams,
    dequantize,
    fake_quant,
    group_view,
    lsq_grad_scale,
    minmax,
    qparams_from_range,
    qrange,
    quantize_int,
    reduce_dims,
)

STEP_EPS = 1e-8  # learnable steps are clamped to this in the forward to avoid x / 0
_STATE = ("step", "zero_point", "threshold")


def _strip(shape: torch.Size | list[int]) -> tuple[int, ...]:
    """Drop leading 1s so a stored step broadcasts against any batch shape."""
    shape = list(shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


class Quantizer(nn.Module):
    """Fake quantizer for one tensor role, built from a TensorQuant spec."""

    def __init__(self, spec: TensorQuant, name: str = "tensor", kind: str = "weight", dynamic: bool | None = None):
        super().__init__()
        spec.validate(name)
        if kind == "act" and spec.scheme != "uniform":
            raise ValueError(f"{name}.scheme={spec.scheme!r} is not supported for activations")
        varying = spec.granularity == "token" or (kind == "act" and spec.granularity == "group")
        if dynamic is None:
            dynamic = varying or spec.scheme != "uniform" or (kind == "weight" and not spec.learnable)
        if kind == "act" and spec.granularity == "channel" and spec.axis != -1:
            raise ValueError(f"{name}.axis={spec.axis}: per-channel activations must use axis=-1 (features)")
        if spec.learnable and spec.scheme == "uniform" and (dynamic or varying):
            raise ValueError(f"{name}.learnable=True needs a static step, but granularity "
                             f"{spec.granularity!r} is dynamic for {kind} tensors")
        self.spec, self.name, self.kind, self.dynamic = spec, name, kind, dynamic
        self.observing = False
        self.enabled = True  # False: pass tensors through unquantized (for ablations)
        self._obs: dict | None = None
        self._mode = 0  # bumped when state changes outside of autograd (for caches)
        self._ready = False  # mirrors `initialized` without a device sync per forward
        learn = spec.learnable and spec.scheme == "uniform"
        for k in _STATE:
            if learn and k != "threshold":
                self.register_parameter(k, None)
            else:
                self.register_buffer(k, None)
        self.register_buffer("initialized", torch.tensor(False))

    # ------------------------------------------------------------ layout helpers
    def _view(self, x: Tensor) -> Tensor:
        return group_view(x, self.spec.group_size, self.name) if self.spec.granularity == "group" else x

    def _dims(self, xg: Tensor, rowwise: bool = False) -> tuple[int, ...]:
        if rowwise:  # gathered embedding rows: one step per row (or per group)
            return (xg.dim() - 1,)
        return reduce_dims(xg.dim(), self.spec.granularity, self.spec.axis)

    @property
    def _qmax(self) -> int:
        return qrange(self.spec.bits, self.spec.symmetric)[1]

    @property
    def _qmin(self) -> int:
        """Symmetric activations use the full signed range [-2**(bits-1), 2**(bits-1) - 1] (the step is still
        max|x| / qmax), as int8 runtimes do (ONNX Runtime's uint8 with zero point 128, compressed-tensors);
        weights keep the symmetric [-qmax, qmax]."""
        if self.kind == "act" and self.spec.symmetric:
            return -(2 ** (self.spec.bits - 1))
        return qrange(self.spec.bits, self.spec.symmetric)[0]

    def _store(self, key: str, value: Tensor | None) -> None:
        """Set step/zero_point/threshold in place when possible (keeps optimizer refs)."""
        cur = getattr(self, key)
        if value is None:
            return
        value = value.detach()
        if cur is not None and cur.shape == value.shape:
            with torch.no_grad():
                cur.copy_(value)
        elif isinstance(cur, nn.Parameter) or (cur is None and key in self._parameters):
            setattr(self, key, nn.Parameter(value.clone()))
        else:
            setattr(self, key, value.clone())

    def reserve(self, example_shape: tuple[int, ...]) -> None:
        """Create placeholder state for inputs shaped like example_shape (not initialised)."""
        if self.dynamic:
            return
        xg = self._view(torch.empty(example_shape, device="meta"))
        shape = _strip([1 if d in self._dims(xg) else s for d, s in enumerate(xg.shape)])
        dev = self.initialized.device
        self._store("step", torch.ones(shape, device=dev))
        if not self.spec.symmetric:
            self._store("zero_point", torch.zeros(shape, device=dev))

    # ------------------------------------------------------------ initialisation
    def compute_params(self, x: Tensor, rowwise: bool = False) -> dict[str, Tensor | None]:
        """Step (alpha), zero point and threshold for x (grouped view), keepdim shapes."""
        xg = self._view(x.detach())
        dims = self._dims(xg, rowwise)
        if self.spec.scheme == "ternary":
            alpha, delta = tq.ternary_params(xg, dims)
            return {"step": alpha, "zero_point": None, "threshold": delta}
        if self.spec.scheme == "binary":
            return {"step": tq.binary_params(xg, dims), "zero_point": None, "threshold": None}
        step, zp = compute_qparams(xg, self.spec, dims)
        return {"step": step, "zero_point": zp, "threshold": None}

    def init_from(self, x: Tensor) -> None:
        """Set the step (and zero point) from x. Dynamic quantizers only check x."""
        params = self.compute_params(x)
        if not self.dynamic:
            for k, v in params.items():
                self._store(k, None if v is None else v.reshape(_strip(v.shape)))
        self._mark_ready()

    def freeze(self, x: Tensor | None = None) -> None:
        """Stop recomputing the step: fix it at x's (needed when dynamic) or as is."""
        if self.dynamic:
            if x is None:
                raise ValueError(f"{self.name}: freezing a dynamic quantizer needs the tensor")
            self.dynamic = False
            self.init_from(x)
        self.observing = False

    def set_params(self, step: Tensor, zero_point: Tensor | None = None, threshold: Tensor | None = None) -> None:
        """Make the quantizer static with the given parameters (used when loading)."""
        self.dynamic = False
        for k, v in zip(_STATE, (step, zero_point, threshold), strict=True):
            self._store(k, v)
        self._mark_ready()

    def learn_step(self) -> nn.Parameter:
        """Make the static step a trainable Parameter (a uniform one with LSQ's gradient scale), and return it.
        A ternary or binary scale can be learned once the codes are held (fix_codes)."""
        fixed = self._buffers.get("fixed_codes") is not None
        if self.dynamic or self.step is None or not (fixed or self.spec.scheme == "uniform"):
            raise ValueError(f"{self.name}: only a static uniform step, or the scale of held codes, can be learned")
        if not isinstance(self.step, nn.Parameter):
            self.step = nn.Parameter(self.step.detach().clone())  # replaces the buffer of that name
        self.step.requires_grad_(True)
        if self.spec.scheme == "uniform":
            self.spec = dataclasses.replace(self.spec, learnable=True)
        self._mode += 1
        return self.step

    def fix_codes(self, x: Tensor) -> None:
        """Hold x as its integer codes at the current grid: the forward then returns codes x step, whatever
        tensor it is given, so training the step leaves the codes alone."""
        self.register_buffer("fixed_codes", self.codes(x)[0], persistent=False)
        self._mode += 1

    def release_codes(self) -> Tensor:
        """Drop the held codes; returns their dequantized value at the current step (the weight to keep)."""
        codes = self._buffers.pop("fixed_codes")
        self._mode += 1
        with torch.no_grad():
            p = self._held_params()
            if self.spec.scheme == "ternary":  # the values are 0 or +-scale: half the scale re-encodes them
                self._store("threshold", (p["step"] / 2).expand_as(self.threshold))
            return self.decode(codes, p)

    def _held_params(self) -> dict[str, Tensor | None]:
        """The parameters that decode held codes: a learned scale of any scheme is kept above 0."""
        p = self._static(None)
        return {**p, "step": p["step"].clamp_min(STEP_EPS)}

    def state_key(self) -> tuple:
        """Changes whenever the quantizer's output for a fixed input may change."""
        key = [self._mode, self.dynamic, self.enabled, self.observing, self.training]
        for k in _STATE:
            t = getattr(self, k)
            key.append(None if t is None else (t._version, t.data_ptr()))
        return tuple(key)

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Fake-quantize x. index: rows of a stored per-row step to use (embeddings)."""
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        codes = self._buffers.get("fixed_codes")
        if codes is not None:  # weights held as integer codes: only the step (and zero point) move
            return self.decode(codes, self._held_params())
        if not self.dynamic and not self._ready:
            self.init_from(x)
        xg = self._view(x)
        p = self.compute_params(x, rowwise=index is not None) if self.dynamic else self._static(index)
        if self.spec.scheme == "ternary":
            out = tq.ternary_quant(xg, p["step"], p["threshold"])
        elif self.spec.scheme == "binary":
            out = tq.binary_quant(xg, p["step"])
        else:
            g = lsq_grad_scale(xg.numel() // p["step"].numel(), self._qmax) if self.spec.learnable else 1.0
            stochastic = self.training and self.spec.rounding == "stochastic"
            out = fake_quant(xg, p["step"], p["zero_point"], self.spec.bits, self.spec.symmetric, stochastic, g,
                             qmin=self._qmin)
        return out.reshape(x.shape)

    def _static(self, index: Tensor | None) -> dict[str, Tensor | None]:
        p = {k: getattr(self, k) for k in _STATE}
        if self.spec.learnable:  # a learned step could reach 0 or below
            p["step"] = p["step"].clamp_min(STEP_EPS)
        if index is not None:
            p = {k: (None if v is None else v[index]) for k, v in p.items()}
        return p

    # ------------------------------------------------------------ export helpers
    def codes(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Integer codes of x (x's shape, int16) and the parameters that dequantize them."""
        with torch.no_grad():
            p = self.compute_params(x) if self.dynamic else self._static(None)
            xg = self._view(x.detach())
            if self.spec.scheme == "ternary":
                q = tq.ternary_codes(xg, p["threshold"])
            elif self.spec.scheme == "binary":
                q = tq.binary_codes(xg)
            else:
                q = quantize_int(xg, p["step"], p["zero_point"], self.spec.bits, self.spec.symmetric, self._qmin)
            params = {k: v.reshape(_strip(v.shape)).contiguous() for k, v in p.items() if v is not None}
            return q.to(torch.int16).reshape(x.shape), params

    def decode(self, q: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Dequantize codes from codes(); bit-identical to the fake-quant forward."""
        qg = self._view(q)
        if self.spec.scheme == "uniform":
            out = dequantize(qg, params["step"], params.get("zero_point"))
        else:  # ternary/binary: alpha * code, same product as the forward
            out = qg.to(params["step"].dtype) * params["step"]
        return out.reshape(q.shape)

    # ------------------------------------------------------------ calibration
    def start_observing(self, max_samples: int = 2**20) -> None:
        """Collect ranges from the following forwards instead of quantizing."""
        self.observing = True
        self._obs = {"lo": None, "hi": None, "rows": None, "keys": None, "max": max_samples, "shape": None}

    def _observe(self, x: Tensor) -> None:
        x = x.detach()
        obs = self._obs
        dims = self._dims(x)
        obs["shape"] = _strip([1 if d in dims else s for d, s in enumerate(x.shape)])
        if self.spec.init == "minmax":  # running min/max: exact, no samples kept
            lo, hi = minmax(x, dims)
            lo, hi = lo.reshape(obs["shape"]), hi.reshape(obs["shape"])
            obs["lo"] = lo if obs["lo"] is None else torch.minimum(obs["lo"], lo)
            obs["hi"] = hi if obs["hi"] is None else torch.maximum(obs["hi"], hi)
            return
        axis = self.spec.axis % x.dim() if self.spec.granularity == "channel" else x.dim() - 1
        rows = x.movedim(axis, -1).reshape(-1, x.shape[axis])
        _reservoir_add(obs, rows)

    def finish_observing(self) -> None:
        """Fix the step from what was observed (no-op if nothing was seen)."""
        obs, self.observing, self._obs = self._obs, False, None
        if not obs or obs["shape"] is None:
            return
        if obs["lo"] is not None:
            step, zp = qparams_from_range(obs["lo"], obs["hi"], self.spec.bits, self.spec.symmetric)
        else:
            rows = obs["rows"]
            dims = (0, 1) if self.spec.granularity == "tensor" else (0,)
            step, zp = compute_qparams(rows, self.spec, dims)
        self._store("step", step.reshape(obs["shape"]))
        self._store("zero_point", None if zp is None else zp.reshape(obs["shape"]))
        self._mark_ready()

    def _mark_ready(self) -> None:
        self.initialized.fill_(True)
        self._ready = True
        self._mode += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Lazily created state: materialise it with the incoming shape before loading.
        for k in _STATE:
            t = state_dict.get(prefix + k)
            cur = getattr(self, k)
            if t is not None and (cur is None or cur.shape != t.shape):
                self._store(k, torch.zeros(t.shape, dtype=t.dtype, device=self.initialized.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)
        self._mode += 1

    def extra_repr(self) -> str:
        s = self.spec
        mode = "dynamic" if self.dynamic else ("learnable" if s.learnable else "static")
        return f"{self.name}: {s.scheme} {s.bits}b {'sym' if s.symmetric else 'asym'} {s.granularity}, {mode}"


def _reservoir_add(obs: dict, rows: Tensor) -> None:
    """Keep a uniform sample of at most obs['max'] elements (bottom-k random keys)."""
    gen = obs.setdefault("gen", torch.Generator(device=rows.device).manual_seed(0))
    keys = torch.rand(rows.shape[0], generator=gen, device=rows.device)
    if obs["rows"] is not None:
        rows, keys = torch.cat([obs["rows"], rows]), torch.cat([obs["keys"], keys])
    max_rows = max(1, obs["max"] // max(rows.shape[1], 1))
    if rows.shape[0] > max_rows:
        idx = torch.topk(keys, max_rows, largest=False).indices
        rows, keys = rows[idx], keys[idx]
    obs["rows"], obs["keys"] = rows, keys


def fake_quantize(x: Tensor, spec: TensorQuant, training: bool = False) -> Tensor:
    """Quantize any tensor per spec (uniform, ternary or binary) with ranges from x
    itself and an STE gradient to x; `learnable` is ignored (no state is kept)."""
    q = Quantizer(dataclasses.replace(spec, learnable=False), dynamic=True)
    return q.train(training)(x)
