"""Stage `mrem`: module-wise reconstruction error minimisation on Ray actors.

The fine-tuned model is split into K modules (the calibrate stage recorded the teacher's
activations at their boundaries); one `ModuleTrainer` actor per module (one GPU each when the
cluster has GPUs, or a share of one: mrem.gpus_per_actor) reads its shards from the object store
and trains its quantized module:
- parallel (MREM-P): all modules at once; module k's student input mixes the teacher's input
  with module k-1's quantized outputs, which k-1 pushes to k directly (annealed teacher forcing);
- sequential (MREM-S): module k starts after k-1, fed k-1's quantized outputs;
- rem: the whole model as one module.
Module checkpoints live in `<out>/modules-<stage key>/`: a restarted actor, or the stage run again
under the same key, resumes them. The trained modules are assembled, exported packed and evaluated.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray.util.placement_group import remove_placement_group

from actors import fleet
from actors.module_trainer import TrainerSettings
from pipelines import calibration, checkpoints
from pipelines.calibration import ActivationCache
from pipelines.cluster import WorkerResources, actor_resources, ensure_ray, spread_placement, workers_need
from pipelines.config import ConfigError, MremConfig, RunConfig
from pipelines.config_dict import to_dict
from pipelines.evaluation import (
    EvalResult,
    calibration_batches,
    eval_metrics,
    evaluate_model,
    quantize_rtn,
    report_row,
    task_fragment,
)
from pipelines.reconstruction import assemble, boundary_errors
from pipelines.stages import calibrate
from pipelines.stages.base import Context, Stage, StageResult, export_folder, input_checkpoint, relative, upstream_of
from pipelines.tracking import RunLogger
from quant import QuantConfig

KIND = "mrem"
TASK_CPUS = 0  # its module actors ask for their own resources
QUIET = {"log_every", "placement_timeout_s", "max_restarts", "cache_dir", "gpus_per_actor",  # not the result
         "e2e"}  # the next stage's
MODULE_METRICS = ("steps", "initial_error", "final_error", "wall_s", "s_per_step", "peak_rss_mb", "model_mb",
                  "pushed_bytes",
                  "pulled_bytes", "resumed_from_step", "repeated_batches", "waited_for_predecessor_s")


def _canonical(quant: str) -> str:
    return str(QuantConfig.parse(quant))


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """One stage per task and QuantConfig, after the task's calibration and (from a config) fine-tuning;
    on a user `checkpoint` after the calibrate stage `calibrate.plan(cfg, checkpoint)` plans."""
    stages: list[Stage] = []
    for task in cfg.tasks:
        deps = (calibrate.name(task),) if checkpoint else (f"finetune/{task}", calibrate.name(task))
        stages += [Stage(f"{KIND}/{task}/{_canonical(q)}-{cfg.mrem.mode}", KIND, task, q, deps=deps,
                         checkpoint=checkpoint) for q in cfg.mrem.quant]
    return stages


def needs(cfg: RunConfig, stage: Stage) -> dict[str, float]:
    """What the stage's module actors hold while it runs (the DAG starts it when they fit)."""
    return workers_need(actor_resources(cfg.mrem), cfg.mrem.modules or 1)


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    """The QuantConfig, the mrem settings that change the trained model, the data and the evaluation."""
    mrem = {k: v for k, v in to_dict(cfg.mrem).items() if k not in QUIET}
    mrem.update(quant=None, modules=calibrate.configured_modules(cfg))
    return {"task": stage.task, **task_fragment(stage.task), "quant": _canonical(stage.quant),
            "data": to_dict(cfg.data), "evaluate": to_dict(cfg.evaluate), "mrem": mrem}


