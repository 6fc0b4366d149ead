"""What each DAG stage runs: one function per stage kind, the same shape for all.

`executor(cfg, stage, upstream, root, force) -> (outcome, outputs)`: `upstream`
maps the names of the stage's inputs to their outcomes, `root` is the local
run folder, `force` asks for a recomputation (the stage's folder is removed
first), `outcome` is a small JSON-able dict and `outputs` the stage's folder
relative to `root` (None when it has none there).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from pipelines import run as stage_runs
from pipelines.config import FinetuneConfig, RunConfig

FP_BITS = 32


def _rel(path: str | Path, root: Path) -> str | None:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:  # outside the run folder (e.g. a shared prequant.dir): not copied
        return None


def _upstream(upstream: dict, kind: str) -> dict:
    return next(v for k, v in upstream.items() if k.startswith(kind + "/"))


def _train_resources(ft: FinetuneConfig) -> dict:
    gpu = ft.use_gpu == "true"
    return {"cpus": ft.num_workers * ft.cpus_per_worker, "gpus": ft.num_workers if gpu else 0}


def weight_bits(quant: str | None) -> float:
    from quant import QuantConfig

    if quant is None:
        return FP_BITS
    w = QuantConfig.parse(quant).weight
    return FP_BITS if w is None else (1.58 if w.scheme == "ternary" else w.bits)


def _row(task: str, method: str, result, wall_s: float, quant: str | None, trainable_pct: float,
         resources: dict) -> dict:
    row = stage_runs.table_row(task, method, result, wall_s)
    return {**row, "bits": weight_bits(quant), "trainable_pct": round(trainable_pct, 3),
            "cpu_s": round(wall_s * resources.get("cpus", 0), 1), "gpu_s": round(wall_s * resources.get("gpus", 0), 1)}


def finetune_stage(cfg: RunConfig, st, upstream: dict, root: Path, force: bool):
    if force:
        shutil.rmtree(root / st.task / "finetune", ignore_errors=True)
    ft = stage_runs.run_finetune_stage(cfg, st.task, root)
    return ({"checkpoint": ft.checkpoint, "result": dataclasses.asdict(ft),
             "resources": _train_resources(cfg.finetune)}, _rel(ft.checkpoint, root))


def evaluate_stage(cfg: RunConfig, st, upstream: dict, root: Path, force: bool):
    ft = _upstream(upstream, "finetune")
    result, eval_s = stage_runs.run_evaluate_stage(cfg, st.task, ft["checkpoint"], "fp")
    train_s = ft["result"]["wall_s"] or ft.get("stage_s", 0.0)
    row = _row(st.task, "fp", result, train_s + eval_s, None, 100.0, ft["resources"])
    return {"row": row, "result": dataclasses.asdict(result), "resources": {"cpus": 1, "gpus": 0}}, None


def rtn_stage(cfg: RunConfig, st, upstream: dict, root: Path, force: bool):
    ft = _upstream(upstream, "finetune")
    q = stage_runs.run_rtn_stage(cfg, st.task, ft["checkpoint"], st.quant, root)  # always recomputes
    res = {"cpus": 1, "gpus": 0}
    row = _row(st.task, f"rtn-{q.quant_config}", q.eval, q.wall_s, q.quant_config, 0.0, res)
    return {"row": row, "checkpoint": q.checkpoint, "result": dataclasses.asdict(q), "resources": res}, \
        _rel(q.checkpoint, root)


def prequant_quantize_stage(cfg: RunConfig, st, upstream: dict, root: Path, force: bool):
    from pipelines.prequant import artefact_root, artefact_spec, run_prequant_quantize_stage

    if force:
        spec = artefact_spec(cfg.model, st.quant, cfg.prequant, st.method)
        shutil.rmtree(spec.directory(artefact_root(cfg.prequant, root)), ignore_errors=True)
    cfg = dataclasses.replace(cfg, output_dir=str(root))
    r = run_prequant_quantize_stage(cfg, st.quant, st.method)
    return {"artefact": r.directory, "result": dataclasses.asdict(r), "resources": {"cpus": 1, "gpus": 0}}, \
        _rel(r.directory, root)


def prequant_finetune_stage(cfg: RunConfig, st, upstream: dict, root: Path, force: bool):
    from pipelines.prequant import method_label, run_prequant_finetune_stage

    cfg = dataclasses.replace(cfg, output_dir=str(root))
    r = run_prequant_finetune_stage(cfg, st.task, st.quant, st.method, force=force)
    res = _train_resources(cfg.finetune)
    row = _row(st.task, f"{method_label(st.method, cfg.prequant)}-{r.quant_config}", r.eval, r.wall_s,
               r.quant_config, r.trainable_pct, res)
    summary = {k: v for k, v in dataclasses.asdict(r).items() if k != "eval"}
    return {"row": row, "checkpoint": r.checkpoint, "result": summary, "resources": res}, _rel(r.checkpoint, root)


EXECUTORS = {
    "finetune": finetune_stage, "evaluate": evaluate_stage, "rtn": rtn_stage, 
    "prequant-quantize": prequant_quantize_stage, "prequant-finetune": prequant_finetune_stage,
}
