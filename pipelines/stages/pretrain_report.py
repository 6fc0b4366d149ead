"""Stage `pretrain-report`: the comparison of a pre-training sweep, from its pretrain stages' outcomes.

A final stage (FINAL): the DAG runs it after the pretrain stages, in the driver, on the outcomes of
those that succeeded. Each run is compared with the FP run of its corpus and seed; with several
seeds a summary table gives the mean and spread over seeds of every recipe's gap to FP. Writes
<root>/sweep/ (one atomic folder): sweep_results.md, .csv, .json (with the loss histories) and
loss_curves.png.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from pipelines.io import atomic_dir, markdown_table, write_json_atomic
from pipelines.pretrain_config import PretrainRunConfig
from pipelines.stages import pretrain
from pipelines.stages.base import Context, Stage, StageResult

KIND = "pretrain-report"
FINAL = True  # the DAG runs it last, in the driver, on the outcomes of the pretrain stages that succeeded
FOLDER = "sweep"
FILES = ("sweep_results.md", "sweep_results.csv", "sweep_results.json", "loss_curves.png")


def plan(cfg: PretrainRunConfig, checkpoint: str | None = None) -> list[Stage]:
    """One report over every stage of `pretrain.plan_sweep(cfg)`."""
    return [Stage(KIND, KIND, deps=tuple(s.name for s in pretrain.plan_sweep(cfg)))]


def fragment(cfg: PretrainRunConfig, stage: Stage) -> dict:
    return {}  # the report is a function of its upstream outcomes only (their keys are in its key)


def run(cfg: PretrainRunConfig, stage: Stage, upstream: dict[str, dict], ctx: Context) -> StageResult:
    """The tables and the plot of the pretrain stages in `upstream` (the stage's deps, in plan order;
    a failed one is listed in info["missing"])."""
    results = [upstream[name]["info"] for name in stage.deps if name in upstream]
    missing = [name for name in stage.deps if name not in upstream]
    rows = compare(results)
    summary = summarize(rows)
    table = tables(rows, summary)
    with atomic_dir(Path(ctx.root) / FOLDER) as tmp:
        (tmp / "sweep_results.md").write_text(table + "\n")
        (tmp / "sweep_results.csv").write_text(csv(rows) + "\n")
        write_json_atomic(tmp / "sweep_results.json", {"rows": rows, "summary": summary, "runs": results,
                                                       "missing": missing, "config": asdict(cfg)})
        first = min((r.get("seed") or 0 for r in results), default=0)
        plot_losses([r for r in results if (r.get("seed") or 0) == first], tmp / "loss_curves.png")
    files = [str(Path(ctx.root) / FOLDER / name) for name in FILES]
    return StageResult(outputs=FOLDER, metrics={"runs": len(results), "missing": len(missing)},
                       info={"table": table, "rows": rows, "summary": summary, "comparison": rows, "files": files,
                             "missing": missing})


def compare(results: list[dict]) -> list[dict]:
    """Table rows: each run relative to the FP run of its corpus and seed."""
    fp = {(r["corpus"], r.get("seed")): r for r in results if r["recipe"] == "fp"}
    out = []
    for r in results:
        ref = fp.get((r["corpus"], r.get("seed")))

        def rel(k: str, r: dict = r, ref: dict | None = ref) -> float | None:
            return r[k] / ref[k] if ref and ref[k] else None

        out.append({"corpus": r["corpus"], "recipe": r["recipe"], "seed": r.get("seed"),
                    "val_loss": r["val_loss"], "val_ppl": r["val_ppl"],
                    "rel_to_fp": rel("val_loss"), "diverged": r["diverged"], "opt_state_bytes": r["opt_state_bytes"],
                    "opt_bytes_vs_fp": rel("opt_state_bytes"), "step_s": r["step_s"],
                    "step_time_vs_fp": rel("step_s"), "quantized_layers": r["quantized_layers"], "steps": r["steps"]})
    return out


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (corpus, recipe) over its seeds: mean val loss, mean/std/max of the gap to FP
    (rel_to_fp - 1, a fraction), diverged seeds, and the mean of the byte and time ratios."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["corpus"], r["recipe"]), []).append(r)
    out = []
    for (corpus, recipe), rs in groups.items():
        gaps = [r["rel_to_fp"] - 1 for r in rs if r["rel_to_fp"] is not None and math.isfinite(r["rel_to_fp"])]
        out.append({"corpus": corpus, "recipe": recipe, "seeds": len(rs), "val_loss": _mean(r["val_loss"] for r in rs),
                    "rel_to_fp": _mean(r["rel_to_fp"] for r in rs), "gap_mean": _mean(gaps),
                    "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0 if gaps else None,
                    "gap_max": max(gaps) if gaps else None, "diverged": sum(bool(r["diverged"]) for r in rs),
                    "opt_state_bytes": rs[0]["opt_state_bytes"], "opt_bytes_vs_fp": rs[0]["opt_bytes_vs_fp"],
                    "step_s": _mean(r["step_s"] for r in rs),
                    "step_time_vs_fp": _mean(r["step_time_vs_fp"] for r in rs)})
    return out


def tables(rows: list[dict], summary: list[dict]) -> str:
    """Every run; with several seeds, the summary over seeds first."""
    table = markdown_table(rows, list(rows[0]) if rows else [])
    if len({r["seed"] for r in rows}) > 1:
        table = ("Mean over seeds (gap = val loss / FP val loss of the same seed - 1):\n\n"
                 + markdown_table(summary, list(summary[0])) + "\n\nEvery run:\n\n" + table)
    return table


def csv(rows: list[dict]) -> str:
    cols = list(rows[0]) if rows else []
    return "\n".join([",".join(cols)] + [",".join("" if r[c] is None else str(r[c]) for c in cols) for r in rows])


def _ema(values, alpha: float = 0.1) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None or not math.isfinite(ema) else (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


def _panel(ax, corpus: str, runs: list[dict], colors) -> None:
    for i, r in enumerate(runs):
        steps, losses = zip(*r["history"]["train"])
        style = {"ls": "--", "lw": 1.0} if r["diverged"] else {"ls": "-", "lw": 1.3}
        label = r["recipe"] + (" (diverged)" if r["diverged"] else "")
        ax.plot(steps, _ema(losses), color=colors[i % 20], label=label, **style)
        if r["history"]["val"]:
            ax.plot(*zip(*r["history"]["val"]), "o", color=colors[i % 20], ms=3)
    ok = [v for r in runs if not r["diverged"] for _, v in r["history"]["train"] + r["history"]["val"]]
    finals = [r["val_loss"] for r in runs if not r["diverged"]]
    if ok and finals:
        ax.set_ylim(min(ok) - 0.1, max(finals) + 0.6 * (max(ok) - max(finals)) ** 0.5 + 0.5)
    seeds = sorted({r.get("seed") for r in runs} - {None})
    seed = f", seed {seeds[0]}" if len(seeds) == 1 else ""
    ax.set(title=f"{corpus}{seed}: train loss (EMA), val loss (dots)", xlabel="step", ylabel="loss")
    ax.legend(fontsize=7, ncol=2)


def plot_losses(results: list[dict], path: Path) -> Path:
    """Smoothed training loss (lines) and validation loss (dots) per recipe, one panel per
    corpus. Diverged runs are dashed and the y-axis stays on the runs that did not diverge."""
    corpora = sorted({r["corpus"] for r in results}) or ["(no runs)"]
    fig = Figure(figsize=(7.5 * len(corpora), 5))
    axes = fig.subplots(1, len(corpora), squeeze=False)
    colors = colormaps["tab20"].colors
    for ax, corpus in zip(axes[0], corpora):
        _panel(ax, corpus, [r for r in results if r["corpus"] == corpus and r["history"]["train"]], colors)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