def settings(cfg: MremConfig, cpus: int, num_samples: int) -> TrainerSettings:
    """The module trainers' settings for `num_samples` calibration samples: the step budget (mrem.steps, else
    max_passes over the rows trained on), the held-out rows, the earliest stop, teacher forcing's length and how
    long a fed MREM-P module may train past the budget on its predecessor's final outputs."""
    holdout = min(cfg.holdout_samples, num_samples // 4) if cfg.converge else 0
    if num_samples - holdout < cfg.batch_size:
        raise ConfigError(f"mrem: {num_samples} calibration samples ({holdout} held out) are fewer than "
                          f"mrem.batch_size={cfg.batch_size}; raise mrem.calib_samples or lower the batch size")
    per_pass = math.ceil((num_samples - holdout) / cfg.batch_size)
    steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.max_passes * per_pass)
    min_steps = min(math.ceil(cfg.min_passes * per_pass), steps)
    settle = cfg.patience * cfg.check_every if cfg.converge and cfg.steps is None else 0
    t0 = cfg.teacher_forcing_steps
    if t0 is None:
        t0 = min_steps if cfg.converge else steps // 2
    return TrainerSettings(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_quant=cfg.lr_quant,
                           teacher_forcing_steps=t0, checkpoint_every=cfg.checkpoint_every,
                           queue_size=cfg.queue_size, log_every=cfg.log_every, eval_samples=cfg.eval_samples,
                           seed=cfg.seed, num_threads=cpus, student_dropout=cfg.student_dropout,
                           converge=cfg.converge, min_steps=min_steps, check_every=cfg.check_every,
                           patience=cfg.patience, tolerance=cfg.tolerance, lr_decay=cfg.lr_decay, holdout=holdout,
                           settle_steps=settle)


