"""MREM figures: accuracy vs FP and RTN, MREM-P vs MREM-S speed, per-actor memory.

    python -m bench.mrem --tasks sst2 rte mrpc                                   # every figure of the plan
    python -m bench.mrem --tasks mrpc --seed 1 --only mrem_p_w4a8                # a replicate, beside seed 0
    python -m bench.mrem --tasks mrpc --only mrem_p_w2a8 --set mrem.steps=800    # a recorded setting (details)
    python -m bench.mrem --tasks mrpc --only mrem_p_w2a8 --set mrem.calib_samples=3668 --out runs/pilot.json
    python -m bench.mrem --tasks sst2 --speed --set mrem.steps=100               # P vs S, nothing else running
    python -m bench.mrem --tasks sst2 --memory                                   # the single-process baseline
    python -m bench.mrem --write-only                                            # mrem.md again from mrem.json

Figures are the entries of bench/plans/mrem.yaml, each run from the task's FP reference through
pipelines.runner.run (the store resumes an interrupted bench). Writes bench/results/mrem.json and .md and
logs them to MLflow.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench import common
from pipelines.config import load_config
from pipelines.config_dict import to_dict

ROOT = common.ROOT

PLAN_FILE = common.PLANS / "mrem.yaml"
RESULTS = ROOT / "bench" / "results" / "mrem.json"
KINDS = {"rtn": ("rtn",), "mrem": ("calibrate", "mrem"),  # stage kinds of a figure, from the FP reference
         "mrem_e2e": ("calibrate", "mrem", "mrem-e2e")}
MODULE_STATS = ("module", "layers", "steps", "stop_reason", "s_per_step", "peak_rss_mb", "pushed_bytes",
                "initial_error", "final_error", "repeated_batches", "waited_for_predecessor_s",
                "final_outputs_from_step", "heldout_curve")


def fp_points(task: str) -> float:
    fp = common.fp_reference(task)
    return fp["f1"] if task in ("mrpc", "qqp") else fp["accuracy"]


def run_figure(cfg, fig: common.Figure, task: str) -> tuple[float, dict]:
    """(dev metric in points, details) of one RTN or MREM figure, from the task's FP reference."""
    # the driver loads Ray: judging and writing recorded figures need none of it
    from pipelines import runner
    from pipelines.stages import plan_kinds

    checkpoint = str(ROOT / common.fp_reference(task)["checkpoint"])
    stages = plan_kinds(cfg, KINDS[fig.method], checkpoint, with_report=False)
    summary = runner.run(cfg, stages, name=f"bench-{fig.key}")
    outcome = common.figure_of(summary, stages)
    row, info = outcome["row"], outcome.get("info", {})
    detail = {"wall_s": row.get("wall_s"), "bytes": info.get("packed_bytes", info.get("bytes"))}
    if fig.method == "mrem_e2e":  # the MREM stage it tuned, then what the tuning added
        source = common.figure_of(summary, stages[:-1])
        e2e, info = info, source["info"]
    if fig.method in ("mrem", "mrem_e2e"):
        detail.update({k: info.get(k) for k in ("train_s", "calib_s", "calib_bytes")},
                      module_errors=info.get("chain_errors"), rtn_module_errors=info.get("rtn_chain_errors"),
                      modules=[{k: s.get(k) for k in MODULE_STATS} for s in info.get("modules_stats", [])],
                      student_dropout=cfg.mrem.student_dropout,
                      steps=cfg.mrem.steps if not cfg.mrem.converge else info.get("steps"),
                      stop_reasons=info.get("stop_reasons"))
    if fig.method == "mrem_e2e":
        detail.update(mrem_value=source["row"]["value"], mrem_train_s=info.get("train_s"), e2e_train_s=e2e["train_s"],
                      e2e_steps=e2e["steps"], e2e_workers=e2e["workers"], e2e=to_dict(cfg.mrem.e2e),
                      train_s=round(info.get("train_s", 0) + e2e["train_s"], 1), wall_s=row.get("wall_s"))
    return row["value"], detail


