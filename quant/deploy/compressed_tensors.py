"""Export a plmq-quantized model as a compressed-tensors checkpoint (Hugging Face transformers, vLLM).

`save_compressed_tensors(model, directory)` writes config.json (with `quantization_config`,
quant_method "compressed-tensors") and model.safetensors with the compressed-tensors package
itself: a plain copy of the model gets plmq's dequantized weights, `apply_quantization_config`
attaches the schemes, plmq's steps are copied into `weight_scale` / `input_scale`, and
`ModelCompressor` compresses, saves and writes the config (what llm-compressor does, without it).
`transformers.AutoModelFor*.from_pretrained(directory)` then runs it with plmq's scales and codes.

Formats (one config group per distinct scheme; weights always symmetric int, scale = plmq's step):
  * w8a8 (8-bit per-channel weights, static int8 per-tensor inputs): `int-quantized`, int8 `weight`.
  * w4a8, w2a8 (TWN ternary: codes {-1, 0, 1} times alpha per channel = an int2 grid with scale
    alpha): `pack-quantized` (`weight_packed` int32). compressed-tensors would infer int-quantized
    (codes unpacked in int8) for static int8 inputs; packed is chosen because transformers loads it
    (tested: same logits and codes) and it keeps the 4/2-bit size. vLLM 0.34 runs neither layout
    for W4A8/W2A8 with static int8 inputs.
  * weight-only (w4g128a16, w8a16, ...): `pack-quantized`, strategy "group" or "channel".
  * word embeddings (-e8): `naive-quantized` int8 `weight`, per-row scale (transformers 5.25 fails
    to load a pack-quantized nn.Embedding). Mixed with the linears the format is "mixed-precision".
The written integer codes are read back and compared with plmq's before the folder is published.

Activation grid: plmq's int8 activations use [-128, 127] (quant.modules.Quantizer), as compressed-tensors
does, so the loaded model computes what plmq's fake quantization does.

Not exportable (ValueError before anything is written): binary w1 (int1 is [-1, 0], no +1),
asymmetric weights, 3/5/6/7-bit weights (compressed-tensors 0.17 and 0.20 pack them differently),
per-tensor or per-token weights, GPT-2's Conv1D (compressed-tensors handles Linear and Embedding
only), dynamic/per-token/asymmetric or non-8-bit activations, output quantizers (-o), uncalibrated
or disabled quantizers, and quantized weights tied to another module.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from torch import nn
from transformers import PreTrainedModel

from ..convert import quant_modules
from ..layers import QuantEmbedding, QuantLinear
from ..modules import Quantizer

SUPPORTED = "use w8a8, w4a8, w2a8, w4g128a16 or w8a16 (optionally with -e8 embeddings)"
WEIGHT_BITS = (2, 4, 8)  # packed identically by compressed-tensors 0.17 (vLLM) and 0.20


@dataclass(frozen=True)
class _Scheme:
    """What one exported module needs; equal ones share a config group."""

    embedding: bool
    bits: int
    group_size: int | None  # None: per output channel (per row for embeddings)
    act: bool  # static int8 per-tensor input scale

    @property
    def format(self) -> CompressionFormat:
        if self.embedding:
            return CompressionFormat.naive_quantized
        if self.bits == 8 and self.act:
            return CompressionFormat.int_quantized
        return CompressionFormat.pack_quantized

    def to_ct(self, targets: list[str]) -> QuantizationScheme:
        strategy = "group" if self.group_size else "channel"
        weights = QuantizationArgs(num_bits=self.bits, type="int", symmetric=True, strategy=strategy,
                                   group_size=self.group_size)
        inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                                  dynamic=False) if self.act else None
        return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs, format=self.format)


def save_compressed_tensors(model: PreTrainedModel, directory: str | Path) -> None:
    """Write `model` (quantized by plmq) to `directory` as a compressed-tensors checkpoint.

    Keeps plmq's weight codes and steps (per channel or per group) and its static activation step
    as `input_scale`. Raises ValueError naming the layer when a layer cannot be represented exactly,
    before writing anything; writes into a temporary sibling folder renamed at the end (replacing
    an existing `directory`). The tokenizer is not written. See the module docstring for formats.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder")
    schemes = {name: _scheme(name, m) for name, m in quant_modules(model)}
    if not schemes:
        raise ValueError(f"model has no plmq-quantized layers (run quant.quantize_model first); {SUPPORTED}")
    _check_untied(model, schemes)
    dense, exported = _dense_copy(model, schemes)
    apply_quantization_config(dense, _ct_config(dense, schemes), show_progress=False)
    _copy_scales(dense, exported)
    compressor = ModelCompressor.from_pretrained_model(dense)
    compressor.compress_model(dense)
    _check_codes(dense, schemes, exported)
    _write_atomically(dense, compressor, directory)


