"""Real low-bit checkpoints: packed integer weights + scales in safetensors.

Layout of a saved directory:
  model.safetensors   for each quantized module NAME with a weight quantizer:
                        NAME.weight.packed      uint8, codes packed by quant.pack
                        NAME.weight.step        scales (ternary/binary: alpha)
                        NAME.weight.zero_point  asymmetric only
                        NAME.weight.threshold   ternary only (TWN delta)
                      plus every other entry of model.state_dict() (FP params,
                      biases, buffers, activation-quantizer steps).
  quant_config.json   the QuantConfig (dict + name) and, per converted module, its
                      type, [out, in] shape, layout, bits and config name.

load_quantized() rebuilds the quantized model from an FP skeleton: the dequantized
weights are written into the weights and the weight quantizers are frozen at the saved
scales, so re-quantizing them reproduces the same values bit for bit. A weight tied to
another module (GPT-2 wte / lm_head) is untied when only one side is quantized.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import QuantConfig, TensorQuant
from .convert import convert_modules, quant_modules, quantizers
from .layers import QuantEmbedding
from .modules import _STATE
from .pack import pack, unpack

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"
FORMAT = "plmq-packed-v2"


def to_unsigned(q: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """Map signed codes to [0, 2**bits) for packing."""
    if spec.scheme == "ternary":
        return q + 1
    if spec.scheme == "binary":
        return (q + 1) // 2
    return q + 2 ** (spec.bits - 1) if spec.symmetric else q


def from_unsigned(u: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """Inverse of to_unsigned (int16)."""
    u = u.to(torch.int16)
    if spec.scheme == "ternary":
        return u - 1
    if spec.scheme == "binary":
        return u * 2 - 1
    return u - 2 ** (spec.bits - 1) if spec.symmetric else u


def unpack_codes(packed: torch.Tensor, spec: TensorQuant, shape: Sequence[int]) -> torch.Tensor:
    """Signed codes of `shape` from a packed tensor."""
    return from_unsigned(unpack(packed, spec.bits, shape), spec)


def _export_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors, modules, drop = {}, {}, set()
    for name, m in quant_modules(model):
        w = m.linear_weight()
        info = {"type": "embedding" if isinstance(m, QuantEmbedding) else "linear",
                "transposed": bool(getattr(m, "transposed", False)), "shape": list(w.shape),
                "config": str(m.config)}
        if m.weight_q is not None:
            spec = m.weight_q.spec
            q, params = m.weight_q.codes(w)
            tensors[f"{name}.weight.packed"] = pack(to_unsigned(q, spec), spec.bits)
            tensors.update({f"{name}.weight.{k}": v for k, v in params.items()})
            info.update(bits=spec.bits, scheme=spec.scheme)
            drop.add(f"{name}.weight")
        modules[name] = info
    for k, v in model.state_dict().items():
        if k not in drop and ".weight_q." not in f".{k}":
            tensors[k] = v
    return tensors, modules


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> int:
    """Write the packed checkpoint; returns the size of model.safetensors in bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules = _export_tensors(model)
    if not modules:
        raise ValueError("model has no quantized modules (run quantize_model first)")
    cold = [n for n, q in quantizers(model, "act") if not q.dynamic and not q._ready]
    if cold:  # they would initialise from whatever batch the loaded model sees first
        warnings.warn(f"saving {len(cold)} uncalibrated activation quantizers, e.g. {cold[0]}", stacklevel=2)
    out, aliases = _dedupe(tensors)
    save_file(out, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    first = QuantConfig.parse(next(iter(modules.values()))["config"])
    size = model_bytes(directory)
    meta = {"format": FORMAT, "config": first.to_dict(), "config_name": str(first),
            "modules": modules, "aliases": aliases, "bytes": size}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return size


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors (e.g. GPT-2 lm_head = wte) once; safetensors refuses aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in tensors.items():
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v.detach().cpu().contiguous()
    return out, aliases


def model_bytes(directory: str | os.PathLike) -> int:
    """Size in bytes of the saved model.safetensors."""
    return os.path.getsize(Path(directory) / WEIGHTS_FILE)


def read_quant_config(directory: str | os.PathLike) -> dict:
    """The quant_config.json of a saved checkpoint."""
    path = Path(directory) / CONFIG_FILE
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r} (this plmq reads {FORMAT})")
    return meta


def _untie(model: nn.Module, names: list[str]) -> None:
    """Give each module to be quantized its own weight if another module shares it."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name in names:
        m = model.get_submodule(name)
        if counts.get(id(m.weight), 0) > 1:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Convert an FP skeleton (same architecture) and load a save_quantized checkpoint."""
    meta = read_quant_config(directory)
    modules = meta["modules"]
    present = dict(model.named_modules())
    absent = [n for n in modules if n not in present]
    if absent:
        raise ValueError(f"checkpoint does not match the model: no module(s) {absent[:3]}")
    _untie(model, list(modules))
    convert_modules(model, list(modules), {n: QuantConfig.parse(i["config"]) for n, i in modules.items()})
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    for k, src in meta.get("aliases", {}).items():
        tensors[k] = tensors[src]  # loading the same values into a still-tied param is harmless
    qweights = set()
    for name, info in modules.items():
        m = model.get_submodule(name)
        if m.weight_q is None:
            continue
        dev, dt = m.weight.device, m.weight.dtype
        packed = tensors.pop(f"{name}.weight.packed")
        q = unpack_codes(packed, m.weight_q.spec, info["shape"]).to(dev)
        params = {k: tensors.pop(f"{name}.weight.{k}").to(dev, dt) for k in _STATE if f"{name}.weight.{k}" in tensors}
        w = m.weight_q.decode(q, params)
        m.weight_q.set_params(params["step"], params.get("zero_point"), params.get("threshold"))
        with torch.no_grad():
            m.weight.copy_(w.t() if info["transposed"] else w)
        qweights.add(f"{name}.weight")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in qweights and ".weight_q." not in f".{k}"]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")
    return model
