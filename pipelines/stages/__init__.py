"""Stage kinds: one module per kind, all of the shape described in `base`; REGISTRY maps kind -> module.

`plan(cfg)` is the whole pipeline of a config (what `plmq run` runs); `plan_kinds(cfg, kinds, checkpoint)`
is the plan of a single-stage verb (e.g. `plmq rtn CHECKPOINT`).
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from pipelines import checkpoints, models
from pipelines.config import RunConfig
from pipelines.errors import ConfigError
from pipelines.stages import (
    calibrate,
    evaluate,
    export,
    finetune,
    gptq,
    mrem,
    mrem_e2e,
    prequant_finetune,
    prequant_quantize,
    pretrain,
    pretrain_report,
    report,
    rtn,
)
from pipelines.stages.base import Context, Stage, StageResult
from pipelines.tasks import check_task

PIPELINE: tuple[ModuleType, ...] = (finetune, evaluate, rtn, gptq, calibrate, mrem, mrem_e2e, prequant_quantize,
                                    prequant_finetune)
REGISTRY: dict[str, ModuleType] = {m.KIND: m for m in (*PIPELINE, export, report, pretrain, pretrain_report)}

__all__ = ["REGISTRY", "Context", "Stage", "StageResult", "plan", "plan_kinds"]


def plan(cfg: RunConfig) -> list[Stage]:
    """Every stage of a config, dependencies first, and the report over them."""
    stages = [s for module in PIPELINE for s in module.plan(cfg)]
    stages += export.plan_after(cfg, stages)
    return stages + report.plan(cfg, stages)


def check_tasks(checkpoint: str, tasks: list[str]) -> None:
    """A checkpoint given to a verb answers only the tasks its head was trained for, so no verb scores or
    quantizes a head that learned nothing (a silently wrong number): a model fine-tuned on one GLUE task answers
    that task only; a causal LM every language-modelling task and no GLUE task; a classifier no LM task; a
    PreQuant base (its head left out) and a folder plmq did not write (nothing records a trained head) none."""
    models.check_model(checkpoint, "checkpoint")
    config = models.model_config(checkpoint)
    head = models.head_of(config)
    if not (Path(checkpoint) / checkpoints.META_FILE).is_file():
        raise ConfigError(_not_written_by_plmq(checkpoint, config, head, tasks))
    meta = checkpoints.read_meta(checkpoint)
    trained_on = meta.get("task")
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
        if kind == "glue":
            _check_glue_head(checkpoint, meta, config, task)


def _not_written_by_plmq(checkpoint: str, config, head: str, tasks: list[str]) -> str:
    """Why a Hugging Face folder without plmq_meta.json is refused, and how to use it instead."""
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    task = tasks[0]
    what = (f"it is a {arch} with no classifier head for the GLUE task {task}" if head == "causal-lm"
            and check_task(task).kind == "glue" else f"nothing records which task its {arch} head was trained for")
    return (f"{checkpoint} was not written by plmq (no {checkpoints.META_FILE}): {what}. To start from it, give it as "
            f"the model: plmq run --model {checkpoint} --task {task} (fine-tunes a classifier head on a GLUE task; "
            "adopts a causal LM as is on a language-modelling task)")


def _check_glue_head(checkpoint: str, meta: dict, config, task: str) -> None:
    """The checkpoint's classifier head was trained on `task`: its metadata names that task and its config a
    sequence classifier with the task's number of labels."""
    trained_on = meta.get("task")
    if meta.get("task_agnostic"):
        raise ConfigError(f"{checkpoint} is a PreQuant base (prequant-quantize): its task head is left out, so it "
                          f"has no trained head for {task}; run plmq prequant-finetune --task {task} to train one")
    if not trained_on:
        raise ConfigError(f"{checkpoint}: its {checkpoints.META_FILE} names no task, so nothing says its classifier "
                          f"head was trained for {task}; pass a model fine-tuned on {task} (plmq finetune --task "
                          f"{task} writes <output_dir>/{task}/finetune/model)")
    if task != trained_on:
        raise ConfigError(f"{checkpoint} was fine-tuned on {trained_on}, so its head does not answer {task}: "
                          f"pass --task {trained_on} (or a model fine-tuned on {task})")
    arch = (getattr(config, "architectures", None) or [""])[0]
    labels = check_task(task).num_labels
    if not arch.endswith("ForSequenceClassification") or config.num_labels != labels:
        raise ConfigError(f"{checkpoint}: its config.json describes {arch or 'no architecture'} with "
                          f"{config.num_labels} outputs, not the sequence classifier with {labels} of {task}; "
                          f"pass a model fine-tuned on {task}")


def plan_kinds(cfg: RunConfig, kinds: tuple[str, ...], checkpoint: str | None = None,
               with_report: bool = True) -> list[Stage]:
    """The stages of `kinds` only (a single-stage verb), reading `checkpoint` when given."""
    if checkpoint:
        check_tasks(checkpoint, cfg.tasks)
        meta = checkpoints.read_meta(checkpoint)
        if meta["format"] in checkpoints.EXPORTS and kinds != ("evaluate",):
            raise ConfigError(f"{checkpoint} is an export (format {meta['format']}) that its runtime runs: plmq "
                              f"evaluate takes it; to quantize or export again, give the plmq checkpoint it was "
                              f"written from ({meta.get('exported_from', 'see its plmq_meta.json')})")
    stages = [s for k in kinds for s in REGISTRY[k].plan(cfg, checkpoint)]
    names = {s.name for s in stages}
    missing = {d for s in stages for d in s.deps if d not in names}
    if missing:
        raise ValueError(f"stages {sorted(names)} need {sorted(missing)}, which this command does not run")
    return stages + (report.plan(cfg, stages) if with_report else [])