# ------------------------------------------------------------------ checks


def _unsupported(name: str, why: str) -> ValueError:
    return ValueError(f"{name}: {why}; compressed-tensors export cannot represent this exactly, {SUPPORTED}")


def _scheme(name: str, m: QuantLinear | QuantEmbedding) -> _Scheme:
    """The export scheme of one plmq layer, or ValueError saying why there is none."""
    if getattr(m, "transposed", False):
        raise _unsupported(name, "GPT-2 Conv1D (weight stored [in, out]) is not handled by compressed-tensors, "
                                 "which quantizes nn.Linear and nn.Embedding only")
    q = m.weight_q
    if q is None or not q.enabled:
        raise _unsupported(name, "its weights are not quantized")
    s = q.spec
    if s.scheme == "binary":
        raise _unsupported(name, "binary (w1) weights {-1, +1}*alpha: compressed-tensors' int1 grid is [-1, 0]")
    if not s.symmetric:
        raise _unsupported(name, "asymmetric weights (plmq's zero point lives on a [0, 2^b-1] grid, "
                                 "learned ones need not be integers); this export writes symmetric grids only")
    if s.bits not in WEIGHT_BITS:
        raise _unsupported(name, f"{s.bits}-bit weights (compressed-tensors 0.17 and 0.20 pack 3/5/6/7 bits "
                                 f"differently; only {WEIGHT_BITS} bits are stable)")
    if s.granularity == "channel" and s.axis % 2 == 0:
        group = None
    elif s.granularity == "group":
        group = s.group_size
    else:
        raise _unsupported(name, f"weight granularity {s.granularity!r} (axis {s.axis}); "
                                 "only per output channel (axis 0) or per group is exported")
    if isinstance(m, QuantEmbedding):
        return _Scheme(embedding=True, bits=s.bits, group_size=group, act=False)
    if m.out_q is not None:
        raise _unsupported(name, "output quantization (-o) is not exported")
    if m.act_q is not None:
        _check_act(name, m.act_q)
    return _Scheme(embedding=False, bits=s.bits, group_size=group, act=m.act_q is not None)


def _check_act(name: str, q: Quantizer) -> None:
    s = q.spec
    if not (s.scheme == "uniform" and s.bits == 8 and s.symmetric and s.granularity == "tensor"):
        raise _unsupported(name, f"input quantizer {s.bits}-bit {'sym' if s.symmetric else 'asym'} "
                                 f"{s.granularity}: only static symmetric int8 per-tensor inputs are exported")
    if q.dynamic or not q._ready or not q.enabled:
        raise _unsupported(name, "its input quantizer is dynamic, disabled or not calibrated "
                                 "(run quant.calibrate first)")


def _check_untied(model: nn.Module, schemes: dict[str, _Scheme]) -> None:
    """A quantized weight shared with another module (tied embeddings) would be stored as codes for both."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in schemes:
        names = owners.get(id(model.get_submodule(name).weight), [])
        if len(names) > 1:
            raise _unsupported(name, f"its weight is tied to {[n for n in names if n != name + '.weight']}; "
                                     "untie it or keep the tied layers in FP")


# ------------------------------------------------------------------ building


def _dense_copy(model: nn.Module, schemes: dict[str, _Scheme]) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of `model` with plain nn.Linear / nn.Embedding holding plmq's dequantized weights, and
    per layer plmq's integer codes (int8, [out, in]), weight scale and input step (or None)."""
    dense = copy.deepcopy(model)
    exported = {}
    for name in schemes:
        m = dense.get_submodule(name)
        q, params = m.weight_q.codes(m.linear_weight())
        scale = _scale(params["step"], q, m.weight_q.spec.group_size)
        act = getattr(m, "act_q", None)
        exported[name] = {"codes": q.to(torch.int8), "scale": scale,
                          "input_scale": None if act is None else act.step.detach().clone()}
        if isinstance(m, QuantEmbedding):
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device="meta")
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.bias = m.bias
        plain.weight = nn.Parameter(_dequantized(q, scale, m.weight.dtype), requires_grad=m.weight.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, plain)
    return dense, exported


