"""Export a plmq-quantized model as ONNX that ONNX Runtime and OpenVINO run with integer kernels.

`save_onnx(model, example, path)` traces the model with the TorchScript exporter (`dynamo=False`: ONNX
Runtime fuses its MatMul patterns into integer matmuls, the dynamo exporter's Reshape+Gemm it does not) after
swapping every QuantLinear for an export module:

* static activations (w8a8, w4a8, w2a8, ...): the input passes QuantizeLinear/DequantizeLinear with plmq's
  static step (uint8 with zero point 128 by default, which ONNX Runtime's x86 kernels want; int8 with zero point
  0 with `act_type="int8"`, for TensorRT); the weight is an int8 initializer of plmq's codes laid out
  [in, out] with DequantizeLinear(axis=1) and plmq's per-channel steps; then MatMul (+ bias Add).
  Linears that read one tensor (q, k, v) share one QuantizeLinear, or ONNX Runtime leaves them in float: when
  their steps differ they share the largest (what vLLM does with fused qkv).
* weight-only configs (w4g128a16, w8a16, ...): `com.microsoft.MatMulNBits` with plmq's codes (2, 4 or 8
  bits) and steps (a per-channel step repeated for every block), which is exact at accuracy_level 0.

`check_onnx(model)` says which layers cannot be exported, before anything is written.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..convert import quant_modules, tie_input_quantizers
from ..layers import QuantEmbedding, QuantLinear
from ..prequant.layer import OutlierLinear

OPSET = 17
ACT_TYPES = ("uint8", "int8")
NBITS = (2, 4, 8)


class _QDQ(torch.autograd.Function):
    """x -> QuantizeLinear -> DequantizeLinear (per tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        lo, hi = (0, 255) if zero_point.dtype == torch.uint8 else (-128, 127)
        q = torch.clamp(torch.round(x / scale) + zero_point.float(), lo, hi)
        return (q - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class _Dequantize(torch.autograd.Function):
    """int8 codes [in, out] -> DequantizeLinear(axis=1) with one step per output channel."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return codes.float() * scale

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=1)


class _MatMulNBits(torch.autograd.Function):
    """x @ W.T with W in blocks of `block` codes, packed low bits first (ONNX Runtime's MatMulNBits)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, scales: Tensor, dense: Tensor, k: int, n: int, bits: int,
                block: int) -> Tensor:
        return x @ dense.t()

    @staticmethod
    def symbolic(g, x, packed, scales, dense, k, n, bits, block):
        out = g.op("com.microsoft::MatMulNBits", x, packed, scales, K_i=k, N_i=n, bits_i=bits, block_size_i=block,
                   accuracy_level_i=0)
        sizes = x.type().varyingSizes()  # the exporter cannot infer a contrib op's output: x's, last axis N
        if sizes is not None:
            out.setType(x.type().with_sizes(sizes[:-1] + [n]))
        return out


class _SharedInputs:
    """During one forward, Linears that read the same tensor get one quantized copy of it."""

    def __init__(self) -> None:
        self.seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def qdq(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        for inp, s, out in self.seen:
            if inp is x and torch.equal(s, scale):
                return out
        out = _QDQ.apply(x, scale, zero_point)
        self.seen.append((x, scale, out))
        return out


class _QDQLinear(nn.Module):
    """A static-activation QuantLinear as QDQ(input) @ DequantizeLinear(int8 codes) (+ bias)."""

    def __init__(self, m: QuantLinear, shared: _SharedInputs, act_type: str):
        super().__init__()
        q, params = m.weight_q.codes(m.linear_weight())
        self.register_buffer("codes", q.to(torch.int8).t().contiguous())
        self.register_buffer("w_scale", params["step"].reshape(-1).float().contiguous())
        self.register_buffer("w_zero", torch.zeros(q.shape[0], dtype=torch.int8))
        self.register_buffer("a_scale", m.act_q.step.detach().reshape(()).float().clone())
        zero = (128, torch.uint8) if act_type == "uint8" else (0, torch.int8)
        self.register_buffer("a_zero", torch.tensor(zero[0], dtype=zero[1]))
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        self.shared = shared

    def forward(self, x: Tensor) -> Tensor:
        flat = x.dim() == 2  # a 2-D MatMul + Add becomes a float Gemm in ONNX Runtime: keep a batch axis
        x = x.unsqueeze(0) if flat else x
        y = self.shared.qdq(x, self.a_scale, self.a_zero) @ _Dequantize.apply(self.codes, self.w_scale, self.w_zero)
        y = y if self.bias is None else y + self.bias
        return y.squeeze(0) if flat else y


class _NBitsLinear(nn.Module):
    """A weight-only QuantLinear as MatMulNBits (codes + 2**(bits-1), the op's default zero point); a PreQuant
    OutlierLinear adds its FP columns as a float matmul on the features they read."""

    def __init__(self, m: QuantLinear | OutlierLinear):
        super().__init__()
        spec = m.weight_q.spec
        q, params = m.weight_q.codes(m.weight if isinstance(m, OutlierLinear) else m.linear_weight())
        n, k = q.shape
        block = spec.group_size if spec.granularity == "group" else _channel_block(k)
        step, blocks = params["step"].float().reshape(n, -1), -(-k // block)
        steps = step if step.shape[1] == blocks else step.repeat_interleave(blocks, dim=1)  # per channel
        self.k, self.n, self.bits, self.block = k, n, spec.bits, block
        self.register_buffer("packed", _pack_blocks(q, spec.bits, block))
        self.register_buffer("scales", steps.reshape(-1).contiguous())
        self.register_buffer("dense", m.weight_q.decode(q, params).float())  # what tracing computes with
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        outliers = isinstance(m, OutlierLinear) and m.num_outliers > 0
        self.register_buffer("outlier_idx", m.outlier_idx.detach().clone() if outliers else None)
        self.register_buffer("outlier_t", m.outlier.detach().t().contiguous() if outliers else None)

    def forward(self, x: Tensor) -> Tensor:
        y = _MatMulNBits.apply(x, self.packed, self.scales, self.dense, self.k, self.n, self.bits, self.block)
        if self.outlier_idx is not None:  # the FP columns: Gather + a small float MatMul
            y = y + x.index_select(-1, self.outlier_idx) @ self.outlier_t
        return y if self.bias is None else y + self.bias


def _channel_block(k: int) -> int:
    """A block size for a per-channel step: the largest power of two <= 128 that divides K (at least 16)."""
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    return 16


def _pack_blocks(q: Tensor, bits: int, block: int) -> Tensor:
    """Codes [N, K] as MatMulNBits' B: uint8 [N, blocks, block * bits / 8], low bits first, zero-padded blocks."""
    n, k = q.shape
    blocks = -(-k // block)
    u = torch.full((n, blocks * block), 2 ** (bits - 1), dtype=torch.int32)  # padding decodes to 0
    u[:, :k] = q.to(torch.int32) + 2 ** (bits - 1)
    per = 8 // bits
    u = u.reshape(n, blocks, block // per, per)
    out = torch.zeros(u.shape[:-1], dtype=torch.int32)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out.to(torch.uint8)


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every quantized layer: QuantLinear, QuantEmbedding and PreQuant's OutlierLinear."""
    yield from quant_modules(model)
    yield from ((n, m) for n, m in model.named_modules() if isinstance(m, OutlierLinear))


def kind_of(m: QuantLinear | OutlierLinear) -> str:
    """"qdq" (static activations), "nbits" (weight-only) or why the layer cannot be exported."""
    if isinstance(m, OutlierLinear) and m.act_q is not None:
        return "PreQuant layers with quantized inputs are not exported (weight-only PreQuant is)"
    if getattr(m, "transposed", False):
        return "GPT-2's Conv1D is not exported (transposed weights)"
    w, a = m.weight_q, m.act_q
    if w is None:
        return "its weights are not quantized"
    if getattr(m, "out_q", None) is not None:
        return "output quantizers (-o) have no ONNX Runtime kernel"
    if not w.spec.symmetric or w.spec.scheme == "binary":
        return f"{'asymmetric' if not w.spec.symmetric else 'binary'} weights have no integer kernel"
    if a is None:
        if w.spec.scheme != "uniform" or w.spec.bits not in NBITS:
            return f"weight-only {w.spec.bits}-bit {w.spec.scheme} weights: MatMulNBits takes 2, 4 or 8-bit uniform"
        group = w.spec.group_size if w.spec.granularity == "group" else 16
        if w.spec.granularity not in ("group", "channel") or group < 16 or group & (group - 1):
            return f"weight-only {w.spec.granularity} weights of group {group}: MatMulNBits takes blocks of 16-128"
        return "nbits"
    if w.spec.granularity != "channel" or w.spec.bits > 8:
        return f"{w.spec.granularity} weights with quantized inputs have no integer kernel (use per-channel weights)"
    if a.dynamic or a.spec.granularity != "tensor" or a.spec.bits != 8 or not a.spec.symmetric or not a._ready:
        return "inputs must be static, calibrated, symmetric 8-bit per tensor"
    return "qdq"


def check_onnx(model: nn.Module) -> None:
    """Raise ValueError naming the first layer that cannot be exported and the configs that can."""
    found = False
    for name, m in _layers(model):
        if isinstance(m, QuantEmbedding):
            raise ValueError(f"{name}: quantized embeddings (-e) are not exported to ONNX; export a config without "
                             "-e, e.g. w8a8, w4a8, w2a8 (static int8 inputs) or w4g128a16, w8a16 (weight-only)")
        kind = kind_of(m)
        if kind not in ("qdq", "nbits"):
            raise ValueError(f"{name}: {kind}; ONNX export takes per-channel weights with static int8 inputs "
                             "(w8a8, w4a8, w2a8) or 2/4/8-bit weight-only configs (w4g128a16, w8a16)")
        found = True
    if not found:
        raise ValueError("the model has no quantized layers; export a model written by rtn, gptq, mrem or prequant")


@contextlib.contextmanager
def _export_modules(model: nn.Module, act_type: str) -> Iterator[_SharedInputs]:
    """Swap every QuantLinear for its export module for the duration of the `with`."""
    shared, swapped = _SharedInputs(), []
    for name, m in list(_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = _QDQLinear(m, shared, act_type) if kind_of(m) == "qdq" else _NBitsLinear(m)
        setattr(parent, attr, new)
        swapped.append((parent, attr, m))
    try:
        yield shared
    finally:
        for parent, attr, m in swapped:
            setattr(parent, attr, m)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def save_onnx(model: nn.Module, example: dict[str, Tensor], path: str | os.PathLike, act_type: str = "uint8") -> dict:
    """Write `model` (quantized by plmq, in eval mode; it is not changed) as ONNX to `path`, traced on `example`
    (the model's keyword inputs, e.g. input_ids and attention_mask; batch and sequence axes are dynamic).
    Returns {"qdq_linears", "nbits_linears", "shared_steps_changed"}."""
    import copy

    if act_type not in ACT_TYPES:
        raise ValueError(f"act_type={act_type!r}: use one of {ACT_TYPES}")
    check_onnx(model)
    model = copy.deepcopy(model).eval()
    changed = tie_input_quantizers(model, lambda: model(**example))  # one scale per tensor q, k, v read
    kinds = [kind_of(m) for _, m in _layers(model)]
    with _export_modules(model, act_type):
        trace(model, example, path)
    return {"qdq_linears": kinds.count("qdq"), "nbits_linears": kinds.count("nbits"), "shared_steps_changed": changed}


def trace(model: nn.Module, example: dict[str, Tensor], path: str | os.PathLike) -> None:
    """`model`'s logits as ONNX (the TorchScript exporter, `dynamo=False`), traced on `example`, with dynamic batch
    and sequence axes (a classifier's logits have no sequence axis, a causal LM's do)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        per_token = model(**example).logits.dim() == 3
        axes = {n: {0: "batch", 1: "sequence"} for n in [*example, "logits"]}
        if not per_token:
            axes["logits"] = {0: "batch"}
        wrapper = _Logits(model, list(example)).train(model.training)  # the exporter restores this mode after
        torch.onnx.export(wrapper, tuple(example.values()), str(path),
                          input_names=list(example), output_names=["logits"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, custom_opsets={"com.microsoft": 1})