def run(cfg: RunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    """Load the calibration shards, train the modules on actors, assemble, export packed, evaluate."""
    m, start = cfg.mrem, time.time()
    m.validate()
    quant, checkpoint = _canonical(stage.quant), input_checkpoint(stage, upstream)
    out = export_folder(Path(ctx.root) / stage.task / KIND / f"{quant}-{m.mode}", stage)
    work_dir = out / f"modules-{ctx.key}"
    if ctx.force:
        shutil.rmtree(work_dir, ignore_errors=True)
    ensure_ray()
    cal = upstream_of(upstream, calibrate.KIND)
    cache = calibration.load_into_store(calibrate.cache_folder(cal, Path(ctx.root)))
    load_s = time.time() - start
    res = actor_resources(m)
    stats, states, train_s = train(m, checkpoint, quant, cache, work_dir, res, ctx, f"{quant}-{m.mode}")
    for s in stats:
        if s["restarted"] or s["resumed_from_step"]:
            again = " after a restart" if s["restarted"] else ""
            print(f"[mrem {stage.task}] module {s['module']} resumed from step {s['resumed_from_step']}{again}")
    result, packed, errors = export_and_evaluate(cfg, stage, quant, checkpoint, states, cache, out / "model")
    wall_s = time.time() - start
    resources = {"cpus": len(stats) * res.num_cpus, "gpus": len(stats) * res.num_gpus}
    restarts = sum(bool(s["restarted"]) for s in stats)
    info = {"quant_config": quant, "mode": m.mode, "modules": len(stats), "checkpoint": str(out / "model"),
            "teacher": checkpoint,
            "packed_bytes": packed, "calib_samples": cache.num_samples, "calib_bytes": cache.nbytes,
            "calib_s": cal["info"].get("calib_s", 0.0), "load_s": round(load_s, 2), "train_s": round(train_s, 2),
            "wall_s": round(wall_s, 2), "restarts": restarts, "chain_errors": errors[0], "rtn_chain_errors": errors[1],
            "steps": [s["steps"] for s in stats], "stop_reasons": [s["stop_reason"] for s in stats],
            "modules_stats": stats, "eval": dataclasses.asdict(result)}
    metrics = {"packed_bytes": packed, "calib_bytes": cache.nbytes, "calib_s": info["calib_s"], "load_s": load_s,
               "train_s": train_s, "wall_s": wall_s, "restarts": restarts, **eval_metrics(result)}
    for k, (mrem_err, rtn_err) in enumerate(zip(*errors)):
        metrics.update({f"module{k}_error": mrem_err, f"module{k}_rtn_error": rtn_err,
                        f"module{k}_steps": stats[k]["steps"]})
    row = report_row(stage.task, f"mrem-{m.mode}-{quant}", result, wall_s, quant, 0.0, resources)
    return StageResult(outputs=relative(out / "model", Path(ctx.root)), checkpoint=str(out / "model"), row=row,
                       metrics=metrics, info=info, resources=resources)


def train(m: MremConfig, checkpoint: str, quant: str, cache: ActivationCache, work_dir: Path,
          res: WorkerResources, ctx: Context, tag: str) -> tuple[list[dict], list[dict], float]:
    """Start one actor per module on a spread placement group, train them, take their states; the
    actors and the placement group are released whatever happens. Returns (stats, states, train_s)."""
    run_ids = module_runs(ctx, len(cache.specs), tag)
    loggers = [RunLogger(ctx.tracking_uri, r) if r else None for r in run_ids]
    options = {**res.as_options(), "max_restarts": m.max_restarts, "max_task_retries": m.max_restarts}
    requested_at = time.time()
    pg = spread_placement(res, len(cache.specs), m.placement_timeout_s)
    trainers: list = []
    try:
        trainers = fleet.launch(cache.specs, checkpoint, quant, settings(m, res.num_cpus, cache.num_samples), cache,
                                str(work_dir), ctx.key, m.mode, options, pg, loggers, res.torch_device)
        t0 = time.time()
        stats = fleet.train(trainers, m.mode)
        train_s = time.time() - t0
        states = fleet.export(trainers)
    finally:
        fleet.stop(trainers)
        remove_placement_group(pg)
    for s in stats:  # how long the actors waited for resources (nodes an autoscaler had to add)
        s["wait_s"] = round(s["started_at"] - requested_at, 2)
    finish_module_runs(ctx, run_ids, stats)
    return stats, states, train_s


def export_and_evaluate(cfg: RunConfig, stage: Stage, quant: str, checkpoint: str, states: list[dict],
                        cache: ActivationCache, directory: Path) -> tuple[EvalResult, int, tuple[list, list]]:
    """Assemble the trained modules, measure each module's error against RTN's, save the packed
    model and evaluate what was saved. Returns (evaluation, packed bytes, (mrem errors, rtn errors))."""
    teacher = checkpoints.load(checkpoint)
    model = assemble(copy.deepcopy(teacher.model), quant, states)
    rtn_model = copy.deepcopy(teacher.model)
    def batches() -> Iterator[dict]:
        return calibration_batches(stage.task, teacher.tokenizer, cfg.data, cfg.mrem.eval_samples, 32)

    quantize_rtn(rtn_model, QuantConfig.parse(quant), batches())
    errors = (boundary_errors(model, teacher.model, cache.specs, batches()),
              boundary_errors(rtn_model, teacher.model, cache.specs, batches()))
    meta = {**teacher.meta, "method": f"mrem-{cfg.mrem.mode}", "quant": quant}
    packed = checkpoints.save(model, teacher.tokenizer, directory, meta, fmt="packed")
    saved = checkpoints.load(directory)
    result = evaluate_model(saved.model, saved.tokenizer, stage.task, cfg.data, cfg.evaluate, model_bytes=packed)
    return result, packed, errors


def module_runs(ctx: Context, n: int, tag: str) -> list[str | None]:
    """A nested MLflow run per module under the stage's run (the actors log their loss curves there)."""
    if not ctx.run_id:
        return [None] * n
    client = MlflowClient(ctx.tracking_uri)
    exp = client.get_run(ctx.run_id).info.experiment_id
    return [client.create_run(exp, run_name=f"{tag}/module{k}",
                              tags={"mlflow.parentRunId": ctx.run_id, "plmq.stage": "mrem-module"}).info.run_id
            for k in range(n)]


def finish_module_runs(ctx: Context, run_ids: list[str | None], stats: list[dict]) -> None:
    """Each module's statistics into its run, which then ends."""
    if not run_ids or run_ids[0] is None:
        return
    client = MlflowClient(ctx.tracking_uri)
    for run_id, s in zip(run_ids, stats):
        for key in MODULE_METRICS:
            client.log_metric(run_id, key, float(s[key] or 0))
        if s.get("peak_cuda_mb") is not None:  # on a GPU only
            client.log_metric(run_id, "peak_cuda_mb", float(s["peak_cuda_mb"]))
        client.set_tag(run_id, "restarted", str(s["restarted"]))
        client.set_tag(run_id, "stop_reason", str(s["stop_reason"]))
        client.set_terminated(run_id)

