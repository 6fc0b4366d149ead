"""Stage `mrem`: module-wise reconstruction error minimisation on Ray actors.

The fine-tuned model is split into K modules; one `ModuleTrainer` actor per
module (one GPU each when the cluster has GPUs) pulls the teacher's boundary
activations from the object store and trains its quantized module:
- parallel (MREM-P): all modules at once; module k's student input mixes the
  teacher's input with module k-1's quantized outputs, which k-1 pushes to k
  directly (annealed teacher forcing);
- sequential (MREM-S): module k starts after k-1, fed k-1's quantized outputs;
- rem: the whole model as one module.
The trained modules are assembled, exported packed and evaluated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.module_trainer import ModuleTrainer, TrainerSettings, learnable
from pipelines import models
from pipelines.calibrate import ActivationCache, calibrate
from pipelines.cluster import available_workers, ensure_ray, spread_placement, worker_resources
from pipelines.config import DataConfig, EvaluateConfig, MremConfig
from pipelines.evaluate import EvalResult, evaluate_model
from pipelines.partition import PartSpec, boundary_errors, split_layers
from pipelines.rtn import calibration_batches, load_packed_checkpoint, quantize_rtn, save_packed_checkpoint
from quant import QuantConfig, quantize_model


@dataclass
class MremResult:
    quant_config: str
    mode: str
    modules: int
    checkpoint: str
    packed_bytes: int
    modules_stats: list[dict]
    calib_samples: int
    calib_bytes: int
    calib_s: float
    train_s: float
    eval: EvalResult
    wall_s: float
    chain_errors: list[float]        # per module, fed by quantized predecessors, after MREM
    rtn_chain_errors: list[float]    # the same for RTN with the same QuantConfig

    @property
    def restarts(self) -> int:
        return sum(bool(s["restarted"]) for s in self.modules_stats)


def settings_for(cfg: MremConfig, cpus: int) -> TrainerSettings:
    t0 = cfg.teacher_forcing_steps if cfg.teacher_forcing_steps is not None else cfg.steps // 2
    return TrainerSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_quant=cfg.lr_quant,
                           teacher_forcing_steps=t0, checkpoint_every=cfg.checkpoint_every,
                           queue_size=cfg.queue_size, log_every=cfg.log_every, eval_samples=cfg.eval_samples,
                           seed=cfg.seed, num_threads=cpus, student_dropout=cfg.student_dropout)


def plan(checkpoint: str | Path, cfg: MremConfig) -> list[PartSpec]:
    """The module split: K from the config, else min(available workers, layers); REM is K=1."""
    hf = models.model_config(checkpoint)
    layers = getattr(hf, "num_hidden_layers", None) or hf.n_layer
    if cfg.mode == "rem":
        return split_layers(layers, 1)
    k = cfg.modules or min(available_workers(worker_resources(cfg.use_gpu, cfg.cpus_per_actor)), layers)
    return split_layers(layers, k)


def work_key(checkpoint: str | Path, quant: str, cfg: MremConfig, specs: list[PartSpec]) -> str:
    """Module checkpoints are only resumed by a run with the same inputs (the same teacher weights too)."""
    ident = {"checkpoint": models.checkpoint_identity(checkpoint), "quant": quant,
             "cfg": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("quant", "log_every")},
             "specs": [(s.start, s.end) for s in specs]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def trainer_name(work_dir: Path, k: int) -> str:
    """Named actors: `ray.get_actor(name)` finds a module's trainer (dashboards, fault tests)."""
    return f"mrem-{work_dir.name}-{k}"


def launch_trainers(specs: list[PartSpec], checkpoint: str, quant: str, cfg: MremConfig, cache: ActivationCache,
                    work_dir: Path, run_ids: list[str | None], tracking_uri: str | None) -> tuple[list, object]:
    """One actor per module, created last-to-first so each knows its successor."""
    res = worker_resources(cfg.use_gpu, cfg.cpus_per_actor)
    pg = spread_placement(res, len(specs), cfg.placement_timeout_s)
    settings = settings_for(cfg, res.num_cpus)
    remote = ray.remote(ModuleTrainer)
    trainers: list = [None] * len(specs)
    nxt = None
    for spec in reversed(specs):
        actor = remote.options(
            **res.as_options(), max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts,
            max_concurrency=4, name=trainer_name(work_dir, spec.index),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=spec.index),
        ).remote(spec, checkpoint, quant, settings, cache.boundaries[spec.index], cache.boundaries[0],
                 cache.num_samples, cache.shard_size, str(work_dir),
                 nxt if cfg.mode == "parallel" else None, run_ids[spec.index], tracking_uri,
                 fed_by_predecessor=cfg.mode == "parallel" and not spec.first)
        trainers[spec.index] = actor
        nxt = actor
    return trainers, pg


def train_modules(trainers: list, mode: str) -> list[dict]:
    """Parallel: every actor at once. Sequential: in order, each fed its predecessor's outputs."""
    if mode != "sequential":
        return ray.get([t.train.remote() for t in trainers])
    stats = []
    for k, trainer in enumerate(trainers):
        stats.append(ray.get(trainer.train.remote()))
        if k + 1 < len(trainers):
            refs = ray.get(trainer.propagate.remote())  # a list of ObjectRefs: no activations here
            ray.get(trainers[k + 1].set_predecessor_outputs.remote(refs))
    return stats


