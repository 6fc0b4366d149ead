"""PreQuant figures: FP, RTN, PreQuant (W4, W3, W4A8) and the PEFT baselines on the same low-bit base.

    python -m bench.prequant --tasks sst2 rte mrpc --only prequant_g128_w4_e6 lora_g128_w4_e6   # figures of the plan
    python -m bench.prequant --tasks sst2 --only prequant_g128_w4_e6 --seed 1                   # a replicate
    python -m bench.prequant --tasks sst2 --only lora_g128_w4_e6 --set prequant.lr=1e-3         # lr search
    python -m bench.prequant --tasks mrpc --only prequant_g128_w4_e6 --set prequant.budget_pct=0.9 \\
        --out runs/pilot.json                                                                   # a pilot
    python -m bench.prequant --smoke --only prequant_w4                                         # tiny-bert
    python -m bench.prequant --write-only    # prequant.md again from prequant.json; --log-only: to MLflow

Every figure is an entry of bench/plans/prequant.yaml: configs/prequant.yaml plus its recipe's, base's and own
overrides, narrowed to its method and QuantConfig, run by pipelines.runner.run (the store resumes what is
done). Its value is the dev metric in points, kept in bench/results/prequant.json under its key; a re-run at
another learning rate joins the figure's lr search (the best stands), a --seed run is a replicate beside it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import common
from pipelines.config import load_config

ROOT = common.ROOT

PLAN_FILE = common.PLANS / "prequant.yaml"
RESULTS = ROOT / "bench" / "results" / "prequant.json"
OUTPUT_DIR = "runs/bench_prequant"  # <recipe>[_seed<N>] below it: each recipe and seed keeps its own models
PEFT_STAGES = ("prequant-quantize", "prequant-finetune")
STAGES = {"fp": ("finetune", "evaluate"), "rtn": ("finetune", "rtn")}
SEARCHED = ("prequant.lr=", "finetune.lr=")  # a --set the lr search records; any other needs a pilot file
DETAIL_KEYS = ("trainable_pct", "trainable_params", "optimizer_state_bytes", "peak_rss_mb", "train_s", "steps",
               "quant", "model_MB", "wall_s")


def narrow(fig: common.Figure) -> list[str]:
    """Overrides that leave the config's plan with the figure's one method and QuantConfig."""
    if fig.method == "fp":
        return ["rtn.quant=[]", "mrem.quant=[]", "prequant.quant=[]"]
    if fig.method == "rtn":
        return [f"rtn.quant=['{fig.quant}']", "mrem.quant=[]", "prequant.quant=[]"]
    return [f"prequant.quant=['{fig.quant}']", f"prequant.methods=[{fig.method}]", "rtn.quant=[]", "mrem.quant=[]"]


def figure_overrides(plan: common.Plan, fig: common.Figure, task: str, args) -> list[str]:
    """The figure's whole override list; each recipe (and seed) keeps its models in its own folder."""
    out = f"{args.output_dir}/{fig.recipe}"
    seed = [] if args.seed is None else [f"finetune.seed={args.seed}"]
    return [f"tasks=[{task}]", *plan.overrides(fig.key), *narrow(fig), *args.set, *seed,
            f"output_dir={out}" + ("" if args.seed is None else f"_seed{args.seed}")]


def check_set(args) -> None:
    """Before any work: a setting the figure's key cannot tell apart goes to a pilot file (--out)."""
    other = [s for s in args.set if not s.startswith(SEARCHED)]
    if other and args.out is None:
        raise SystemExit(f"{', '.join(other)}: no key of {RESULTS.name} records this; pass --out runs/<pilot>.json")


