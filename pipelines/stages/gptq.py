"""Stage `gptq`: post-training GPTQ quantization (Frantar et al., ICLR 2023), beside `rtn`.

Loads a fine-tuned checkpoint (or an adopted causal LM), converts it with a QuantConfig onto RTN's grids and
rounds its Linears block by block on `gptq.calib_samples` calibration inputs (training examples; LM tasks:
random windows of the calibration text), calibrating activation ranges on the way (pipelines.gptq_model);
then exports the packed low-bit model and evaluates what was exported, as `rtn` does.
"""
from __future__ import annotations

import dataclasses
import shutil
import time

from pipelines import checkpoints
from pipelines.config import RunConfig
from pipelines.evaluation import calibration_batches, eval_metrics, evaluate_model, report_row
from pipelines.gptq_model import gptq_quantize
from pipelines.stages.base import Context, Stage, StageResult, export_folder, input_checkpoint, per_task_quant, relative
from pipelines.stages.rtn import quant_fragment
from pipelines.tasks import check_task
from quant import QuantConfig

KIND = "gptq"
TASK_CPUS = 1  # it quantizes and evaluates in its own Ray task
RESOURCES = {"cpus": 1, "gpus": 0}


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    return per_task_quant(KIND, cfg.tasks, cfg.gptq.quant, checkpoint)


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    return quant_fragment(cfg, stage, KIND)


def run(cfg: RunConfig, stage: Stage, upstream: dict, ctx: Context) -> StageResult:
    qcfg, g = QuantConfig.parse(stage.quant), cfg.gptq
    out = export_folder(ctx.root / check_task(stage.task).slug / "gptq" / str(qcfg), stage)
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    fp = checkpoints.load(input_checkpoint(stage, upstream))
    batches = list(calibration_batches(stage.task, fp.tokenizer, cfg.data, g.calib_samples, g.batch_size, g.seed))
    rep = gptq_quantize(fp.model, qcfg, batches, damp=g.damp, block_size=g.block_size)
    quant_s = time.time() - start
    packed = checkpoints.save(fp.model, fp.tokenizer, out, {**fp.meta, "method": "gptq", "quant": str(qcfg)},
                              "packed")
    exported = checkpoints.load(out)
    result = evaluate_model(exported.model, exported.tokenizer, stage.task, cfg.data, cfg.evaluate,
                            model_bytes=packed)
    wall_s = time.time() - start
    row = report_row(stage.task, f"gptq-{qcfg}", result, wall_s, str(qcfg), 0.0, RESOURCES)
    info = {"quant_config": str(qcfg), "packed_bytes": packed, "fp_bytes": fp.nbytes,
            "converted": len(rep.converted), "rounded": len(rep.rounded), "groups": rep.groups,
            "unreached": rep.unreached, "calib_samples": g.calib_samples, "calib_tokens": rep.tokens,
            "quantize_s": quant_s, "wall_s": wall_s, "eval": dataclasses.asdict(result)}
    metrics = {**eval_metrics(result), "packed_bytes": packed, "fp_bytes": fp.nbytes,
               "converted_layers": len(rep.converted), "rounded_layers": len(rep.rounded), "quantize_s": quant_s,
               "wall_s": wall_s}
    return StageResult(outputs=relative(out, ctx.root), checkpoint=str(out), row=row, metrics=metrics, info=info,
                       resources=RESOURCES)
