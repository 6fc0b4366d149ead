"""Stage `rtn`: post-training round-to-nearest quantization, the floor MREM and PreQuant must beat.

Loads a fine-tuned checkpoint, converts it with a QuantConfig, calibrates the
activation ranges on N training samples, exports the packed low-bit model and
evaluates what was exported (so the reported size and metric belong together).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import models
from pipelines.config import DataConfig, EvaluateConfig, RtnConfig
from pipelines.data import tokenized_split
from pipelines.evaluate import EvalResult, evaluate_model
from pipelines.finetune import make_loader
from quant import QuantConfig, calibrate, load_quantized, model_bytes, quantize_model, save_quantized


@dataclass
class RtnResult:
    quant_config: str
    checkpoint: str          # folder with the packed model, HF config and tokenizer
    packed_bytes: int
    fp_bytes: int
    converted: int
    calib_samples: int
    eval: EvalResult
    wall_s: float


def calibration_batches(task: str, tokenizer, data: DataConfig, n: int, batch_size: int, seed: int = 0):
    """The first `n` shuffled training examples of `task`, as model-input batches."""
    calib = dataclasses.replace(data, train_examples=n)
    loader = make_loader(str(tokenized_split(task, "train", tokenizer, calib, seed=seed)), tokenizer,
                         batch_size, shuffle=False, seed=seed)
    for batch in loader:
        batch.pop("labels")
        yield batch


@torch.no_grad()
def quantize_rtn(model: torch.nn.Module, qcfg: QuantConfig, batches) -> int:
    """Convert in place and calibrate activation ranges; returns the number of layers converted."""
    report = quantize_model(model, qcfg)
    model.eval()
    with calibrate(model):
        for batch in batches:
            model(**batch)
    return len(report.converted)


def save_packed_checkpoint(model, tokenizer, directory: Path, meta: dict) -> int:
    """Packed weights + quant config + HF config + tokenizer, written atomically; returns bytes."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_quantized(model, tmp)
    model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / models.META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return model_bytes(directory)


def load_packed_checkpoint(directory: str | Path):
    """A packed checkpoint back as a quantized model (same outputs as before export)."""
    from transformers import AutoTokenizer

    skeleton = models.classifier_from_config(models.model_config(directory))
    return load_quantized(skeleton, directory), AutoTokenizer.from_pretrained(str(directory))


def rtn(checkpoint: str | Path, task: str, quant: str, data: DataConfig, cfg: RtnConfig,
        eval_cfg: EvaluateConfig, output_dir: str | Path) -> RtnResult:
    """Quantize a fine-tuned checkpoint with RTN, export it packed, evaluate the export."""
    cfg.validate()
    qcfg = QuantConfig.parse(quant)  # bad strings fail here, before any work
    start = time.time()
    model, tokenizer, meta = models.load_checkpoint(checkpoint)
    fp_bytes = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    batches = calibration_batches(task, tokenizer, data, cfg.calib_samples, cfg.batch_size, cfg.seed)
    converted = quantize_rtn(model, qcfg, batches)
    out = Path(output_dir) / str(qcfg)
    packed = save_packed_checkpoint(model, tokenizer, out, {**meta, "method": "rtn", "quant": str(qcfg)})
    qmodel, _ = load_packed_checkpoint(out)
    result = evaluate_model(qmodel, tokenizer, task, data, eval_cfg, model_bytes=packed)
    return RtnResult(str(qcfg), str(out), packed, fp_bytes, converted, cfg.calib_samples, result,
                     time.time() - start)
