"""Stage `calibrate`: record the FP teacher's activations at every MREM module boundary, on disk.

One stage per task, before its MREM stages. The shards go to `mrem.cache_dir/<stage key>` when a
cache folder is set (shared by runs: a later run with the same key reuses it), else to
`<run folder>/<task>/calibrate-<stage key>`. The outcome says where and for which module split;
the MREM stages load that folder into the Ray object store.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipelines import calibration, models
from pipelines.config import RunConfig
from pipelines.config_dict import to_dict
from pipelines.evaluation import task_fragment
from pipelines.stages.base import Context, Stage, StageResult, input_checkpoint, relative

KIND = "calibrate"
TASK_CPUS = 1  # it runs the teacher in its own Ray task
SETTINGS = ("calib_samples", "calib_batch_size", "shard_size", "seed")  # the mrem settings that decide it
SHARDS = 3  # what a calibration folder holds (2: the layout in meta.json; 3: modules split by cost, the head
#            counted); older folders are not reused


def name(task: str) -> str:
    return f"{KIND}/{task}"


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """One stage per task when the config asks for MREM: after the task's fine-tuning, or on the
    user's `checkpoint` (no dependency)."""
    if not cfg.mrem.quant:
        return []
    return [Stage(name(task), KIND, task, deps=() if checkpoint else (f"finetune/{task}",), checkpoint=checkpoint)
            for task in cfg.tasks]


def configured_modules(cfg: RunConfig) -> int | None:
    """MREM's module count K as the config holds it: resolved by the driver (resolve_resources), rem is 1."""
    return 1 if cfg.mrem.mode == "rem" else cfg.mrem.modules


def modules(cfg: RunConfig) -> int:
    """K for a stage that runs: the driver must have resolved it."""
    k = configured_modules(cfg)
    if k is None:
        raise ValueError("mrem.modules is unresolved: resolve the config with pipelines.cluster.resolve_resources "
                         "before running MREM stages")
    return k


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    """The data, the module count and the calibration settings; a user checkpoint by its weights."""
    mrem = to_dict(cfg.mrem)
    out = {"task": stage.task, **task_fragment(stage.task), "data": to_dict(cfg.data),
           "modules": configured_modules(cfg), "mrem": {k: mrem[k] for k in SETTINGS}, "shards": SHARDS}
    if stage.checkpoint:
        out["checkpoint"] = models.identity(stage.checkpoint)
    return out


def folder(cfg: RunConfig, stage: Stage, ctx: Context) -> Path:
    """Where the stage writes its shards."""
    if cfg.mrem.cache_dir:
        return Path(cfg.mrem.cache_dir).resolve() / ctx.key
    return Path(ctx.root) / stage.task / f"calibrate-{ctx.key}"


def run(cfg: RunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    """Record the activations (or find them recorded under the same key) and say where they are."""
    m, k = cfg.mrem, modules(cfg)
    out, start = folder(cfg, stage, ctx), time.time()
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    meta = calibration.read_meta(out)
    reused = meta is not None
    if not reused:
        checkpoint = input_checkpoint(stage, upstream)
        meta = calibration.record(checkpoint, stage.task, cfg.data, k, m.calib_samples, out, m.calib_batch_size,
                                  m.shard_size, m.seed)
    calib_s = time.time() - start
    print(f"[calibrate {stage.task}] {'reused' if reused else 'wrote'} {out}: {meta['num_samples']} samples x "
          f"{meta['seq_len']} tokens, {len(meta['layers'])} modules, {meta['nbytes'] / 2**20:.1f} MiB")
    info = {"cache_dir": str(out), "modules": len(meta["layers"]), "calib_samples": meta["num_samples"],
            "calib_bytes": meta["nbytes"], "calib_s": round(calib_s, 2), "reused": reused}
    return StageResult(outputs=relative(out, Path(ctx.root)), info=info,
                       metrics={"calib_s": calib_s, "calib_bytes": meta["nbytes"],
                                "calib_samples": meta["num_samples"]},
                       resources={"cpus": 1, "gpus": 0})


def cache_folder(outcome: dict, root: Path) -> Path:
    """The shards' folder from a calibrate stage's recorded outcome: below `root` when it lies in the run
    folder (a remote run directory brings it there), else where it was written (a shared cache_dir)."""
    return root / outcome["outputs"] if outcome.get("outputs") else Path(outcome["info"]["cache_dir"])

