"""The driver: `plmq run CONFIG` runs each task's stages under one MLflow parent run.

Per task: finetune (FP reference) -> evaluate; rtn and mrem (one per QuantConfig)
-> evaluate; then a results table.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from pipelines import tracking
from pipelines.config import RunConfig, to_dict
from pipelines.evaluate import EvalResult, evaluate
from pipelines.finetune import FinetuneResult, finetune
from pipelines.io import markdown_table, write_json_atomic, write_text_atomic
from pipelines.mrem import MremResult, mrem
from pipelines.rtn import RtnResult, rtn

TABLE_COLUMNS = ["task", "method", "metric", "value", "model_MB", "examples_per_s", "wall_s"]


@dataclass
class RunSummary:
    parent_run_id: str
    rows: list[dict]
    table: str
    output_dir: str
    wall_s: float


def log_eval(result: EvalResult, prefix: str = "eval_") -> None:
    mlflow.log_metrics({prefix + k: v for k, v in result.metrics.items()})
    mlflow.log_metrics({"model_bytes": result.model_bytes, "eval_examples_per_s": result.examples_per_s})
    mlflow.log_dict(dataclasses.asdict(result), "eval_results.json")


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


def run_mrem_stage(cfg: RunConfig, task: str, checkpoint: str, quant: str, out: Path) -> MremResult:
    with tracking.stage_run(f"mrem/{task}/{quant}-{cfg.mrem.mode}",
                            {"task": task, "quant": quant, "checkpoint": checkpoint, **to_dict(cfg.mrem)}) as rid:
        result = mrem(checkpoint, task, quant, cfg.data, cfg.mrem, cfg.evaluate, out / task / "mrem",
                      run_id=rid, tracking_uri=tracking.tracking_uri())
        log_eval(result.eval)
        mlflow.log_metrics({"packed_bytes": result.packed_bytes, "calib_bytes": result.calib_bytes,
                            "calib_s": result.calib_s, "train_s": result.train_s, "wall_s": result.wall_s,
                            "restarts": result.restarts})
        for k, (m, r) in enumerate(zip(result.chain_errors, result.rtn_chain_errors)):
            mlflow.log_metrics({f"module{k}_error": m, f"module{k}_rtn_error": r})
        mlflow.set_tag("restarts", str(result.restarts))
        mlflow.log_dict(dataclasses.asdict(result), "mrem_result.json")
    return result


def table_row(task: str, method: str, result: EvalResult, wall_s: float) -> dict:
    return {"task": task, "method": method, "metric": result.main_metric, "value": round(100 * result.main, 2),
            "model_MB": round(result.model_bytes / 2**20, 2), "examples_per_s": round(result.examples_per_s, 1),
            "wall_s": round(wall_s, 1), "metrics": result.metrics}


def run(cfg: RunConfig) -> RunSummary:
    """Run every task's stages; returns the rows of the results table."""
    start = time.time()
    out = Path(cfg.output_dir).resolve()
    rows = []
    with tracking.parent_run(cfg.experiment_name, f"run-{'-'.join(cfg.tasks)}", to_dict(cfg),
                             tags={"plmq.model": cfg.model, "plmq.tasks": ",".join(cfg.tasks)}) as parent_id:
        for task in cfg.tasks:
            ft = run_finetune_stage(cfg, task, out)
            result, eval_s = run_evaluate_stage(cfg, task, ft.checkpoint, "fp")
            rows.append(table_row(task, "fp", result, ft.wall_s + eval_s))
            for quant in cfg.rtn.quant:
                q = run_rtn_stage(cfg, task, ft.checkpoint, quant, out)
                rows.append(table_row(task, f"rtn-{q.quant_config}", q.eval, q.wall_s))
            for quant in cfg.mrem.quant:
                m = run_mrem_stage(cfg, task, ft.checkpoint, quant, out)
                rows.append(table_row(task, f"mrem-{cfg.mrem.mode}-{m.quant_config}", m.eval, m.wall_s))
        table = markdown_table(rows, TABLE_COLUMNS)
        write_text_atomic(out / "results.md", table + "\n")
        write_json_atomic(out / "results.json", rows)
        mlflow.log_text(table, "results.md")
        mlflow.log_metric("wall_s", time.time() - start)
    return RunSummary(parent_id, rows, table, str(out), time.time() - start)
