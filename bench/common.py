"""What every bench repeats: its plan (YAML), seeds and replicates, judging targets (with gaps paired by
seed), writing its JSON and Markdown atomically, logging the figures to MLflow; and the FP references."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.io import markdown_table, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
PLANS = ROOT / "bench" / "plans"
FP = ROOT / "bench" / "results" / "fp_reference.json"


# ---- plans ------------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """One recorded figure: how to run it (method, QuantConfig, its config overrides) or why it cannot be."""
    key: str
    method: str
    quant: str | None = None
    recipe: str = "main"                  # a name in Plan.recipes: data/finetune settings, one output folder each
    base: str | None = None               # a name in Plan.bases: the settings a method's base pins
    set: list[str] = field(default_factory=list)
    recorded_only: str | None = None      # why it can no longer run (a removed setting); its figures stay


@dataclass
class Target:
    """figure >= vs - margin (or, with `within`, |figure - vs| <= within), judged on seed means."""
    figure: str
    vs: str
    margin: float = 0.0
    within: float | None = None

    @property
    def label(self) -> str:
        if self.within is not None:
            return f"abs({self.figure} - {self.vs}) <= {self.within:g}"
        sign = "-" if self.margin >= 0 else "+"
        return f"{self.figure} >= {self.vs}" + (f" {sign} {abs(self.margin):g}" if self.margin else "")


@dataclass
class Plan:
    config: str
    figures: dict[str, Figure]
    recipes: dict[str, list[str]] = field(default_factory=dict)
    bases: dict[str, list[str]] = field(default_factory=dict)
    main: dict[str, str] = field(default_factory=dict)          # method label -> figure key
    targets: list[Target] = field(default_factory=list)
    ablations: list[dict] = field(default_factory=list)         # {figure, vs, change}
    smoke: dict = field(default_factory=dict)                   # {config, set}
    title: str = ""
    intro: str = ""

    def overrides(self, key: str) -> list[str]:
        """The figure's config overrides: its recipe's, its base's, then its own."""
        f = self.figures[key]
        return [*self.recipes.get(f.recipe, []), *(self.bases[f.base] if f.base else []), *f.set]

    def runnable(self, keys: list[str] | None) -> list[Figure]:
        """The figures to run (all, or `keys`); asking for a recorded-only or unknown figure is an error."""
        unknown = [k for k in keys or [] if k not in self.figures]
        if unknown:
            raise SystemExit(f"not in the plan: {', '.join(unknown)}")
        chosen = [self.figures[k] for k in keys] if keys else list(self.figures.values())
        stale = [f"{f.key} ({f.recorded_only})" for f in chosen if f.recorded_only]
        if keys and stale:
            raise SystemExit(f"recorded only, cannot run: {', '.join(stale)}")
        return [f for f in chosen if not f.recorded_only]


