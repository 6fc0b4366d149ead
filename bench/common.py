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
