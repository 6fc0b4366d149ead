"""Stage `evaluate`: GLUE dev metrics, or perplexity on a language-modelling task, of a model folder of any
format (checkpoints.load)."""
from __future__ import annotations

import dataclasses
import time

from pipelines import checkpoints, models
from pipelines.config import RunConfig
from pipelines.evaluation import eval_metrics, evaluate_model, report_row, task_fragment
from pipelines.stages.base import Context, Stage, StageResult, input_checkpoint, upstream_of

KIND = "evaluate"
TASK_CPUS = 1  # it evaluates in its own Ray task


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """The FP model of each task after its fine-tune, or a given model folder."""
    if checkpoint:
        return [Stage(f"evaluate/{t}/checkpoint", KIND, t, checkpoint=checkpoint) for t in cfg.tasks]
    return [Stage(f"evaluate/{t}/fp", KIND, t, deps=(f"finetune/{t}",)) for t in cfg.tasks]


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    given = {"checkpoint": models.identity(stage.checkpoint)} if stage.checkpoint else {}
    return {"task": stage.task, **task_fragment(stage.task), **given, "data": dataclasses.asdict(cfg.data),
            "evaluate": dataclasses.asdict(cfg.evaluate)}


def run(cfg: RunConfig, stage: Stage, upstream: dict, ctx: Context) -> StageResult:
    start = time.time()
    loaded = checkpoints.load(input_checkpoint(stage, upstream))
    result = evaluate_model(loaded.model, loaded.tokenizer, stage.task, cfg.data, cfg.evaluate,
                            model_bytes=loaded.nbytes)
    eval_s = time.time() - start
    quant = loaded.meta.get("quant") if stage.checkpoint else None
    if stage.checkpoint:  # a quantized checkpoint or export says so (bits; the runtime that ran an export)
        runtime = {"onnx": "@" + loaded.meta.get("runtime", "onnxruntime"), "compressed-tensors": "@transformers"}
        method = "checkpoint" + runtime.get(loaded.meta["format"], "")
        wall_s, resources = eval_s, {"cpus": 1, "gpus": 0}
    else:  # the FP reference's cost is its fine-tune's
        ft = upstream_of(upstream, "finetune")
        method, wall_s, resources = "fp", ft["info"]["wall_s"] + eval_s, ft["resources"]
    row = report_row(stage.task, method, result, wall_s, quant, 0.0 if quant else 100.0, resources)
    return StageResult(row=row, metrics=eval_metrics(result), info=dataclasses.asdict(result),
                       resources={"cpus": 1, "gpus": 0})