def run_figure(cfg, fig: common.Figure) -> tuple[float, dict]:
    """(dev metric in points, details) of one figure: its stages planned from the config and run by the
    product's one driver."""
    # the driver loads Ray: judging and writing recorded figures need none of it
    from pipelines import runner
    from pipelines.stages import plan_kinds

    stages = plan_kinds(cfg, STAGES.get(fig.method, PEFT_STAGES), with_report=False)
    summary = runner.run(cfg, stages, name=f"bench-{fig.key}")
    outcome = common.figure_of(summary, stages)
    row, info = outcome["row"], outcome.get("info", {})
    if fig.method == "fp":  # FP's training is its fine-tune stage's
        ft = next(summary.outcomes[s.name].get("info") or {} for s in stages if s.kind == "finetune")
        info = {**info, "train_s": round(ft.get("wall_s", 0.0), 1), "steps": ft.get("steps")}
    lr = cfg.finetune.lr if fig.method in STAGES else cfg.prequant.lr
    detail = {k: info.get(k, row.get(k)) for k in DETAIL_KEYS if info.get(k, row.get(k)) is not None}
    detail["bytes"] = info.get("packed_bytes", info.get("bytes"))
    detail.update(lr=None if fig.method == "rtn" else lr, epochs=cfg.finetune.epochs,
                  batch_size=cfg.finetune.batch_size, pooling=cfg.finetune.pooling, output_dir=cfg.output_dir)
    if fig.method not in STAGES:
        detail.update({k: getattr(cfg.prequant, k) for k in ("quantizer", "criterion", "gptq", "train_norms")})
    return row["value"], detail


def merge_task(results: dict, task: str, row: dict, details: dict) -> None:
    """One invocation's figures into the results: the lr search keeps the best, other figures stay."""
    figures = dict(results.get(task, {}))
    recorded = dict(results.setdefault("details", {}).get(task, {}).get("details", {}))
    for key, metric in row.items():
        old = (figures.get(key), recorded[key]) if key in recorded else None
        figures[key], recorded[key] = common.merge_figure(old, (metric, details[key]))
    results[task] = figures
    results["details"][task] = {**results["details"].get(task, {}), "details": recorded}


def add_replicate(results: dict, task: str, key: str, seed: int, metric: float, detail: dict) -> None:
    """A --seed run of a figure, kept beside the main one; a re-run at the same seed and lr replaces it."""
    reps = results.setdefault("replicates", {}).setdefault(task, {}).setdefault(key, [])
    reps[:] = [r for r in reps if (r["seed"], common.lr_label(r)) != (seed, common.lr_label(detail))]
    reps.append({"seed": seed, "metric": metric,
                 **{k: detail.get(k) for k in ("lr", "head_lr", "epochs", "batch_size", "train_s", "command")}})
    reps.sort(key=lambda r: (r["seed"], r["lr"] or 0))


def by_seed(results: dict, task: str) -> dict[str, dict]:
    """{figure: {seed: value}}: the main figure at its seed and the replicates trained like it (same lr, head
    lr, epochs and batch size)."""
    task_details = results.get("details", {}).get(task, {})
    details, main_seed = task_details.get("details", {}), task_details.get("finetune", {}).get("seed", 42)
    out = {}
    for key, value in results.get(task, {}).items():
        if key not in details or value is None:
            continue
        d = details[key]
        how = (common.lr_label(d), d.get("epochs"), d.get("batch_size"))
        reps = results.get("replicates", {}).get(task, {}).get(key, [])
        out[key] = {main_seed: value, **{r["seed"]: r["metric"] for r in reps
                                         if (common.lr_label(r), r.get("epochs"), r.get("batch_size")) == how}}
    return out


def tables(results: dict, plan: common.Plan) -> tuple[list[dict], list[dict]]:
    """The main table (with the majority-class floor of each task) and the ablation table."""
    main, ablations = [], []
    for task in results.get("tasks", []):
        details = results.get("details", {}).get(task, {}).get("details", {})

        def info(key: str, details: dict = details) -> dict:
            d = details.get(key, {})
            return {"trainable_pct": d.get("trainable_pct"), "lrs": common.lrs_tried(d),
                    "model_MB": round(d["bytes"] / 2**20, 2) if d.get("bytes") else None}

        seeds = by_seed(results, task)
        main += common.main_rows(plan, task, seeds, info=info)
        main.append({"task": task, "method": "majority class", "value": results[task].get("majority_class")})
        ablations += common.ablation_rows(plan, task, seeds)
    return main, ablations