def _scale(step: torch.Tensor, q: torch.Tensor, group_size: int) -> torch.Tensor:
    """plmq's step as compressed-tensors' weight_scale: [out, 1] per channel, [out, in/G] per group.
    A zero step (TWN alpha of an all-zero row, whose codes are all 0) becomes 1: 0/0 is no code."""
    rows = q.shape[0]
    step = step.reshape(rows, -1)
    if step.shape[1] > 1:  # per group: check the codes of a zero-step group are all 0
        zero = q.reshape(rows, step.shape[1], group_size).ne(0).any(-1)
    else:
        zero = q.ne(0).any(-1, keepdim=True)
    if bool((step.eq(0) & zero).any()):
        raise RuntimeError("a zero step with non-zero codes")
    return torch.where(step == 0, torch.ones_like(step), step)


def _dequantized(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in compressed-tensors' arithmetic (scale in the weight dtype)."""
    scale = scale.to(dtype)
    groups = scale.shape[1]
    qg = q.reshape(q.shape[0], groups, -1).to(dtype)
    return (qg * scale.unsqueeze(-1)).reshape(q.shape).detach().clone()


def _ct_config(dense: nn.Module, schemes: dict[str, _Scheme]) -> QuantizationConfig:
    """Config groups per distinct scheme: "Linear" (FP linears ignored) when all quantized linears
    share one scheme, module names otherwise and for embeddings."""
    by_scheme: dict[_Scheme, list[str]] = {}
    for name, s in schemes.items():
        by_scheme.setdefault(s, []).append(name)
    linear = [s for s in by_scheme if not s.embedding]
    groups, ignore = {}, []
    for i, (s, names) in enumerate(by_scheme.items()):
        targets = names
        if not s.embedding and len(linear) == 1:
            targets = ["Linear"]
            ignore = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n not in schemes]
        groups[f"group_{i}"] = s.to_ct(targets)
    return QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.FROZEN)


def _copy_scales(dense: nn.Module, exported: dict[str, dict]) -> None:
    """plmq's weight steps into weight_scale and its activation step into input_scale."""
    for name, t in exported.items():
        m = dense.get_submodule(name)
        if getattr(m, "quantization_scheme", None) is None:
            raise RuntimeError(f"{name}: compressed-tensors did not match the layer to its config group")
        with torch.no_grad():
            m.weight_scale.copy_(t["scale"].reshape(m.weight_scale.shape))
            if t["input_scale"] is not None:
                m.input_scale.copy_(t["input_scale"].reshape(m.input_scale.shape))


def _check_codes(dense: nn.Module, schemes: dict[str, _Scheme], exported: dict[str, dict]) -> None:
    """The codes compressed-tensors stores (int8 weight or unpacked weight_packed) are plmq's."""
    for name, s in schemes.items():
        m = dense.get_submodule(name)
        packed = getattr(m, "weight_packed", None)
        stored = m.weight if packed is None else unpack_from_int32(packed, s.bits, m.weight_shape)
        if stored.dtype != torch.int8 or not torch.equal(stored, exported[name]["codes"]):
            raise RuntimeError(f"{name}: compressed-tensors stored other codes than plmq's")


def _write_atomically(dense: nn.Module, compressor: ModelCompressor, directory: Path) -> None:
    """save_pretrained + update_config into a temporary sibling, then rename it to `directory`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        dense.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        _replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, directory: Path) -> None:
    """Rename tmp to directory; an existing directory is moved aside first and removed after."""
    if not directory.exists():
        tmp.rename(directory)
        return
    old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
    directory.rename(old)
    try:
        tmp.rename(directory)
    except BaseException:
        old.rename(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
