"""Stage `prequant-quantize`: PreQuant's task-agnostic step (Gong et al., Findings of ACL 2023).

Once per model x QuantConfig x criterion x budget: every Linear weight of the *pre-trained* model
is quantized (quantizer: per-row, per-group or per-tensor, min-max or MSE clipping; rounding:
nearest or GPTQ on unlabelled text) except r input columns per matrix that an outlier criterion
keeps FP; r follows from the budget. LoRA and BitFit start from the plain low-bit model (no FP
columns). The result (format `prequant`, no task head) is stored under `prequant.dir` in a folder
named by the stage key and reused by every task and every later run with the same inputs.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipelines import checkpoints, models
from pipelines.config import RunConfig
from pipelines.prequant_model import (
    PEFT_METHODS,
    artefact_criterion,
    needs_calibration,
    quant_name,
    quantize_pretrained,
)
from pipelines.stages.base import Context, Stage, StageResult, relative

KIND = "prequant-quantize"
TASK_CPUS = 1  # it quantizes (GPTQ, statistics) in its own Ray task


def stage_name(cfg: RunConfig, quant: str, method: str) -> str:
    """`prequant-quantize/<quant with quantizer>/<criterion|plain>`: methods that share a stored model share it."""
    return f"{KIND}/{quant_name(quant, cfg.prequant)}/{artefact_criterion(method, cfg.prequant) or 'plain'}"


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """One stage per stored model the PEFT methods of `prequant.methods` x `prequant.quant` start from;
    `checkpoint`: a pre-trained model folder to quantize instead of `model`."""
    stages: dict[str, Stage] = {}
    for quant in cfg.prequant.quant:
        for method in (m for m in cfg.prequant.methods if m in PEFT_METHODS):
            name = stage_name(cfg, quant, method)
            stages.setdefault(name, Stage(name, KIND, quant=quant, method=method, checkpoint=checkpoint))
    return list(stages.values())


def _model(cfg: RunConfig, stage: Stage) -> str:
    return stage.checkpoint or cfg.model


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    """What decides the stored model: the model (and a local folder's weights), quantizer, criterion,
    budget, seed, calibration text when read, head_modules, rounding."""
    pcfg, model = cfg.prequant, _model(cfg, stage)
    criterion = artefact_criterion(stage.method, pcfg)
    calib = None
    if needs_calibration(criterion, pcfg):
        calib = {"corpus": pcfg.calib_corpus, "samples": pcfg.calib_samples, "max_length": pcfg.calib_max_length}
    return {"model": models.identity(model),
            "quant": quant_name(stage.quant, pcfg), "criterion": criterion,
            "budget_pct": pcfg.budget_pct if criterion else None,
            "train_norms": pcfg.train_norms if criterion else False, "seed": pcfg.seed, "calib": calib,
            "head_modules": list(pcfg.head_modules), "gptq": pcfg.gptq}


def artefact_root(cfg: RunConfig, ctx: Context) -> Path:
    """Where stored models live: prequant.dir, default <run folder>/prequant."""
    return Path(cfg.prequant.dir).resolve() if cfg.prequant.dir else ctx.root / "prequant"


def _stored(directory: Path, key: str) -> dict | None:
    """The metadata of a finished stored model of this stage key, else None."""
    if not (directory / checkpoints.META_FILE).is_file():
        return None
    meta = checkpoints.read_meta(directory)
    return meta if meta.get("key") == key and meta["format"] == "prequant" else None


def run(cfg: RunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    directory = artefact_root(cfg, ctx) / ctx.key
    if ctx.force:
        shutil.rmtree(directory, ignore_errors=True)
    start, meta = time.time(), _stored(directory, ctx.key)
    reused = meta is not None
    if reused:
        print(f"[{KIND}] {directory} holds this stage's model; reusing it")
    else:
        criterion = artefact_criterion(stage.method, cfg.prequant)
        model, tokenizer, meta = quantize_pretrained(_model(cfg, stage), stage.quant, criterion, cfg.prequant)
        meta = {**meta, "key": ctx.key, "task_agnostic": True}
        checkpoints.save(model, tokenizer, directory, meta, fmt="prequant")
        print(f"[{KIND}] {meta['quant']}{' gptq' if meta['gptq'] else ''} {criterion or 'plain'}: "
              f"{meta['outlier_params']} outlier params ({meta['budget_pct_used']:.3f}% with reserved) -> {directory}")
    wall_s = time.time() - start
    packed = checkpoints.weight_bytes(directory)
    metrics = {"outlier_params": meta["outlier_params"], "budget_params": meta["budget_params"],
               "budget_pct_used": meta["budget_pct_used"], "packed_bytes": packed, "reused": float(reused),
               "wall_s": wall_s}
    info = {k: meta[k] for k in ("model", "quant", "criterion", "gptq", "budget_pct", "train_norms", "head_modules",
                                 "reserved_params", "body_params")}
    return StageResult(outputs=relative(directory, ctx.root), checkpoint=str(directory), metrics=metrics,
                       info={**info, **metrics, "directory": str(directory)}, resources={"cpus": 1, "gpus": 0})
