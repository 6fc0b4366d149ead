"""The one driver: every `plmq` verb runs a plan of stages through `run`.

It checks the input before any work, connects to Ray, decides resources once, holds the output
folder's lock (one run writes a folder at a time), opens the invocation's MLflow parent run,
executes the plan on the DAG and logs the report."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray

from pipelines import dag, outdir, tracking
from pipelines.cluster import ensure_ray, resolve_resources
from pipelines.config import RunConfig
from pipelines.config_dict import to_dict
from pipelines.errors import ConfigError
from pipelines.evaluation import check_inputs
from pipelines.stages import REGISTRY, Stage, plan


@dataclass
class RunSummary:
    parent_run_id: str
    rows: list[dict]
    table: str
    output_dir: str
    wall_s: float
    outcomes: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class StageFailure(RuntimeError):
    """Some stages failed; the others' results were still recorded."""


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
                             cwd=Path(__file__).resolve().parent, check=False)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: Any) -> dict:
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    tasks = ",".join(getattr(cfg, "tasks", []))
    return {"plmq.model": str(getattr(cfg, "model", "")), "plmq.tasks": tasks, "plmq.git_commit": git_commit(),
            "plmq.config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
            "plmq.ray_resources": json.dumps({k: v for k, v in ray.cluster_resources().items()
                                              if not k.startswith(("node:", "accelerator_type"))})}


def prepare(cfg: Any, model: str | None = None) -> Any:
    """Checks before any work (an output folder that can be written, data present, the context fits the model,
    LM texts long enough, quantization groups that fit, workers that fit), with Ray up; returns the resolved
    config. `model`: the model the stages start from when it is not `cfg.model` (a checkpoint given to a verb)."""
    outdir.check_output_dir(cfg.output_dir, run_location(cfg.output_dir)[1])
    if isinstance(cfg, RunConfig):
        check_inputs(cfg, model or cfg.model)
    ensure_ray()
    return resolve_resources(cfg, model) if isinstance(cfg, RunConfig) else cfg


def _under_parent_run(cfg: Any, stages: list[Stage], force: list[str] | None, name: str, run_dir: str,
                      local_root: Path, start: float) -> tuple[str, dag.DagResult, dict | None]:
    """The plan on the DAG under the invocation's MLflow parent run; (its id, the DAG's result, the report).
    Runs the folder's earlier invocations left RUNNING (their driver was killed) end as KILLED first."""
    folder = run_dir if "://" in run_dir else str(local_root)
    tracking.end_abandoned(tracking.setup(cfg.experiment_name), folder)
    tags = {**run_tags(cfg), "plmq.output_dir": folder}
    with tracking.parent_run(cfg.experiment_name, name, to_dict(cfg), tags=tags) as parent_id:
        ctx = {"run_dir": run_dir, "local_root": str(local_root), "tracking_uri": tracking.tracking_uri(),
               "experiment_id": mlflow.active_run().info.experiment_id, "parent_run_id": parent_id}
        try:
            result = dag.execute(cfg, stages, ctx, force)
        except BaseException:  # interrupted: the stages' runs end with the driver
            tracking.end_open_children(parent_id, "KILLED")
            raise
        tracking.end_open_children(parent_id, "FAILED")  # runs of stage processes that died
        report = next((result.outcomes[s.name] for s in stages if s.name in result.outcomes and
                       getattr(REGISTRY[s.kind], "FINAL", False)), None)
        if report:
            tracking.log_report(report["info"])
        mlflow.log_metrics({"wall_s": time.time() - start, "stages_skipped": len(result.skipped),
                            "stages_run": len(result.outcomes) - len(result.skipped),
                            "stages_failed": len(result.failed)})
        mlflow.set_tag("plmq.skipped", ",".join(result.skipped)[:4000])
        if result.failed:
            mlflow.set_tag("plmq.failed", ",".join(result.failed))
    return parent_id, result, report


def run(cfg: Any, stages: list[Stage] | None = None, force: list[str] | None = None,
        name: str = "run") -> RunSummary:
    """Run `stages` (default: the config's whole plan), skipping those already complete, under one MLflow
    parent run; raises StageFailure when any failed (after recording the others)."""
    start = time.time()
    given = next((s.checkpoint for s in stages or [] if s.checkpoint), None)
    cfg = prepare(cfg, given)
    stages = plan(cfg) if stages is None else stages
    bad = dag.unknown_force(stages, force or [])
    if bad:
        raise ConfigError(f"--force {bad[0]!r} names no stage; stages: {', '.join(s.name for s in stages)}")
    run_dir, local_root = run_location(cfg.output_dir)
    local_root.mkdir(parents=True, exist_ok=True)
    with outdir.locked(local_root, cfg.output_dir, shlex.join(sys.argv)):
        parent_id, result, report = _under_parent_run(cfg, stages, force, name, run_dir, local_root, start)
    rows = [result.outcomes[s.name]["row"] for s in stages if result.outcomes.get(s.name, {}).get("row")]
    table = report["info"]["table"] if report else ""
    summary = RunSummary(parent_id, rows, table, str(local_root), time.time() - start, result.outcomes,
                         result.skipped, result.failed)
    if result.failed:
        details = "\n".join(f"- {n}: {err.splitlines()[-1]}" for n, err in result.failed.items())
        raise StageFailure(f"{len(result.failed)} stage(s) failed (completed stages are kept; fix the cause and "
                           f"re-run the same command to run the rest):\n{details}")
    return summary