def figure_config(plan: common.Plan, fig: common.Figure, task: str, args, *more: str):
    section = "rtn" if fig.method == "rtn" else "mrem"
    seed = [] if args.seed is None else [f"mrem.seed={args.seed}"]
    overrides = [f"tasks=[{task}]", *plan.overrides(fig.key), f"{section}.quant=[{fig.quant}]", *args.set, *seed]
    return load_config(ROOT / plan.config, [*overrides, *more])


def run_task(task: str, plan: common.Plan, args, save) -> None:
    """Each figure of the plan (or --only) on the task, saved as soon as it is measured."""
    save({"fp": fp_points(task)}, {})  # every record, replicates included, holds the FP it is judged against
    for fig in (f for f in plan.runnable(args.only) if f.method != "reference"):
        metric, detail = run_figure(figure_config(plan, fig, task, args), fig, task)
        save({fig.key: metric}, {fig.key: {**detail, "command": args.command}})
        print(f"[bench mrem] {task} {fig.key}: {metric}", flush=True)


def measure_speed(task: str, plan: common.Plan, args) -> dict:
    """MREM-P (2 actors) vs MREM-S training time, same steps per module, nothing else running."""
    times = {}
    for key, mode in (("mrem_p_w4a8", "parallel"), ("mrem_s_w4a8", "sequential")):
        cfg = figure_config(plan, plan.figures[key], task, args, "output_dir=runs/mrem_speed")
        _, detail = run_figure(cfg, plan.figures[key], task)
        times[mode] = {"train_s": detail["train_s"],
                       "s_per_step": [round(m["s_per_step"], 3) for m in detail["modules"]]}
    return {"steps_per_module": cfg.mrem.steps, "quant": "w4a8", "train_s": times,
            "speedup_p2_vs_s": round(times["sequential"]["train_s"] / times["parallel"]["train_s"], 2),
            "command": args.command}


def _single_process_peak(checkpoint: str, cache: str, quant: str, queue) -> None:
    """One process holding the whole FP teacher, its quantized student and every boundary's activations,
    doing a few Adam reconstruction steps (batch 16): what MREM's actors each avoid holding."""
    import resource

    import numpy as np
    import torch

    from pipelines import checkpoints
    from pipelines.calibration import read_shard
    from quant import QuantConfig, quantize_model

    torch.set_num_threads(1)
    teacher, student = checkpoints.load(checkpoint).model, checkpoints.load(checkpoint).model
    quantize_model(student, QuantConfig.parse(quant))
    shards = [{k: np.array(v) for k, v in read_shard(d).items()}  # copies: memory-mapped pages would not count
              for b in sorted(Path(cache).glob("b*")) for d in sorted(b.iterdir())]
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    for step in range(3):
        rows = slice(16 * step, 16 * step + 16)
        ids = torch.from_numpy(shards[0]["input_ids"][rows]).long()
        mask = torch.from_numpy(shards[0]["attention_mask"][rows]).long()
        with torch.no_grad():
            target = teacher.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out = student.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad()
    queue.put({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "activation_bytes": sum(a.nbytes for sh in shards for a in sh.values())})


