"""Stage `prequant-finetune`: PreQuant's per-task step on Ray Train.

Loads the stored low-bit model of its prequant-quantize stage (or a user's `prequant` checkpoint),
adds a fresh task head and trains only the method's parameters (pipelines.prequant_model); exports
one low-bit model (format `prequant`, LoRA ranks in its metadata) and evaluates that export.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from pipelines import checkpoints, models
from pipelines.cluster import ensure_ray
from pipelines.config import ConfigError, RunConfig
from pipelines.data import tokenized_split
from pipelines.evaluation import evaluate_model, report_row
from pipelines.prequant_model import PEFT_METHODS, method_label, train_loop
from pipelines.stages import prequant_quantize
from pipelines.stages.base import Context, Stage, StageResult, input_checkpoint, relative
from pipelines.stages.finetune import train_resources
from pipelines.tasks import check_task
from pipelines.training import fit_to_dir
from quant import QuantConfig

KIND = "prequant-finetune"
QUIET = ("log_every", "lr")  # finetune settings that leave the result alone (prequant.lr is the lr)


def _check_checkpoint(checkpoint: str) -> dict:
    """A user's stored model: a task-agnostic `prequant` checkpoint (what prequant-quantize writes)."""
    meta = checkpoints.read_meta(checkpoint)
    if meta["format"] != "prequant" or not meta.get("task_agnostic"):
        raise ConfigError(f"{checkpoint}: prequant-finetune starts from a pre-quantized model written by "
                          f"prequant-quantize (format prequant, no task head), not a {meta['format']} checkpoint")
    return meta


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """One stage per task x QuantConfig x PEFT method, after the prequant-quantize stage of its stored model;
    `checkpoint`: a stored model to start every method from instead."""
    methods = [m for m in cfg.prequant.methods if m in PEFT_METHODS]

    def label(method: str, quant: str) -> str:
        return f"{method_label(method, cfg.prequant)}-{QuantConfig.parse(quant)}"
    if checkpoint:
        quant = _check_checkpoint(checkpoint)["quant"]
        return [Stage(f"prequant/{task}/{label(m, quant)}", KIND, task, quant, m, checkpoint=checkpoint)
                for task in cfg.tasks for m in methods]
    return [Stage(f"prequant/{task}/{label(m, q)}", KIND, task, q, m, (prequant_quantize.stage_name(cfg, q, m),))
            for q in cfg.prequant.quant for m in methods for task in cfg.tasks]


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    """Task, method, data, the fine-tune settings and the PreQuant ones that change the trained model."""
    pcfg = cfg.prequant
    ft = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if k not in QUIET}
    return {"task": stage.task, "method": stage.method, "quant": str(QuantConfig.parse(stage.quant)),
            "checkpoint": models.identity(stage.checkpoint) if stage.checkpoint else None,
            "data": dataclasses.asdict(cfg.data), "evaluate": dataclasses.asdict(cfg.evaluate), "finetune": ft,
            "prequant": {"lr": pcfg.lr, "budget_pct": pcfg.budget_pct, "train_norms": pcfg.train_norms,
                         "lora_scaling": pcfg.lora_scaling}}


def _train(cfg: RunConfig, stage: Stage, artefact: Path, ameta: dict, out: Path, ctx: Context) -> float:
    """Ray Train run `prequant-finetune-<key>` writing out/model; returns its wall time."""
    ft = dataclasses.replace(cfg.finetune, lr=cfg.prequant.lr)
    spec = check_task(stage.task)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker line is echoed twice
    ensure_ray()
    start = time.time()
    train_path = tokenized_split(stage.task, "train", models.load_tokenizer(ameta["model"]), cfg.data, seed=ft.seed)
    loop_cfg = {"key": ctx.key, "finetune": dataclasses.asdict(ft), "prequant": dataclasses.asdict(cfg.prequant),
                "model": ameta["model"], "task": stage.task, "num_labels": spec.num_labels,
                "train_path": str(train_path), "cpus_per_worker": ft.cpus_per_worker, "run_id": ctx.run_id,
                "tracking_uri": ctx.tracking_uri, "label": f"prequant-{stage.method}", "method": stage.method,
                "quant": ameta["quant"], "artefact": str(artefact), "act_calib_batches": max(1, 512 // ft.batch_size)}
    fit_to_dir(train_loop, loop_cfg, ft, out, f"{KIND}-{ctx.key}")
    return time.time() - start


def run(cfg: RunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    if stage.method not in PEFT_METHODS:
        raise ConfigError(f"method {stage.method!r}: prequant-finetune trains one of {', '.join(PEFT_METHODS)}")
    check_task(stage.task)
    artefact = Path(input_checkpoint(stage, upstream, prequant_quantize.KIND))
    ameta = _check_checkpoint(str(artefact))
    models.check_pooling(ameta["model"], cfg.finetune.pooling)
    out = ctx.root / stage.task / "prequant" / ctx.key
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "model" / checkpoints.META_FILE).is_file():  # written last, atomically: a finished model
        train_s = _train(cfg, stage, artefact, ameta, out, ctx)
        checkpoints.update_meta(out / "model", train_s=round(train_s, 1))
    start = time.time()
    loaded = checkpoints.load(out / "model")
    result = evaluate_model(loaded.model, loaded.tokenizer, stage.task, cfg.data, cfg.evaluate, loaded.nbytes)
    meta, res = loaded.meta, train_resources(cfg.finetune)
    wall_s = meta.get("train_s", 0.0) + time.time() - start
    label = f"{method_label(stage.method, cfg.prequant)}-{QuantConfig.parse(ameta['quant']).short_name()}"
    row = report_row(stage.task, label, result, wall_s, ameta["quant"], meta["trainable_pct"], res)
    numbers = {k: meta[k] for k in ("trainable_params", "trainable_pct", "optimizer_state_bytes", "peak_rss_mb",
                                    "steps")}
    metrics = {**numbers, **{f"eval_{k}": v for k, v in result.metrics.items()}, "packed_bytes": loaded.nbytes,
               "eval_examples_per_s": result.examples_per_s, "train_s": meta.get("train_s", 0.0), "wall_s": wall_s}
    info = {"method": stage.method, "quant_config": ameta["quant"], "artefact": str(artefact),
            "checkpoint": str(out / "model"), **metrics, "eval": dataclasses.asdict(result)}
    return StageResult(outputs=relative(out / "model", ctx.root), checkpoint=str(out / "model"), row=row,
                       metrics=metrics, info=info, resources=res)
