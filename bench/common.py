"""Shared by the bench scripts: where the FP references are and how to read them."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FP = ROOT / "bench" / "results" / "fp_reference.json"
FP_RUNS = ROOT / "runs" / "fp_reference"


def fp_reference(task: str) -> dict:
    """The task's FP reference: recorded by bench/fp_reference.py, else evaluated from its checkpoint."""
    recorded = json.loads(FP.read_text()) if FP.exists() else {}
    if task in recorded:
        return recorded[task]
    from pipelines.config import DataConfig, EvaluateConfig
    from pipelines.evaluate import evaluate

    checkpoint = FP_RUNS / task / "finetune" / "model"
    result = evaluate(checkpoint, task, DataConfig(max_length=128), EvaluateConfig())
    return {**{k: round(100 * v, 2) for k, v in result.metrics.items()},
            "checkpoint": str(checkpoint.relative_to(ROOT))}


def free_port() -> int:
    """A TCP port nobody listens on now (for Ray heads and MLflow servers started by benches and tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything it spawned (a `ray start --block`
    head and its daemons, an `mlflow server`): SIGTERM to its group, SIGKILL if it lingers."""
    import contextlib
    import os
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def target_row(task: str, target: str, measured, limit, at_least: bool = True) -> list[dict]:
    """A Targets-table row: `measured` vs the bar `limit` (>= when at_least, else <=); [] when either is missing."""
    if measured is None or limit is None:
        return []
    met = measured >= limit if at_least else measured <= limit
    return [{"task": task, "target": target, "measured": f"{measured} vs {round(limit, 2)}", "met": met}]


def log_results(experiment: str, files: list[Path], tables: dict[str, list[dict]], metrics: dict[str, float],
                command: str) -> str:
    """The recorded figures in MLflow: one `bench-results` run with the results files, each table (Targets,
    per-task figures) as an MLflow table and every figure as a metric; returns the run id."""
    import mlflow

    from pipelines import tracking

    tracking.setup(experiment)
    with mlflow.start_run(run_name="bench-results", tags={"plmq.bench": "results", "command": command}) as run:
        for f in files:
            mlflow.log_artifact(str(f))
        for name, rows in tables.items():
            cols = list(dict.fromkeys(c for r in rows for c in r))
            mlflow.log_table({c: [r.get(c) for r in rows] for c in cols}, artifact_file=f"{name}.json")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        return run.info.run_id