def measure_memory(task: str, plan: common.Plan, args) -> dict:
    """Peak RSS of the single-process baseline, beside the per-actor peaks recorded by the runs."""
    import multiprocessing as mp

    cfg = load_config(ROOT / plan.config, [f"tasks=[{task}]", *args.set])
    found = sorted(Path(cfg.mrem.cache_dir).glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    metas = {c.parent: m for c in found if (m := json.loads(c.read_text())).get("task") == task}
    multi = [d for d, m in metas.items() if m["boundaries"] > 1 and m["num_samples"] == cfg.mrem.calib_samples]
    if not multi:
        raise SystemExit(f"no activation cache of {cfg.mrem.calib_samples} samples for {task} in {cfg.mrem.cache_dir}: "
                         "run bench/mrem.py first (or --set mrem.calib_samples=N)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    checkpoint = str(ROOT / common.fp_reference(task)["checkpoint"])
    proc = ctx.Process(target=_single_process_peak, args=(checkpoint, str(multi[-1]), "w2a8", queue))
    proc.start()
    out = queue.get(timeout=1200)
    proc.join()
    return {**out, "cache": str(multi[-1]), "command": args.command}


def recipe(detail: dict) -> tuple:
    """How an MREM run trained, as far as replicates must agree (records without "steps" ran 400)."""
    return detail.get("student_dropout"), detail.get("steps", 400)


def by_seed(res: dict) -> dict[str, dict]:
    """{figure: {seed: value}}: seed 0 (the main figure) and the --seed replicates trained like the first of
    them; seed 0 only when it trained like them, and alone when fewer than two values agree."""
    out = {}
    for key, value in res["metrics"].items():
        if key not in res["details"]:  # the FP reference: the same model at every seed
            out[key] = {0: value}
            continue
        reps = [(int(s), r["metrics"][key], recipe(r["details"][key]))
                for s, r in sorted(res.get("seeds", {}).items()) if key in r["metrics"]]
        same = {s: v for s, v, how in reps if how == reps[0][2]} if reps else {}
        if reps and recipe(res["details"].get(key, {})) == reps[0][2]:
            same = {0: value, **same}
        out[key] = same if len(same) >= 2 else {0: value}
    return out


def summarize(results: dict) -> None:
    """Derived figures kept in the JSON: seed spreads, speed-ups, bytes moved, memory; the judged view."""
    for res in results.get("tasks", {}).values():
        d = res["details"]
        if res.get("seeds"):
            res["seed_stats"] = {k: {x: common.spread(v)[x] for x in ("values", "mean", "std")}
                                 for k, v in by_seed(res).items() if len(v) > 1}
        for q in ("w4a8", "w2a8"):
            if f"mrem_p_{q}" in d and f"mrem_s_{q}" in d:
                res[f"speedup_p2_vs_s_{q}"] = round(d[f"mrem_s_{q}"]["train_s"] / d[f"mrem_p_{q}"]["train_s"], 2)
        runs = {k: v["modules"] for k, v in d.items() if "modules" in v}
        res["wall_s"] = {k: v["wall_s"] for k, v in d.items()}
        res["peak_rss_mb"] = {k: [round(m["peak_rss_mb"]) for m in ms] for k, ms in runs.items()}
        res["s_per_step"] = {k: [round(m["s_per_step"], 3) for m in ms] for k, ms in runs.items()}
        res["object_store_bytes_pushed"] = {k: sum(m["pushed_bytes"] for m in ms) for k, ms in runs.items()}
    tasks = results.get("tasks", {})
    speed = [r["speed"]["speedup_p2_vs_s"] for r in tasks.values() if "speed" in r]
    results.update({t: {k: common.mean(v) for k, v in by_seed(r).items()} for t, r in tasks.items()},
                   speedup_p2_vs_s=speed[0] if speed else None, wall_s={t: r.get("wall_s") for t, r in tasks.items()},
                   peak_rss_mb={t: r.get("peak_rss_mb") for t, r in tasks.items()})


def training(detail: dict) -> dict:
    """A figure's steps per module (recorded fixed-step runs without "steps" ran 400; "+N": mrem-e2e's steps) and
    its training time (MREM's, plus mrem-e2e's)."""
    if "modules" not in detail:
        return {"steps": None, "train_s": None}
    steps = detail.get("steps", 400)
    text = "/".join(map(str, steps)) if isinstance(steps, list) else str(steps)
    if "e2e_steps" in detail:
        text += f" +{detail['e2e_steps']}"
    return {"steps": text, "train_s": detail.get("train_s")}


def tables(results: dict, plan: common.Plan) -> tuple[list[dict], list[dict]]:
    main, speed = [], []
    for task, res in results.get("tasks", {}).items():
        main += common.main_rows(plan, task, by_seed(res), info=lambda key, d=res["details"]: training(d.get(key, {})))
        sp, single = res.get("speed", {}), res.get("single_process", {})
        rss = [max(v) for k, v in res.get("peak_rss_mb", {}).items() if k.startswith("mrem_p")]
        speed.append({"task": task, "speedup_p2_vs_s": sp.get("speedup_p2_vs_s"),
                      "target >= 1.7x": None if not sp else sp["speedup_p2_vs_s"] >= 1.7,
                      "speed_run": f"{sp['steps_per_module']} steps/module, {sp['quant']}" if sp else None,
                      "actor_peak_rss_MB": max(rss, default=None),
                      "single_process_peak_rss_MB": single.get("peak_rss_mb"),
                      "bytes_pushed_p_w4a8": res.get("object_store_bytes_pushed", {}).get("mrem_p_w4a8")})
    return main, speed


SPEED_COLUMNS = ["task", "speedup_p2_vs_s", "target >= 1.7x", "speed_run", "actor_peak_rss_MB",
                 "single_process_peak_rss_MB", "bytes_pushed_p_w4a8"]


MAIN_COLUMNS = [*common.MAIN_COLUMNS, "steps", "train_s"]


def write(results: dict, path: Path, plan: common.Plan) -> None:
    summarize(results)
    main, speed = tables(results, plan)
    md = common.markdown(
        plan.title, plan.intro, (main, MAIN_COLUMNS),
        ("Speed and memory", ("speedup_p2_vs_s: MREM-S training time over MREM-P's (2 actors) in a timing run "
                              "alone on the machine (`--speed`); actor_peak_rss_MB: the largest peak of an MREM-P "
                              "module actor; single_process_peak_rss_MB: one process holding the whole teacher, "
                              "student and activations (`--memory`); bytes_pushed: actor-to-actor object-store "
                              "bytes of MREM-P W4A8."), speed, SPEED_COLUMNS),
        "Commands: each run's `command` in mrem.json.")
    common.write_results(path, results, md)


def log_to_mlflow(results: dict, path: Path, plan: common.Plan, experiment: str) -> str:
    main, speed = tables(results, plan)
    metrics = {f"{r['task']}.{r['figure']}": r["value"] for r in main}
    metrics.update({f"{r['task']}.speedup_p2_vs_s": r["speedup_p2_vs_s"] for r in speed})
    return common.log_results(experiment, [path, path.with_suffix(".md")], {"mrem_main": main, "mrem_speed": speed},
                              metrics, results.get("command", ""))


def add_args(parser) -> None:
    parser.add_argument("--speed", action="store_true", help="only time MREM-P vs MREM-S (W4A8)")
    parser.add_argument("--memory", action="store_true", help="only the single-process baseline")


def main() -> None:
    args = common.cli(__doc__, add_args)
    plan = common.load_plan(PLAN_FILE)
    path = Path(args.out).resolve() if args.out else RESULTS
    results = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    base = load_config(ROOT / plan.config)
    experiment = base.experiment_name
    if common.write_or_log(args, results, path, plan, write, log_to_mlflow, experiment):
        return
    args.command = " ".join(["python -m bench.mrem", *sys.argv[1:]])
    if not (args.speed or args.memory or args.seed is not None):  # these record their own command
        results.update(command=args.command, config_file=plan.config, overrides=args.set)
    for task in args.tasks or base.tasks:
        start, record = time.time(), results["tasks"].setdefault(task, {"metrics": {}, "details": {}})
        if args.speed or args.memory:
            record["speed" if args.speed else "single_process"] = (measure_speed if args.speed else measure_memory)(
                task, plan, args)
            write(results, path, plan)
            continue
        if args.seed is not None:  # a replicate: its own record, the main table keeps seed 0
            record = record.setdefault("seeds", {}).setdefault(str(args.seed), {"metrics": {}, "details": {}})

        def save(metrics: dict, details: dict, record=record, start=start) -> None:
            record["metrics"].update(metrics)
            record["details"].update(details)
            record["bench_wall_s"] = round(time.time() - start, 1)
            write(results, path, plan)

        run_task(task, plan, args, save)
    if path == RESULTS:  # the recorded figures, not a pilot's (--out)
        print(f"MLflow run {log_to_mlflow(results, path, plan, experiment)} ({experiment})")


if __name__ == "__main__":
    main()
