"""The comparison report: one table (method x task) and a plot of metric vs weight bits.

Written as Markdown, CSV and PNG into the run folder (the runner logs them to the parent MLflow run).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from pipelines.io import markdown_table, write_text_atomic

# latency_ms: an exported model's median forward time in its runtime (export.latency_*); model_MB: its files.
# wall_s: the stage's time from its start (queueing for workers included); cpu_s/gpu_s: wall_s times the
# CPUs/GPUs its workers reserved; value and drop_vs_fp in points of the task's main metric (perplexity: as is).
COLUMNS = ["task", "method", "bits", "metric", "value", "drop_vs_fp", "trainable_pct", "model_MB",
           "latency_ms", "wall_s", "cpu_s", "gpu_s"]
LOWER_IS_BETTER = ("ppl",)  # metrics whose rise is the loss: their rows show the increase over FP, not a drop
# After drop_vs_fp when any row's metric is lower-is-better: value - FP value, and that in % of the FP value.
INCREASE_COLUMNS = ["increase_vs_fp", "increase_pct"]


FLOOR = "majority-class"
# Reference lines in the plot, not points on a bits axis.
LINES = {"fp": ("--", "gray", "fp (32-bit)"), FLOOR: (":", "black", "majority class")}


@dataclass
class Report:
    rows: list[dict]
    table: str
    markdown: str
    csv: str
    plot: str | None


def columns(rows: list[dict]) -> list[str]:
    """The report's columns: COLUMNS, with INCREASE_COLUMNS when any row's metric is lower-is-better."""
    if not any(r.get("metric") in LOWER_IS_BETTER for r in rows):
        return COLUMNS
    at = COLUMNS.index("drop_vs_fp") + 1
    return COLUMNS[:at] + INCREASE_COLUMNS + COLUMNS[at:]


def versus_fp(row: dict, fp: float | None) -> dict:
    """A row against its task's FP value: the drop in points, or for a lower-is-better metric (perplexity)
    the increase, absolute and in % of FP."""
    if fp is None:
        return {"drop_vs_fp": None}
    if row.get("metric") in LOWER_IS_BETTER:
        rise = row["value"] - fp
        return {"drop_vs_fp": None, "increase_vs_fp": round(rise, 2) + 0.0,  # + 0.0: no "-0"
                "increase_pct": round(100 * rise / fp, 2) + 0.0 if fp else None}
    return {"drop_vs_fp": round(fp - row["value"], 2)}


def comparison_rows(rows: list[dict], floors: dict[str, tuple[str, float]] | None = None) -> list[dict]:
    """Rows ordered by task then bits (FP first), with the drop vs the task's FP reference (perplexity: the
    increase); each task's floor (`floors`: metric and value of always predicting the majority train label)
    last, as method `majority-class`: a model at it learned nothing."""
    fp = {r["task"]: r["value"] for r in rows if r["method"] == "fp"}
    rows = rows + [{"task": t, "method": FLOOR, "metric": m, "value": v, "trainable_pct": 0.0}
                   for t, (m, v) in (floors or {}).items()]
    cols = columns(rows)
    out = []
    for r in sorted(rows, key=lambda r: (r["task"], r["method"] == FLOOR, -r.get("bits", 32), r["method"])):
        out.append({**{c: r.get(c) for c in cols}, **versus_fp(r, fp.get(r["task"]))})
    return out


def readable(row: dict) -> dict:
    """A row as the Markdown table shows it: a lower-is-better metric's value and increase with two decimals
    (perplexities of random models run to tens of thousands); other rows as they are."""
    if row.get("metric") not in LOWER_IS_BETTER:
        return row
    return {**row, **{c: f"{row[c]:.2f}" for c in ("value", *INCREASE_COLUMNS) if isinstance(row.get(c), float)}}


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def family(method: str) -> str:
    """`rtn-w4a8` -> `rtn`, `mrem-parallel-w2a8` -> `mrem-parallel`, `rtn-w8a8@onnxruntime` -> `rtn@onnxruntime`:
    one line per method (and runtime of an export) in the plot."""
    method, at, runtime = method.partition("@")
    parts = method.split("-")
    keep = [p for p in parts if not (p[:1] == "w" and any(ch.isdigit() for ch in p))]
    return ("-".join(keep) or method) + at + runtime


def plot(rows: list[dict], path: Path) -> Path:
    """Metric vs weight bits, one panel per task, one line per method family (FP as a dashed line)."""
    tasks = sorted({r["task"] for r in rows})
    fig = Figure(figsize=(5 * len(tasks), 3.8))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        for fam in sorted({family(r["method"]) for r in mine if r["method"] not in LINES}):
            pts = sorted((r["bits"], r["value"]) for r in mine
                         if family(r["method"]) == fam and r["method"] not in LINES)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
        for r in (r for r in mine if r["method"] in LINES):
            style, color, label = LINES[r["method"]]
            ax.axhline(r["value"], linestyle=style, color=color, label=label)
        ax.set(title=task, xlabel="weight bits", ylabel=mine[0]["metric"] if mine else "metric")
        values = [r["value"] for r in mine if r["value"]]
        if mine and mine[0]["metric"] in LOWER_IS_BETTER and values and max(values) > 10 * min(values):
            ax.set_yscale("log")  # perplexities that grow by factors at low bits
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def report(rows: list[dict], out_dir: str | Path, floors: dict[str, tuple[str, float]] | None = None) -> Report:
    """Write report.md / report.csv / accuracy_vs_bits.png (with each task's `floors` row, see
    comparison_rows)."""
    out_dir = Path(out_dir)
    table_rows = comparison_rows(rows, floors)
    table = markdown_table([readable(r) for r in table_rows], columns(table_rows))
    md = write_text_atomic(out_dir / "report.md", "# plmq comparison\n\n" + table + "\n")
    csv_path = write_text_atomic(out_dir / "report.csv", _csv_text(table_rows))
    png = plot(table_rows, out_dir / "accuracy_vs_bits.png") if table_rows else None
    return Report(table_rows, table, str(md), str(csv_path), str(png) if png else None)
