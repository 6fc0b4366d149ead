"""The packed pre-quantized model on disk: prequant.safetensors + prequant.json.

prequant.safetensors holds per OutlierLinear NAME its packed low-bit codes (NAME.weight.packed,
NAME.weight.step, ...), its FP outlier columns and their indices, and every other tensor of the
model as is. prequant.json lists the converted Linears (shape, number of FP columns, bias, bits,
QuantConfig), which is what `to_skeleton` rebuilds before `load_prequantized` fills in the weights.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .api import outlier_modules, replace_module
from .layer import OutlierLinear

WEIGHTS_FILE = "prequant.safetensors"  # not model.safetensors: HF from_pretrained must not half-load it
MANIFEST_FILE = "prequant.json"
FORMAT = "plmq-prequant-v2"


def _canonical(key: str) -> str:
    """peft's LoRA wrapper moves a layer to `<name>.base_layer`: store it under `<name>`."""
    return key.replace(".base_layer.", ".").removesuffix(".base_layer")


def save_prequantized(model: nn.Module, directory: str | os.PathLike, meta: dict | None = None,
                      drop: Callable[[str], bool] | None = None) -> int:
    """prequant.safetensors (packed low-bit weights, FP outlier columns and their indices, every
    other tensor as is, minus keys where `drop` is true) + prequant.json; returns the bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules, skip = {}, {}, set()
    for name, m in outlier_modules(model):
        c = _canonical(name)
        tensors.update({f"{c}.{k}": v for k, v in m.packed_state().items()})
        modules[c] = {"shape": [m.out_features, m.in_features], "outliers": m.num_outliers,
                      "bias": m.bias is not None, "bits": m.weight_q.spec.bits, "config": str(m.config)}
        skip.add(f"{name}.weight")
    if not modules:
        raise ValueError("model has no OutlierLinear layers (run prequantize first)")
    for k, v in model.state_dict().items():
        if k in skip or ".weight_q." in k or (drop and drop(_canonical(k))):
            continue
        tensors[_canonical(k)] = v.detach().cpu().clone()  # clone: safetensors refuses tied (shared) tensors
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    size = os.path.getsize(directory / WEIGHTS_FILE)
    manifest = {"format": FORMAT, **(meta or {}), "modules": modules, "bytes": size}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return size


def read_manifest(directory: str | os.PathLike) -> dict:
    """prequant.json of a saved model; raises on a missing file or another format."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no pre-quantized model ({MANIFEST_FILE} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r} (this plmq reads {FORMAT})")
    return manifest


def to_skeleton(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Replace the Linears listed in the manifest by empty OutlierLinears; returns the manifest."""
    manifest = read_manifest(directory)
    for name, info in manifest["modules"].items():
        out_f, in_f = info["shape"]
        replace_module(model, name, OutlierLinear(in_f, out_f, info["bias"], info["config"], info["outliers"]))
    return manifest


def load_prequantized(model: nn.Module, directory: str | os.PathLike,
                      allow_missing: Callable[[str], bool] | None = None) -> nn.Module:
    """Load save_prequantized's tensors into a skeleton (to_skeleton, then any peft wrapping).
    allow_missing(name): model tensors the file may lack (a fresh task head, new adapters)."""
    modules = read_manifest(directory)["modules"]
    packed: dict[str, dict[str, Tensor]] = {c: {} for c in modules}
    rest = {}
    for key, value in load_file(str(Path(directory) / WEIGHTS_FILE)).items():
        owner, sep, sub = key.partition(".weight.")
        if sep and owner in modules:
            packed[owner][f"weight.{sub}"] = value
        else:
            rest[key] = value
    actual = {_canonical(k): k for k in model.state_dict()}
    missing, unexpected = model.load_state_dict({actual.get(k, k): v for k, v in rest.items()}, strict=False)
    for name, m in outlier_modules(model):  # after outlier_idx is loaded
        m.load_packed(packed[_canonical(name)])
    frozen = {f"{c}.weight" for c in modules}
    missing = [k for k in missing if _canonical(k) not in frozen and ".weight_q." not in k
               and not (allow_missing and allow_missing(_canonical(k)))]
    if missing or unexpected:
        raise ValueError(f"{directory} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model
