"""Stage `finetune`: full-precision fine-tuning of the model on one GLUE task with Ray Train; on a
language-modelling task it trains nothing and adopts the configured causal LM as it is.

The final model (format `fp`) is the reference for evaluation and the teacher of RTN and MREM.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time

import torch
from ray.train.torch import prepare_data_loader, prepare_model

from pipelines import checkpoints, models
from pipelines.config import FinetuneConfig, RunConfig
from pipelines.data import load_tokenized, tokenized_split
from pipelines.stages.base import Context, Stage, StageResult, relative
from pipelines.tasks import check_task
from pipelines.training import fit_to_dir, make_loader, make_optimizer, run_loop, train_needs

KIND = "finetune"
QUIET = ("log_every",)  # settings that do not change a trained model


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    return [Stage(f"finetune/{task}", KIND, task) for task in cfg.tasks]


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    if check_task(stage.task).kind == "lm":  # adopted as is: only the model (and a tiny preset's seed) decide it
        return {"task": stage.task, "model": models.identity(cfg.model), "adopt": {"seed": cfg.finetune.seed}}
    ft = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if k not in QUIET}
    return {"task": stage.task, "model": models.identity(cfg.model), "data": dataclasses.asdict(cfg.data),
            "finetune": ft}


def needs(cfg: RunConfig, stage: Stage) -> dict[str, float]:
    """What the stage's Ray Train workers hold while it runs (the DAG starts it when they fit); an LM task
    trains nothing."""
    if check_task(stage.task).kind == "lm":
        return {}
    return train_needs(cfg.finetune)


def train_resources(ft: FinetuneConfig) -> dict:
    """CPUs and GPUs the Ray Train workers of a fine-tune hold."""
    return {"cpus": ft.num_workers * ft.cpus_per_worker, "gpus": ft.num_workers if ft.use_gpu == "true" else 0}


def _setup(cfg: dict, ft: FinetuneConfig):
    tokenizer = models.load_tokenizer(cfg["model"])
    model = models.load_classifier(cfg["model"], cfg["num_labels"], seed=ft.seed, pooling=ft.pooling)
    loader = make_loader(cfg["train_path"], tokenizer, ft.batch_size, True, ft.seed)
    loader, model = prepare_data_loader(loader), prepare_model(model)
    total = max(1, math.ceil(ft.epochs * len(loader)))
    optimizer, scheduler = make_optimizer(model, ft, total)
    return tokenizer, model, loader, optimizer, scheduler, total


def _save(model, tokenizer, directory: str, meta: dict, optimizer) -> None:
    checkpoints.write(model, tokenizer, directory, meta, "fp")


def train_loop(cfg: dict) -> None:
    """Runs on each Ray Train worker; `cfg` is plain data (paths, numbers)."""
    run_loop(cfg, _setup, _save)


def adopt(cfg: RunConfig, stage: Stage, ctx: Context) -> StageResult:
    """An LM task's FP model: `cfg.model` as a causal LM (a tiny preset's random weights seeded by
    finetune.seed), written as the task's fp checkpoint; no training, no Ray Train."""
    start = time.time()
    out = ctx.root / check_task(stage.task).slug / "finetune" / "model"
    torch.manual_seed(cfg.finetune.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_causal_lm(cfg.model, vocab_size=len(tokenizer))
    meta = {"task": stage.task, "head": "causal-lm", "base_model": cfg.model, "adopted": True, "steps": 0,
            "config_key": ctx.key}
    nbytes = checkpoints.save(model, tokenizer, out, meta, fmt="fp")
    info = {"adopted": cfg.model, "steps": 0, "fp_bytes": nbytes, "wall_s": time.time() - start}
    return StageResult(outputs=relative(out, ctx.root), checkpoint=str(out), info=info,
                       metrics={"fp_bytes": nbytes, "wall_s": info["wall_s"]}, resources={"cpus": 1, "gpus": 0})


def run(cfg: RunConfig, stage: Stage, upstream: dict, ctx: Context) -> StageResult:
    task, ft = stage.task, cfg.finetune
    spec = check_task(task)
    if spec.kind == "lm":
        return adopt(cfg, stage, ctx)
    models.check_pooling(cfg.model, ft.pooling)
    out = ctx.root / task / "finetune"
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker line is echoed twice
    start = time.time()
    tokenizer = models.load_tokenizer(cfg.model)
    train_path = tokenized_split(task, "train", tokenizer, cfg.data, seed=ft.seed)
    loop_cfg = {"key": ctx.key, "finetune": dataclasses.asdict(ft), "model": cfg.model, "task": task,
                "num_labels": spec.num_labels, "train_path": str(train_path), "cpus_per_worker": ft.cpus_per_worker,
                "run_id": ctx.run_id, "tracking_uri": ctx.tracking_uri}
    result = fit_to_dir(train_loop, loop_cfg, ft, out, f"finetune-{task}-{ctx.key}")
    loss, wall_s = float(result.metrics.get("loss", float("nan"))), time.time() - start
    meta = checkpoints.update_meta(out / "model", final_loss=loss, wall_s=round(wall_s, 1))
    info = {"train_examples": len(load_tokenized(train_path)), "epochs": ft.epochs, "steps": meta["steps"],
            "final_loss": loss, "wall_s": wall_s, "train_s": meta.get("train_s"),
            "examples_per_s": meta.get("examples_per_s"), "device": meta.get("device"),
            "resumed_from_step": meta.get("resumed_from_step", 0)}
    return StageResult(outputs=relative(out / "model", ctx.root), checkpoint=str(out / "model"),
                       metrics={k: v for k, v in info.items() if isinstance(v, (int, float)) and k != "epochs"},
                       info=info,
                       resources=train_resources(ft))
