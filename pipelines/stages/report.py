"""Stage `report`: the comparison table (method x task) of every stage that produced a report row,
with each task's majority-class floor, written as Markdown, CSV and a plot into the run folder.

A final stage: the DAG runs it after all others, on the outcomes of those that succeeded."""
from __future__ import annotations

from pipelines.config import RunConfig
from pipelines.evaluation import majority_floor
from pipelines.io import write_json_atomic, write_text_atomic
from pipelines.report import report
from pipelines.stages.base import Context, Stage, StageResult

KIND = "report"
FINAL = True
ROW_KINDS = ("evaluate", "rtn", "gptq", "mrem", "mrem-e2e", "prequant-finetune", "export")


def plan(cfg: RunConfig, stages: list[Stage]) -> list[Stage]:
    """One report over `stages` (the rest of the plan), when any of them makes a report row."""
    deps = tuple(s.name for s in stages if s.kind in ROW_KINDS)
    return [Stage("report", KIND, deps=deps)] if deps else []


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    return {"tasks": cfg.tasks}


def run(cfg: RunConfig, stage: Stage, upstream: dict, ctx: Context) -> StageResult:
    rows = [upstream[n]["row"] for n in stage.deps if n in upstream and upstream[n].get("row")]
    rep = report(rows, ctx.root, floors=majority_floor(cfg.tasks, cfg.data, cfg.finetune.seed))
    write_text_atomic(ctx.root / "results.md", rep.table + "\n")
    write_json_atomic(ctx.root / "results.json", rows)
    files = [p for p in (rep.markdown, rep.csv, rep.plot) if p]
    return StageResult(info={"table": rep.table, "rows": rows, "comparison": rep.rows, "files": files},
                       metrics={"rows": len(rows)})
