"""Exports that other runtimes load: ONNX (ONNX Runtime, OpenVINO) and compressed-tensors (transformers, vLLM).

`problem(config, fmt)` says, from a QuantConfig alone, why a model quantized with it cannot be written in `fmt`
(None when it can), so a run refuses an export before any work starts.
"""
from __future__ import annotations

from ..config import QuantConfig

FORMATS = ("onnx", "compressed-tensors")


def _weight_problem(config: QuantConfig) -> str | None:
    w = config.weight
    if w is None:
        return "its weights are not quantized"
    if w.scheme == "binary" or not w.symmetric:
        return f"{'binary' if w.scheme == 'binary' else 'asymmetric'} weights have no integer kernel there"
    if config.output is not None:
        return "output quantizers (-o) are not exported"
    if w.bits not in (2, 4, 8):
        return f"{w.bits}-bit weights are not stored there (2, 4 or 8 bits are)"
    return None


def _act_problem(config: QuantConfig) -> str | None:
    a = config.act
    if a is not None and (a.bits != 8 or a.granularity != "tensor" or not a.symmetric):
        return "inputs must be static symmetric 8-bit per tensor"
    return None


def problem(config: QuantConfig | str, fmt: str) -> str | None:
    """Why `fmt` cannot hold a model quantized with `config`, or None."""
    config = QuantConfig.parse(config)
    if fmt not in FORMATS:
        return f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})"
    why = _weight_problem(config) or _act_problem(config)
    if why:
        return why
    w = config.weight
    if fmt == "onnx":
        if config.embedding is not None:
            return "quantized embeddings (-e) are not exported to ONNX"
        if config.act is not None and w.granularity != "channel":
            return f"{w.granularity} weights with int8 inputs have no integer kernel (per-channel weights do)"
        if config.act is None and w.scheme != "uniform":
            return "weight-only ternary weights have no MatMulNBits kernel"
        if w.granularity == "group" and (w.group_size < 16 or w.group_size & (w.group_size - 1)):
            return f"groups of {w.group_size}: MatMulNBits takes blocks of 16, 32, 64 or 128"
    elif w.granularity not in ("channel", "group"):
        return f"{w.granularity} weights are not stored there"
    return None


def working_formats(config: QuantConfig | str) -> list[str]:
    return [f for f in FORMATS if problem(config, f) is None]