def load_plan(path: str | Path) -> Plan:
    raw = yaml.safe_load(Path(path).read_text())
    unknown = set(raw) - set(Plan.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    figures = {k: Figure(key=k, **v) for k, v in raw.pop("figures").items()}
    targets = [Target(**t) for t in raw.pop("targets", [])]
    plan = Plan(figures=figures, targets=targets, **raw)
    named = {t.figure for t in targets} | {t.vs for t in targets} | set(plan.main.values())
    named |= {a[k] for a in plan.ablations for k in ("figure", "vs")}
    missing = sorted(named - set(figures))
    bad = [f.key for f in figures.values() if f.recipe not in plan.recipes or (f.base and f.base not in plan.bases)]
    if missing or bad:
        raise ValueError(f"{path}: figures not in the plan: {missing}; unknown recipe or base: {bad}")
    return plan


def cli(doc: str, extra=None) -> argparse.Namespace:
    """The arguments every bench script takes (extra: a function adding its own)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="figure keys of the plan (default: every runnable)")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. prequant.lr=1e-3")
    parser.add_argument("--seed", type=int, default=None, help="a replicate, recorded beside the main figures")
    parser.add_argument("--out", default=None, help="results file (default bench/results/<bench>.json); pilots")
    parser.add_argument("--log-only", action="store_true", help="only log the recorded figures to MLflow")
    parser.add_argument("--write-only", action="store_true", help="only rewrite the Markdown from the JSON")
    if extra:
        extra(parser)
    return parser.parse_args()


def figure_of(summary, stages: list) -> dict:
    """A figure's outcome in a pipelines.runner.RunSummary: that of the last of `stages` with a report row."""
    return [summary.outcomes[s.name] for s in stages if summary.outcomes.get(s.name, {}).get("row")][-1]


# ---- seeds, replicates, learning-rate search ------------------------------------------------------------

def lr_label(detail: dict) -> str:
    """A run's place in the learning-rate search: its lr, and its head's where one was recorded apart."""
    head = detail.get("head_lr")
    return str(detail.get("lr")) if head is None else f"{detail.get('lr')} (head {head})"


def merge_figure(old: tuple[float, dict] | None, new: tuple[float, dict]) -> tuple[float, dict]:
    """The learning-rate search: a figure re-run at another lr joins the earlier runs and the best dev score
    stands (each lr's run in details["lr_runs"], its score in "lr_search"); a re-run at the same lr replaces
    that lr's run; figures without an lr (RTN) replace."""
    metric, detail = new
    if old is None or old[0] is None or "lr" not in old[1] or "lr" not in detail:
        return new
    runs = dict(old[1].get("lr_runs") or {lr_label(old[1]): {**old[1], "metric": old[0]}})
    runs[lr_label(detail)] = {**detail, "metric": metric}
    best = max(runs, key=lambda lr: runs[lr]["metric"])
    chosen = {k: v for k, v in runs[best].items() if k != "metric"}
    return runs[best]["metric"], {**chosen, "lr_search": {lr: r["metric"] for lr, r in runs.items()}, "lr_runs": runs}


def lrs_tried(detail: dict | None) -> int | str:
    """How many learning rates a figure's search tried; 0 without an lr (RTN), "?" without details."""
    if detail is None:
        return "?"
    if detail.get("lr") is None:
        return 0
    return len(detail.get("lr_search") or {}) or 1


def mean(by_seed: dict | None) -> float | None:
    return round(statistics.mean(by_seed.values()), 2) if by_seed else None


def spread(by_seed: dict) -> dict:
    """Every seed's value, their mean and sample std (std only from two seeds)."""
    values = list(by_seed.values())
    return {"values": values, "by_seed": dict(by_seed), "mean": mean(by_seed),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else None}


def paired_gap(a: dict, b: dict, margin: float = 0.0) -> tuple[float, float, int] | None:
    """a - (b - margin) over the seeds both ran at: (mean, standard error, n); None below two common seeds.
    The spread that both share is taken out."""
    gaps = [a[s] - (b[s] - margin) for s in a.keys() & b.keys()]
    if len(gaps) < 2:
        return None
    return statistics.mean(gaps), statistics.stdev(gaps) / math.sqrt(len(gaps)), len(gaps)


def fmt_gap(gap: tuple[float, float, int] | None) -> str | None:
    return None if gap is None else f"{gap[0]:+.2f} ± {gap[1]:.2f} ({gap[2]} seeds)"


# ---- judging ----------------------------------------------------------------------------------------------

def judge(target: Target, by_seed: dict[str, dict]) -> dict | None:
    """A target on one task's figures ({key: {seed: value}}): measured, bar, met, paired gap; None when a
    side is missing."""
    a, b = by_seed.get(target.figure), by_seed.get(target.vs)
    if not a or not b:
        return None
    if target.within is not None:
        gap = round(abs(mean(a) - mean(b)), 2)
        return {"target": target.label, "measured": gap, "bar": target.within, "met": gap <= target.within,
                "paired_gap": None}
    bar = round(mean(b) - target.margin, 2)
    return {"target": target.label, "measured": mean(a), "bar": bar, "met": mean(a) >= bar,
            "paired_gap": fmt_gap(paired_gap(a, b, target.margin))}


def main_rows(plan: Plan, task: str, by_seed: dict[str, dict], fp_label: str = "fp", info=None) -> list[dict]:
    """The main table's rows for one task: each method's recommended figure against FP, with its targets.
    info(key) -> dict adds columns (trainable %, size, ...)."""
    fp = by_seed.get(plan.main.get(fp_label))
    labels = {key: label for label, key in plan.main.items()}
    rows = []
    for label, key in plan.main.items():
        values = by_seed.get(key)
        if not values:
            continue
        verdicts = []
        for t in (t for t in plan.targets if t.figure == key):
            j = judge(t, by_seed)
            if j:
                vs = labels.get(t.vs, t.vs)
                bar = f"abs({label} - {vs}) <= {t.within:g}" if t.within is not None else \
                    f">= {vs}" + (f" {'-' if t.margin > 0 else '+'} {abs(t.margin):g}" if t.margin else "")
                verdicts.append(f"{bar}: {'met' if j['met'] else 'missed'}"
                                + (f", paired {j['paired_gap']}" if j["paired_gap"] else ""))
        vs_fp = None if not fp or label == fp_label else f"{mean(values) - mean(fp):+.2f}"
        rows.append({"task": task, "method": label, "figure": key, "value": mean(values), "seeds": len(values),
                     "vs_fp": vs_fp, "paired_vs_fp": fmt_gap(paired_gap(values, fp)) if fp and vs_fp is not None
                     else None, "targets": "; ".join(verdicts) or None, **(info(key) if info else {})})
    return rows


def ablation_rows(plan: Plan, task: str, by_seed: dict[str, dict]) -> list[dict]:
    """One setting changed at a time: each ablation's figure against the figure it varies, where both ran."""
    rows = []
    for a in plan.ablations:
        x, y = by_seed.get(a["figure"]), by_seed.get(a["vs"])
        if x and y:
            rows.append({"task": task, "change": a["change"], "figure": a["figure"], "value": mean(x),
                         "seeds": len(x), "vs": a["vs"], "vs_value": mean(y), "delta": f"{mean(x) - mean(y):+.2f}",
                         "paired": fmt_gap(paired_gap(x, y))})
    return rows


MAIN_COLUMNS = ["task", "method", "figure", "value", "seeds", "vs_fp", "paired_vs_fp", "targets"]
ABLATION_COLUMNS = ["task", "change", "figure", "value", "seeds", "vs", "vs_value", "delta", "paired"]


# ---- writing and logging ----------------------------------------------------------------------------------

def markdown(title: str, intro: str, main: tuple[list[dict], list[str]],
             second: tuple[str, str, list[dict], list[str]] | None = None, footer: str = "") -> str:
    """A results page: the main table first, then at most one other table (heading, text, rows, columns)."""
    parts = [f"# {title}", "", intro, "", markdown_table(*main), ""]
    if second and second[2]:
        heading, text, rows, cols = second
        parts += [f"## {heading}", "", text, "", markdown_table(rows, cols), ""]
    if footer:
        parts += [footer, ""]
    return "\n".join(parts)


def write_or_log(args: argparse.Namespace, results: dict, path: Path, plan: Plan, write, log, experiment: str) -> bool:
    """--write-only rewrites the pages from the recorded JSON, --log-only logs it to MLflow; True when either ran."""
    if args.write_only:
        write(results, path, plan)
    elif args.log_only:
        print(f"MLflow run {log(results, path, plan, experiment)} ({experiment})")
    return bool(args.write_only or args.log_only)


def write_results(path: Path, results: dict, md: str) -> None:
    """The figures (JSON) and their page (Markdown beside it), each written atomically."""
    write_json_atomic(path, results)
    write_text_atomic(path.with_suffix(".md"), md)


def log_results(experiment: str, files: list[Path], tables: dict[str, list[dict]], metrics: dict[str, float],
                command: str) -> str:
    """The recorded figures in MLflow: one `bench-results` run with the results files, each table as an MLflow
    table and every figure as a metric; returns the run id."""
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


# ---- FP references, processes -----------------------------------------------------------------------------

def fp_reference(task: str) -> dict:
    """The task's FP reference as bench/fp_reference.py recorded it (metrics in points, its checkpoint)."""
    recorded = json.loads(FP.read_text()) if FP.exists() else {}
    if task not in recorded:
        raise SystemExit(f"no FP reference for {task} in {FP}: run python bench/fp_reference.py --tasks {task}")
    return recorded[task]


def free_port() -> int:
    """A TCP port nobody listens on now (for Ray heads and MLflow servers started by benches and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything it spawned (a `ray start --block`
    head and its daemons, an `mlflow server`): SIGTERM to its group, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