def write(results: dict, path: Path, plan: common.Plan) -> None:
    main, ablations = tables(results, plan)
    md = common.markdown(
        plan.title, plan.intro, (main, [*common.MAIN_COLUMNS, "trainable_pct", "model_MB", "lrs"]),
        ("Ablations", ("Each row changes one thing against the figure it varies (vs); delta = value - vs_value, "
                       "paired over the seeds both ran at where there are two or more. (removed): a setting no "
                       "longer in the product; its figures stay in the JSON."), ablations, common.ABLATION_COLUMNS),
        "lrs: learning rates the figure's search tried. Commands: each figure's `command` in prequant.json.")
    common.write_results(path, results, md)


def log_to_mlflow(results: dict, path: Path, plan: common.Plan, experiment: str) -> str:
    main, ablations = tables(results, plan)
    tasks = results.get("tasks", [])
    return common.log_results(experiment, [path, path.with_suffix(".md")],
                              {"prequant_main": main, "prequant_ablations": ablations},
                              {f"{t}.{k}": v for t in tasks for k, v in results[t].items()}, results.get("command", ""))


def run_task(task: str, plan: common.Plan, args) -> tuple[dict, dict]:
    row, details = {}, {}
    for fig in plan.runnable(args.only):
        cfg = load_config(ROOT / args.config, figure_overrides(plan, fig, task, args))
        row[fig.key], details[fig.key] = run_figure(cfg, fig)
        details[fig.key]["command"] = args.command
        print(f"[bench prequant] {task} {fig.key}: {row[fig.key]}", flush=True)
    return row, details


def main() -> None:
    args = common.cli(__doc__, lambda p: p.add_argument("--smoke", action="store_true", help="tiny-bert, a few steps"))
    plan = common.load_plan(PLAN_FILE)
    args.config = plan.smoke["config"] if args.smoke else plan.config
    args.output_dir = "runs/prequant_smoke" if args.smoke else OUTPUT_DIR
    if args.smoke:
        args.set = [*plan.smoke["set"], *args.set]
    path = Path(args.out).resolve() if args.out else (ROOT / "runs/prequant_smoke/prequant.json" if args.smoke
                                                      else RESULTS)
    results = json.loads(path.read_text()) if path.exists() else {}
    base = load_config(ROOT / args.config)
    experiment = base.experiment_name
    if common.write_or_log(args, results, path, plan, write, log_to_mlflow, experiment):
        return
    if not args.smoke:  # a smoke run writes under runs/, never into the recorded figures
        check_set(args)
    args.command = " ".join(["python -m bench.prequant", *sys.argv[1:]])
    if args.seed is None:
        results.update(command=args.command, config_file=args.config, overrides=args.set)
    results.update(model=base.model, machine=f"{platform.machine()}, {os.cpu_count()} cores")
    for task in args.tasks or base.tasks:
        start = time.time()
        row, details = run_task(task, plan, args)
        if args.seed is not None:
            for key, metric in row.items():
                add_replicate(results, task, key, args.seed, metric, details[key])
        else:
            merge_task(results, task, row, details)
            results["details"][task]["bench_wall_s"] = round(time.time() - start, 1)
            results["tasks"] = sorted(set(results.get("tasks", [])) | {task})
        write(results, path, plan)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if path == RESULTS:  # the recorded figures, not a pilot's or a smoke run's
        print(f"MLflow run {log_to_mlflow(results, path, plan, experiment)} ({experiment})")


if __name__ == "__main__":
    main()
