"""Stage `pretrain`: one recipe trained from scratch on one corpus with one seed, on Ray Train.

    plan(cfg)        one stage: cfg.quant's recipe on data.corpus with train.seed (`plmq pretrain`)
    plan_sweep(cfg)  one stage per corpus x seed x recipe of cfg.sweep (`plmq pretrain-sweep`, with
                     the pretrain-report stage after them); the stages run at once as far as the
                     cluster's CPUs/GPUs hold their Ray Train workers
Both check that the corpora exist and that data.eval_corpus is not trained on (a ConfigError before
any work).

A stage carries what it trains: quant = recipe, task = corpus, method = str(seed). Its run folder
and Ray Train run are named by the stage key, so a restarted stage resumes from its last checkpoint
(and an attempt that finished re-reports its final model).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipelines.cluster import ensure_ray, worker_resources
from pipelines.config_dict import from_dict
from pipelines.errors import ConfigError, DataError
from pipelines.lm_data import LMData, check_corpora, corpus_label
from pipelines.lm_train import RaySession, prepare, save_model, train
from pipelines.pretrain_config import QUIET_TRAIN, PretrainRunConfig, with_recipe
from pipelines.stages.base import Context, Stage, StageResult, relative
from pipelines.training import fit_to_dir, train_needs

KIND = "pretrain"
METRICS = ("val_loss", "val_ppl", "final_train_loss", "opt_state_bytes", "step_s", "step_cpu_s", "wall_s")


def _stage(recipe: str, corpus: str, seed: int) -> Stage:
    return Stage(f"{KIND}/{corpus_label(corpus)}/{recipe}/seed{seed}", KIND, task=corpus, quant=recipe,
                 method=str(seed))


def _check_corpora(cfg: PretrainRunConfig, corpora: dict[str, str]) -> None:
    """Before any work: every training corpus ({config key: corpus}) and the evaluation corpus exist, are
    UTF-8 text long enough for a window of model.block_size and do not overlap."""
    for key, corpus in corpora.items():
        try:
            check_corpora(corpus, cfg.data.eval_corpus, key, cfg.model.block_size, cfg.data.val_fraction)
        except DataError:
            raise  # an empty, binary or too short text: says which file
        except ValueError as err:
            raise ConfigError(str(err)) from None


def plan(cfg: PretrainRunConfig, checkpoint: str | None = None) -> list[Stage]:
    """The single run of cfg: its quant section's recipe (per-kind settings folded into the name)."""
    if checkpoint is not None:
        raise ValueError("pretrain trains from scratch: it takes no input checkpoint")
    _check_corpora(cfg, {"data.corpus": cfg.data.corpus})
    return [_stage(str(cfg.quant.build()), cfg.data.corpus, cfg.train.seed)]


def plan_sweep(cfg: PretrainRunConfig) -> list[Stage]:
    """Every (corpus, seed, recipe) of cfg.sweep; empty corpora/seeds mean data.corpus/train.seed."""
    s = cfg.sweep
    if not s.recipes:
        raise ConfigError("sweep.recipes is empty: list the recipes to compare, e.g. [fp, w8a8, w4]")
    corpora = s.corpora or [cfg.data.corpus]
    _check_corpora(cfg, {f"sweep.corpora[{i}]": c for i, c in enumerate(s.corpora)} or {"data.corpus": cfg.data.corpus})
    return [_stage(r, c, seed) for c in corpora for seed in (s.seeds or [cfg.train.seed]) for r in s.recipes]


def needs(cfg: PretrainRunConfig, stage: Stage) -> dict[str, float]:
    """What the stage's Ray Train workers hold while it runs (the DAG starts it when they fit)."""
    return train_needs(job_config(cfg, stage).train)


def job_config(cfg: PretrainRunConfig, stage: Stage) -> PretrainRunConfig:
    """The config the stage trains: cfg with the stage's recipe, corpus and seed."""
    return with_recipe(cfg, stage.quant, stage.task, int(stage.method))


def fragment(cfg: PretrainRunConfig, stage: Stage) -> dict:
    """Everything that changes the run's result (not logging, checkpoint cadence or placement)."""
    job = job_config(cfg, stage)
    return {"model": asdict(job.model), "data": {k: v for k, v in asdict(job.data).items() if k != "cache_dir"},
            "train": {k: v for k, v in asdict(job.train).items() if k not in QUIET_TRAIN},
            "recipe": str(job.quant.build()), "include_head": job.quant.include_head}


def _ray_loop(loop_cfg: dict) -> None:
    """Runs on each Ray Train worker; `loop_cfg` is plain data."""
    torch.set_num_threads(loop_cfg["threads"])
    session = RaySession()
    if session.final_reported():
        return
    cfg = from_dict(PretrainRunConfig, loop_cfg["config"])
    data = LMData(**loop_cfg["data"])
    result, run = train(cfg, data, session, loop_cfg["tag"], loop_cfg["run_id"], loop_cfg["tracking_uri"])
    metrics = {k: result[k] for k in ("val_loss", "diverged", "opt_state_bytes", "step_s")}
    session.save(result["steps"], metrics, None, lambda d: save_model(run.inner, data, result, cfg, d))


def run(cfg: PretrainRunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    """Train the stage's recipe with Ray Train; the model and result.json go to <folder>/model."""
    job = job_config(cfg, stage)
    job.validate()
    slug = "".join(c if c.isalnum() or c == "." else "_" for c in stage.quant)
    label = corpus_label(stage.task)
    out = Path(ctx.root) / KIND / label / f"{slug}-seed{stage.method}-{ctx.key}"
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    start, data = time.time(), prepare(job)
    ensure_ray()
    t = job.train
    loop_cfg = {"config": asdict(job), "data": asdict(data), "threads": t.cpus_per_worker, "run_id": ctx.run_id,
                "tag": f"{label} {stage.quant} seed {stage.method}", "tracking_uri": ctx.tracking_uri}
    fit_to_dir(_ray_loop, loop_cfg, t, out, f"{KIND}-{ctx.key}")
    result = {**json.loads((out / "model" / "result.json").read_text()), "wall_s": time.time() - start}
    res = worker_resources(t.use_gpu, t.cpus_per_worker)
    return StageResult(
        outputs=relative(out, Path(ctx.root)), checkpoint=str(out / "model"),
        row={k: result[k] for k in ("corpus", "recipe", "seed", "val_loss", "val_ppl", "diverged", "steps")},
        metrics={k: float(result[k]) for k in (*METRICS, "diverged") if math.isfinite(float(result[k]))},
        info=result, resources={"cpus": t.num_workers * res.num_cpus, "gpus": t.num_workers * res.num_gpus})
