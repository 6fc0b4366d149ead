"""The driver: `plmq run CONFIG` runs the stage DAG (pipelines/dag.py) under one MLflow parent run,
then the report. Also the per-stage MLflow wrappers that the DAG and the single-stage verbs share.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import ray

from pipelines import tracking
from pipelines.cluster import ensure_ray, resolve_resources
from pipelines.config import RunConfig, to_dict
from pipelines.evaluate import EvalResult, evaluate
from pipelines.finetune import FinetuneResult, finetune
from pipelines.io import write_json_atomic, write_text_atomic
from pipelines.rtn import RtnResult, rtn



@dataclass
class RunSummary:
    parent_run_id: str
    rows: list[dict]
    table: str
    output_dir: str
    wall_s: float
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def log_eval(result: EvalResult, prefix: str = "eval_") -> None:
    mlflow.log_metrics({prefix + k: v for k, v in result.metrics.items()})
    mlflow.log_metrics({"model_bytes": result.model_bytes, "eval_examples_per_s": result.examples_per_s})
    mlflow.log_dict(dataclasses.asdict(result), "eval_results.json")
    if result.extra.get("predicted_classes") == 1:  # visible in the runs list, not only in the log
        mlflow.set_tag("warning", "predicts one class for every dev example: learned nothing")


def run_finetune_stage(cfg: RunConfig, task: str, out: Path) -> FinetuneResult:
    with tracking.stage_run(f"finetune/{task}", {"task": task, **to_dict(cfg.finetune)}) as run_id:
        result = finetune(task, cfg.model, cfg.data, cfg.finetune, out / task / "finetune",
                          run_id=run_id, tracking_uri=tracking.tracking_uri())
        mlflow.log_metrics({"train_examples": result.train_examples, "steps": result.steps,
                            "final_loss": result.final_loss, "wall_s": result.wall_s})
        mlflow.log_dict(dataclasses.asdict(result), "finetune_result.json")
    return result


def run_evaluate_stage(cfg: RunConfig, task: str, checkpoint: str, method: str) -> tuple[EvalResult, float]:
    with tracking.stage_run(f"evaluate/{task}/{method}", {"task": task, "method": method,
                                                          "checkpoint": checkpoint}):
        start = time.time()
        result = evaluate(checkpoint, task, cfg.data, cfg.evaluate)
        log_eval(result)
        return result, time.time() - start


def run_rtn_stage(cfg: RunConfig, task: str, checkpoint: str, quant: str, out: Path) -> RtnResult:
    with tracking.stage_run(f"rtn/{task}/{quant}", {"task": task, "quant": quant, "checkpoint": checkpoint,
                                                    **to_dict(cfg.rtn)}):
        result = rtn(checkpoint, task, quant, cfg.data, cfg.rtn, cfg.evaluate, out / task / "rtn")
        log_eval(result.eval)
        mlflow.log_metrics({"packed_bytes": result.packed_bytes, "fp_bytes": result.fp_bytes,
                            "converted_layers": result.converted, "wall_s": result.wall_s})
        mlflow.log_dict(dataclasses.asdict(result), "rtn_result.json")
    return result


def table_row(task: str, method: str, result: EvalResult, wall_s: float) -> dict:
    return {"task": task, "method": method, "metric": result.main_metric, "value": round(100 * result.main, 2),
            "model_MB": round(result.model_bytes / 2**20, 2), "examples_per_s": round(result.examples_per_s, 1),
            "wall_s": round(wall_s, 1), "metrics": result.metrics}


def run_location(output_dir: str) -> tuple[str, Path]:
    """(run directory, local working folder): a URI run directory is mirrored in ~/.cache/plmq/runs."""
    if "://" not in output_dir:
        return output_dir, Path(output_dir).resolve()
    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:12]
    return output_dir, Path(os.environ.get("PLMQ_CACHE", Path.home() / ".cache" / "plmq")) / "runs" / digest


def git_commit() -> str:
    env = os.environ.get("PLMQ_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: RunConfig) -> dict:
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return {"plmq.model": cfg.model, "plmq.tasks": ",".join(cfg.tasks), "plmq.git_commit": git_commit(),
            "plmq.config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
            "plmq.ray_resources": json.dumps({k: v for k, v in ray.cluster_resources().items()
                                              if not k.startswith(("node:", "accelerator_type"))})}


class StageFailure(RuntimeError):
    """Some stages failed; the others' results were still recorded."""


def run(cfg: RunConfig, force: list[str] | None = None) -> RunSummary:
    """Run the config's DAG (skipping stages already complete), then the report; returns its rows."""
    from pipelines.dag import build, execute
    from pipelines.evaluate import majority_floor
    from pipelines.report import report

    from pipelines.data import check_data

    start = time.time()
    for task in cfg.tasks:  # missing data and impossible resources fail here, before any stage starts
        check_data(task, cfg.data)
    ensure_ray()
    cfg = resolve_resources(cfg)
    run_dir, local_root = run_location(cfg.output_dir)
    local_root.mkdir(parents=True, exist_ok=True)
    with tracking.parent_run(cfg.experiment_name, f"run-{'-'.join(cfg.tasks)}", to_dict(cfg),
                             tags=run_tags(cfg)) as parent_id:
        ctx = {"run_dir": run_dir, "local_root": str(local_root), "tracking_uri": tracking.tracking_uri(),
               "experiment_id": mlflow.active_run().info.experiment_id, "parent_run_id": parent_id}
        dag = execute(cfg, ctx, force)
        order = [s.name for s in build(cfg)]
        rows = [dag.outcomes[n]["row"] for n in order if n in dag.outcomes and dag.outcomes[n].get("row")]
        rep = report(rows, local_root, floors=majority_floor(cfg.tasks, cfg.data))
        write_text_atomic(local_root / "results.md", rep.table + "\n")
        write_json_atomic(local_root / "results.json", rows)
        mlflow.log_metrics({"wall_s": time.time() - start, "stages_skipped": len(dag.skipped),
                            "stages_run": len(dag.outcomes) - len(dag.skipped), "stages_failed": len(dag.failed)})
        mlflow.set_tag("plmq.skipped", ",".join(dag.skipped)[:4000])
        if dag.failed:
            mlflow.set_tag("plmq.failed", ",".join(dag.failed))
    summary = RunSummary(parent_id, rows, rep.table, str(local_root), time.time() - start, dag.skipped, dag.failed)
    if dag.failed:
        details = "\n".join(f"- {name}: {err.splitlines()[-1]}" for name, err in dag.failed.items())
        raise StageFailure(f"{len(dag.failed)} stage(s) failed (re-run the same command to retry them; "
                           f"completed stages are kept):\n{details}")
    return summary
