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
