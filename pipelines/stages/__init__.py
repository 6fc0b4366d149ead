"""Stage kinds: one module per kind, all of the shape described in `base`; REGISTRY maps kind -> module.

`plan(cfg)` is the whole pipeline of a config (what `plmq run` runs); `plan_kinds(cfg, kinds, checkpoint)`
is the plan of a single-stage verb (e.g. `plmq rtn CHECKPOINT`).
"""
from __future__ import annotations

from types import ModuleType

from pipelines import checkpoints, models
from pipelines.config import RunConfig
from pipelines.errors import ConfigError
from pipelines.stages import (
    calibrate,
    evaluate,
    finetune,
    gptq,
    mrem,
    prequant_finetune,
    prequant_quantize,
    pretrain,
    pretrain_report,
    report,
    rtn,
)
from pipelines.stages.base import Context, Stage, StageResult
from pipelines.tasks import check_task

PIPELINE: tuple[ModuleType, ...] = (finetune, evaluate, rtn, gptq, calibrate, mrem, prequant_quantize,
                                    prequant_finetune)
REGISTRY: dict[str, ModuleType] = {m.KIND: m for m in (*PIPELINE, report, pretrain, pretrain_report)}

__all__ = ["REGISTRY", "Context", "Stage", "StageResult", "plan", "plan_kinds"]


def plan(cfg: RunConfig) -> list[Stage]:
    """Every stage of a config, dependencies first, and the report over them."""
    stages = [s for module in PIPELINE for s in module.plan(cfg)]
    return stages + report.plan(cfg, stages)


def check_tasks(checkpoint: str, tasks: list[str]) -> None:
    """A model fine-tuned on one GLUE task is not scored or quantized for another: its head answers that task.
    A causal LM answers every language-modelling task and no GLUE task; a classifier no LM task."""
    trained_on = checkpoints.read_meta(checkpoint).get("task")
    head = models.head_of(models.model_config(checkpoint))
    for task in tasks:
        kind = check_task(task).kind
        if kind == "lm" and head != "causal-lm":
            raise ConfigError(f"{checkpoint} is a classifier (fine-tuned on {trained_on}): it predicts no tokens, so "
                              f"it cannot be scored on the language-modelling task {task}; pass a causal LM "
                              f"checkpoint (e.g. <output_dir>/{check_task(task).slug}/finetune/model of an LM run)")
        if kind == "glue" and head == "causal-lm":
            raise ConfigError(f"{checkpoint} is a causal language model: it has no classifier head for the GLUE "
                              f"task {task}; pass --task with a language-modelling task (e.g. wikitext2), or a "
                              f"model fine-tuned on {task}")
        if kind == "glue" and trained_on and task != trained_on:
            raise ConfigError(f"{checkpoint} was fine-tuned on {trained_on}, so its head does not answer {task}: "
                              f"pass --task {trained_on} (or a model fine-tuned on {task})")


def plan_kinds(cfg: RunConfig, kinds: tuple[str, ...], checkpoint: str | None = None,
               with_report: bool = True) -> list[Stage]:
    """The stages of `kinds` only (a single-stage verb), reading `checkpoint` when given."""
    if checkpoint:
        check_tasks(checkpoint, cfg.tasks)
    stages = [s for k in kinds for s in REGISTRY[k].plan(cfg, checkpoint)]
    names = {s.name for s in stages}
    missing = {d for s in stages for d in s.deps if d not in names}
    if missing:
        raise ValueError(f"stages {sorted(names)} need {sorted(missing)}, which this command does not run")
    return stages + (report.plan(cfg, stages) if with_report else [])