def assemble(checkpoint: str, quant: str, states: list[dict]):
    """The quantized model with every module's trained weights and quantizer parameters."""
    model, tokenizer, meta = models.load_checkpoint(checkpoint)
    quantize_model(model, learnable(QuantConfig.parse(quant)))
    merged = {k: v for state in states for k, v in state.items()}
    missing = set(model.state_dict()) - set(merged)
    if missing:
        raise RuntimeError(f"assembled MREM model lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(merged)
    return model.eval(), tokenizer, meta


def module_runs(parent_run_id: str | None, tracking_uri: str | None, n: int, tag: str) -> list[str | None]:
    """A nested MLflow run per module under the stage run (actors log their loss curves there)."""
    if not parent_run_id:
        return [None] * n
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    return [client.create_run(exp, run_name=f"{tag}/module{k}",
                              tags={"mlflow.parentRunId": parent_run_id, "plmq.stage": "mrem-module"}).info.run_id
            for k in range(n)]


def finish_module_runs(run_ids: list, stats: list[dict], tracking_uri: str | None) -> None:
    if not run_ids or run_ids[0] is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for run_id, s in zip(run_ids, stats):
        for key in ("initial_error", "final_error", "wall_s", "s_per_step", "peak_rss_mb", "pushed_bytes",
                    "pulled_bytes", "resumed_from_step", "repeated_batches", "waited_for_predecessor_s"):
            client.log_metric(run_id, key, float(s[key] or 0))
        client.set_tag(run_id, "restarted", str(s["restarted"]))
        client.set_terminated(run_id)


def chain_errors(checkpoint: str, task: str, data: DataConfig, quant: str, specs: list[PartSpec], model,
                 n: int) -> tuple[list[float], list[float]]:
    """Per-module errors of the MREM model and of RTN on the first `n` calibration examples."""
    teacher, tokenizer, _ = models.load_checkpoint(checkpoint)
    rtn_model, _, _ = models.load_checkpoint(checkpoint)
    batches = lambda: calibration_batches(task, tokenizer, data, n, 32)  # noqa: E731
    quantize_rtn(rtn_model, QuantConfig.parse(quant), batches())
    return (boundary_errors(model, teacher, specs, batches()), boundary_errors(rtn_model, teacher, specs, batches()))


def mrem(checkpoint: str | Path, task: str, quant: str, data: DataConfig, cfg: MremConfig,
         eval_cfg: EvaluateConfig, output_dir: str | Path, run_id: str | None = None,
         tracking_uri: str | None = None) -> MremResult:
    """Calibrate, train the modules on actors, assemble, export packed, evaluate."""
    cfg.validate()
    qcfg = QuantConfig.parse(quant)  # bad strings fail here, before any work
    ensure_ray()
    start, checkpoint = time.time(), str(checkpoint)
    specs = plan(checkpoint, cfg)
    cache = calibrate(checkpoint, task, data, specs, cfg.calib_samples, cfg.calib_batch_size, cfg.shard_size,
                      cfg.seed, cfg.cache_dir)
    out = Path(output_dir).resolve() / f"{qcfg}-{cfg.mode}"
    work_dir = out / f"modules-{work_key(checkpoint, str(qcfg), cfg, specs)}"
    run_ids = module_runs(run_id, tracking_uri, len(specs), f"{qcfg}-{cfg.mode}")
    requested_at = time.time()
    trainers, pg = launch_trainers(specs, checkpoint, str(qcfg), cfg, cache, work_dir, run_ids, tracking_uri)
    t0 = time.time()
    try:
        stats = train_modules(trainers, cfg.mode)
        train_s = time.time() - t0
        states = ray.get([t.export.remote() for t in trainers])
    finally:
        for t in trainers:
            ray.kill(t)
        ray.util.remove_placement_group(pg)
    finish_module_runs(run_ids, stats, tracking_uri)
    for s in stats:  # how long the actors waited for resources (nodes an autoscaler had to add)
        s["wait_s"] = round(s["started_at"] - requested_at, 2)
    for s in stats:
        if s["restarted"] or s["resumed_from_step"]:
            print(f"[mrem {task}] module {s['module']} was restarted and resumed from step {s['resumed_from_step']}")
    model, tokenizer, meta = assemble(checkpoint, str(qcfg), states)
    errors, rtn_errors = chain_errors(checkpoint, task, data, str(qcfg), specs, model, cfg.eval_samples)
    packed = save_packed_checkpoint(model, tokenizer, out / "model",
                                    {**meta, "method": f"mrem-{cfg.mode}", "quant": str(qcfg)})
    qmodel, _ = load_packed_checkpoint(out / "model")
    result = evaluate_model(qmodel, tokenizer, task, data, eval_cfg, model_bytes=packed)
    return MremResult(str(qcfg), cfg.mode, len(specs), str(out / "model"), packed, stats, cache.num_samples,
                      cache.nbytes, cache.wall_s, train_s, result, time.time() - start, errors, rtn_errors)
