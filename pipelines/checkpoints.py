"""One checkpoint registry: every model plmq saves is a folder whose `plmq_meta.json` names its
format, and every folder loads through `load`.

Formats:
  fp        Hugging Face weights (safetensors), config and tokenizer (finetune)
  packed    low-bit codes packed densely + quant_config.json (rtn, mrem)
  prequant  packed low-bit weights + FP outlier columns (+ LoRA adapters) (prequant-quantize/-finetune)
  onnx      model.onnx with integer weights and QDQ inputs or MatMulNBits (export), run in ONNX Runtime or
            OpenVINO (meta["runtime"])
  compressed-tensors  a Hugging Face folder transformers and vLLM load (export)
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel

from pipelines import lora, models, runtimes
from pipelines.io import atomic_dir, write_json_atomic
from quant import load_quantized, prequant, save_quantized

META_FILE = "plmq_meta.json"


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: object
    meta: dict
    nbytes: int                                # bytes of the weight files on disk


@dataclass(frozen=True)
class Format:
    save: Callable[[PreTrainedModel, Path, dict], None]   # writes the weights into a folder
    load: Callable[[Path, dict], PreTrainedModel]          # a model with the same outputs as the saved one


def _save_fp(model: PreTrainedModel, directory: Path, meta: dict) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def _load_fp(directory: Path, meta: dict) -> PreTrainedModel:
    return models.from_pretrained(directory)


def _save_config(model: PreTrainedModel, directory: Path) -> None:
    """The HF config naming the model's own class as its architecture (as save_pretrained does), so that
    models.from_config rebuilds its head: a classifier made from a causal-LM checkpoint says so."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))


def _save_packed(model: PreTrainedModel, directory: Path, meta: dict) -> None:
    save_quantized(model, directory)
    _save_config(model, directory)


def _load_packed(directory: Path, meta: dict) -> PreTrainedModel:
    return load_quantized(models.from_config(models.model_config(directory)), directory)


def _save_prequant(model: PreTrainedModel, directory: Path, meta: dict) -> None:
    """meta["task_agnostic"]: the task head (prequant.head_names) is left out (a pre-quantized base that tasks
    fine-tune)."""
    head = functools.partial(prequant.is_head, model=model)
    prequant.save_prequantized(model, directory, drop=head if meta.get("task_agnostic") else None)
    _save_config(model, directory)


def _load_prequant(directory: Path, meta: dict) -> PreTrainedModel:
    """The head the saved config's architecture names (a causal LM or a classifier); meta["lora"] =
    {"ranks", "scaling"}: the LoRA adapters to rebuild; a task-agnostic base gets a fresh head."""
    model = models.from_config(models.model_config(directory))
    prequant.to_skeleton(model, directory)
    if meta.get("lora"):
        lora.apply_lora(model, meta["lora"]["ranks"], meta["lora"]["scaling"])
    head = functools.partial(prequant.is_head, model=model)
    return prequant.load_prequantized(model, directory, allow_missing=head if meta.get("task_agnostic") else None)


ONNX_FILE = "model.onnx"


def _save_onnx(model: PreTrainedModel, directory: Path, meta: dict) -> None:
    from quant.deploy.onnx import save_onnx  # torch.onnx: imported when a run exports

    save_onnx(model, runtimes.example_inputs(model), directory / ONNX_FILE, act_type=meta.get("act_type", "uint8"))
    _save_config(model, directory)


def _load_onnx(directory: Path, meta: dict) -> runtimes.OnnxModel:
    return runtimes.OnnxModel(directory / ONNX_FILE, meta.get("runtime", "onnxruntime"))


def _save_compressed_tensors(model: PreTrainedModel, directory: Path, meta: dict) -> None:
    from quant.deploy.compressed_tensors import save_compressed_tensors  # imported when a run exports

    save_compressed_tensors(model, directory)


FORMATS: dict[str, Format] = {
    "fp": Format(_save_fp, _load_fp),
    "packed": Format(_save_packed, _load_packed),
    "prequant": Format(_save_prequant, _load_prequant),
    "onnx": Format(_save_onnx, _load_onnx),
    "compressed-tensors": Format(_save_compressed_tensors, _load_fp),
}
EXPORTS = ("onnx", "compressed-tensors")  # formats other runtimes load


def write(model: PreTrainedModel, tokenizer, directory: str | Path, meta: dict, fmt: str = "fp") -> None:
    """Write `model` in format `fmt` with its tokenizer and metadata into `directory` (e.g. a Ray Train
    checkpoint folder); `save` is the atomic version."""
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint format {fmt!r}: use one of {', '.join(FORMATS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    FORMATS[fmt].save(model, directory, {**meta, "format": fmt})
    tokenizer.save_pretrained(str(directory))
    write_json_atomic(directory / META_FILE, {**meta, "format": fmt})


def save(model: PreTrainedModel, tokenizer, directory: str | Path, meta: dict, fmt: str = "fp") -> int:
    """Write `model` in format `fmt` with its tokenizer and metadata, atomically; returns the weights' bytes."""
    with atomic_dir(directory) as tmp:
        write(model, tokenizer, tmp, meta, fmt)
    return weight_bytes(directory)


def read_meta(directory: str | Path) -> dict:
    """The folder's `plmq_meta.json`, or an error that says what the folder should be."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a plmq checkpoint (no {META_FILE}); pass a model folder "
                                "written by a plmq stage (e.g. <output_dir>/<task>/finetune/model)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # a half-copied or hand-edited file
        raise ValueError(f"{path} is not valid JSON ({err}); copy the checkpoint folder again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object; copy the checkpoint folder again")
    if meta.get("format") not in FORMATS:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r} "
                         f"(known: {', '.join(FORMATS)})")
    return meta


def load(directory: str | Path) -> Loaded:
    """Any plmq checkpoint folder as (model in eval mode, tokenizer, metadata, bytes on disk)."""
    directory = Path(directory)
    meta = read_meta(directory)
    model = FORMATS[meta["format"]].load(directory, meta)
    return Loaded(model.eval(), AutoTokenizer.from_pretrained(str(directory)), meta, weight_bytes(directory))


def update_meta(directory: str | Path, **fields) -> dict:
    """Add fields known only after the save (e.g. training time) to a checkpoint's metadata."""
    path = Path(directory) / META_FILE
    meta = {**json.loads(path.read_text()), **fields}
    write_json_atomic(path, meta)
    return meta


def weight_bytes(directory: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.onnx) in a checkpoint folder."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.onnx") for f in Path(directory).glob(pattern))
