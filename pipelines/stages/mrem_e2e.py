"""Stage `mrem-e2e`: after an MREM stage, its model's quantizer steps trained end to end (mrem.e2e).

The weights stay the integer codes MREM chose; every static step (weights and inputs) learns from the whole
model's loss (pipelines.e2e_model): the KL divergence to the FP teacher's outputs, or the task's labels. Ray
Train runs it, data-parallel on mrem.e2e.workers workers of MREM's per-actor resources; the tuned model is saved
packed and evaluated, beside the figure of the MREM model it started from.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from pipelines import checkpoints
from pipelines.cluster import actor_resources, ensure_ray, workers_need
from pipelines.config import FinetuneConfig, RunConfig
from pipelines.config_dict import to_dict
from pipelines.e2e_model import train_loop
from pipelines.evaluation import eval_metrics, evaluate_model, report_row, task_fragment
from pipelines.stages import mrem
from pipelines.stages.base import Context, Stage, StageResult, export_folder, relative, upstream_of
from pipelines.training import fit_to_dir
from quant import QuantConfig

KIND = "mrem-e2e"
QUIET = ("log_every",)  # settings that leave the result alone


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """One stage after each MREM stage when mrem.e2e.enabled."""
    if not cfg.mrem.e2e.enabled:
        return []
    return [dataclasses.replace(s, name=f"{KIND}/{s.name.split('/', 1)[1]}", kind=KIND, deps=(s.name,))
            for s in mrem.plan(cfg, checkpoint)]


def workers(cfg: RunConfig) -> int:
    """Data-parallel workers: mrem.e2e.workers, else as many as MREM had module actors (free once it is done)."""
    return cfg.mrem.e2e.workers or cfg.mrem.modules or 1


def needs(cfg: RunConfig, stage: Stage) -> dict[str, float]:
    return workers_need(actor_resources(cfg.mrem), workers(cfg))


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    e2e = {k: v for k, v in to_dict(cfg.mrem.e2e).items() if k not in QUIET}
    return {"task": stage.task, **task_fragment(stage.task), "quant": str(QuantConfig.parse(stage.quant)),
            "e2e": {**e2e, "workers": workers(cfg)}, "data": to_dict(cfg.data), "evaluate": to_dict(cfg.evaluate)}


def _finetune_config(cfg: RunConfig) -> FinetuneConfig:
    """The shared Ray Train loop's settings: the global batch split over the workers, no weight decay."""
    e, n = cfg.mrem.e2e, workers(cfg)
    return FinetuneConfig(epochs=e.epochs, batch_size=max(1, e.batch_size // n), lr=e.lr, weight_decay=0.0,
                          warmup_ratio=e.warmup_ratio, seed=e.seed, num_workers=n, use_gpu=cfg.mrem.use_gpu,
                          cpus_per_worker=cfg.mrem.cpus_per_actor, log_every=e.log_every)


def _train(cfg: RunConfig, stage: Stage, source: dict, out: Path, ctx: Context) -> float:
    """Ray Train run `mrem-e2e-<key>` writing out/model; returns its wall time."""
    ft, start = _finetune_config(cfg), time.time()
    meta = checkpoints.read_meta(source["checkpoint"])
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker line is echoed twice
    ensure_ray()
    loop_cfg = {"key": ctx.key, "finetune": dataclasses.asdict(ft), "task": stage.task, "data": to_dict(cfg.data),
                "student": source["checkpoint"], "teacher": source["info"]["teacher"], "loss": cfg.mrem.e2e.loss,
                "samples": cfg.mrem.e2e.samples, "model": meta.get("base_model"), "num_labels": meta.get("num_labels"),
                "meta": {**meta, "method": f"{meta.get('method', 'mrem')}+e2e"}, "cpus_per_worker": ft.cpus_per_worker,
                "run_id": ctx.run_id, "tracking_uri": ctx.tracking_uri, "label": KIND}
    fit_to_dir(train_loop, loop_cfg, ft, out, f"{KIND}-{ctx.key}")
    return time.time() - start


def run(cfg: RunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    """Tune the MREM model's steps on Ray Train, evaluate the packed result beside the MREM model's figure."""
    cfg.mrem.e2e.validate()
    source, quant = upstream_of(upstream, mrem.KIND), str(QuantConfig.parse(stage.quant))
    out = export_folder(Path(ctx.root) / stage.task / KIND / f"{quant}-{cfg.mrem.mode}", stage) / ctx.key
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "model" / checkpoints.META_FILE).is_file():  # written last, atomically: a finished model
        checkpoints.update_meta(out / "model", train_s=round(_train(cfg, stage, source, out, ctx), 1))
    start = time.time()
    loaded = checkpoints.load(out / "model")
    result = evaluate_model(loaded.model, loaded.tokenizer, stage.task, cfg.data, cfg.evaluate, loaded.nbytes)
    n = workers(cfg)
    resources = {"cpus": n * cfg.mrem.cpus_per_actor, "gpus": n * actor_resources(cfg.mrem).num_gpus}
    train_s = loaded.meta.get("train_s", 0.0)
    wall_s = train_s + time.time() - start
    before = source["row"]
    row = report_row(stage.task, f"mrem-{cfg.mrem.mode}+e2e-{quant}", result, wall_s, quant, 0.0, resources)
    info = {"quant_config": quant, "mode": cfg.mrem.mode, "checkpoint": str(out / "model"), "workers": n,
            "steps": loaded.meta.get("steps"), "train_s": train_s, "wall_s": round(wall_s, 2),
            "teacher": source["info"]["teacher"], "before": {"value": before["value"], "eval": source["info"]["eval"]},
            "eval": dataclasses.asdict(result)}
    metrics = {"train_s": train_s, "wall_s": wall_s, "packed_bytes": loaded.nbytes, "value_before": before["value"],
               "steps": float(loaded.meta.get("steps") or 0), **eval_metrics(result)}
    return StageResult(outputs=relative(out / "model", Path(ctx.root)), checkpoint=str(out / "model"), row=row,
                       metrics=metrics, info=info, resources=resources)
