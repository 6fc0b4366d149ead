"""Stage `rtn`: post-training round-to-nearest quantization, the floor MREM and PreQuant must beat.

Loads a fine-tuned checkpoint, converts it with a QuantConfig, calibrates the activation ranges on
`rtn.calib_samples` training examples (LM tasks: random windows of the calibration text), exports the packed
low-bit model and evaluates what was exported (so the reported size and metric belong together).
"""
from __future__ import annotations

import dataclasses
import shutil
import time

from pipelines import checkpoints, models
from pipelines.config import RunConfig
from pipelines.evaluation import (
    calibration_batches,
    eval_metrics,
    evaluate_model,
    quantize_rtn,
    report_row,
    task_fragment,
)
from pipelines.stages.base import Context, Stage, StageResult, export_folder, input_checkpoint, per_task_quant, relative
from pipelines.tasks import check_task
from quant import QuantConfig

KIND = "rtn"
TASK_CPUS = 1  # it quantizes and evaluates in its own Ray task
RESOURCES = {"cpus": 1, "gpus": 0}


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    return per_task_quant(KIND, cfg.tasks, cfg.rtn.quant, checkpoint)


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    return quant_fragment(cfg, stage, KIND)


def quant_fragment(cfg: RunConfig, stage: Stage, section: str) -> dict:
    """What decides a one-shot quantization stage (rtn, gptq): the task and its texts, a user checkpoint by its
    weights, the data, the evaluation and the config section `section` with the stage's QuantConfig."""
    given = {"checkpoint": models.identity(stage.checkpoint)} if stage.checkpoint else {}
    settings = {**dataclasses.asdict(getattr(cfg, section)), "quant": str(QuantConfig.parse(stage.quant))}
    return {"task": stage.task, **task_fragment(stage.task), **given, "data": dataclasses.asdict(cfg.data),
            "evaluate": dataclasses.asdict(cfg.evaluate), section: settings}


def run(cfg: RunConfig, stage: Stage, upstream: dict, ctx: Context) -> StageResult:
    qcfg = QuantConfig.parse(stage.quant)
    source = input_checkpoint(stage, upstream)
    out = export_folder(ctx.root / check_task(stage.task).slug / "rtn" / str(qcfg), stage)
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    fp = checkpoints.load(source)
    batches = calibration_batches(stage.task, fp.tokenizer, cfg.data, cfg.rtn.calib_samples, cfg.rtn.batch_size,
                                  cfg.rtn.seed)
    converted = quantize_rtn(fp.model, qcfg, batches)
    packed = checkpoints.save(fp.model, fp.tokenizer, out, {**fp.meta, "method": "rtn", "quant": str(qcfg)},
                              "packed")
    exported = checkpoints.load(out)
    result = evaluate_model(exported.model, exported.tokenizer, stage.task, cfg.data, cfg.evaluate,
                            model_bytes=packed)
    wall_s = time.time() - start
    row = report_row(stage.task, f"rtn-{qcfg}", result, wall_s, str(qcfg), 0.0, RESOURCES)
    info = {"quant_config": str(qcfg), "packed_bytes": packed, "fp_bytes": fp.nbytes, "converted": converted,
            "calib_samples": cfg.rtn.calib_samples, "wall_s": wall_s, "eval": dataclasses.asdict(result)}
    metrics = {**eval_metrics(result), "packed_bytes": packed, "fp_bytes": fp.nbytes, "converted_layers": converted,
               "wall_s": wall_s}
    return StageResult(outputs=relative(out, ctx.root), checkpoint=str(out), row=row, metrics=metrics, info=info,
                       resources=RESOURCES)
