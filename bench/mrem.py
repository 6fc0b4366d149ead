"""MREM figures: accuracy vs FP and RTN, MREM-P vs MREM-S speed, per-actor memory.

    python bench/mrem.py --tasks sst2 [rte mrpc] [--config configs/mrem_bench.yaml] [--set mrem.steps=400]
    python bench/mrem.py --tasks mrpc --seed 1 --only mrem_p_w4a8 ...   # a replicate, kept beside seed 0
    python bench/mrem.py --tasks mrpc --only mrem_p_w2a8 --set mrem.steps=800 --out runs/pilot/x.json   # a pilot

Uses the FP references of bench/fp_reference.py (runs/fp_reference/<task>/finetune/model);
every run is also logged to MLflow (experiment plmq-mrem-bench). Writes
bench/results/mrem.json and .md, merging tasks into what is already there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import fp_reference, log_results, target_row  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.config import load_config, to_dict  # noqa: E402
from pipelines.io import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402
from pipelines.run import run_mrem_stage, run_rtn_stage  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "mrem.json"
# (key, method, quant, mode)
PLAN = [("rtn_w4a8", "rtn", "w4a8", None), ("rtn_w2a8", "rtn", "w2a8", None),
        ("mrem_p_w4a8", "mrem", "w4a8", "parallel"), ("mrem_s_w4a8", "mrem", "w4a8", "sequential"),
        ("mrem_p_w2a8", "mrem", "w2a8", "parallel"), ("mrem_s_w2a8", "mrem", "w2a8", "sequential"),
        ("rem_w2a8", "mrem", "w2a8", "rem")]


def points(result) -> float:
    return round(100 * result.main, 2)


MODULE_STATS = ("module", "layers", "s_per_step", "peak_rss_mb", "pushed_bytes", "initial_error", "final_error",
                "repeated_batches", "waited_for_predecessor_s")


def run_task(task: str, args, save=lambda partial: None) -> dict:
    fp = fp_reference(task)
    cfg = load_config(ROOT / args.config, [f"tasks=[{task}]", *args.set])
    checkpoint = str(ROOT / fp["checkpoint"])
    out, row = Path(cfg.output_dir).resolve(), {"fp": fp["f1"] if task in ("mrpc", "qqp") else fp["accuracy"]}
    details = {}
    with tracking.parent_run(cfg.experiment_name, f"bench-{task}", to_dict(cfg)):
        for key, method, quant, mode in PLAN:
            if args.only and key not in args.only:
                continue
            if method == "rtn":
                r = run_rtn_stage(cfg, task, checkpoint, quant, out)
                row[key] = points(r.eval)
                details[key] = {"wall_s": round(r.wall_s, 1), "bytes": r.packed_bytes}
                continue
            cfg.mrem.mode = mode
            r = run_mrem_stage(cfg, task, checkpoint, quant, out)
            row[key] = points(r.eval)
            details[key] = {"wall_s": round(r.wall_s, 1), "train_s": round(r.train_s, 1), "calib_s": round(r.calib_s, 1),
                            "calib_bytes": r.calib_bytes, "module_errors": r.chain_errors,
                            "rtn_module_errors": r.rtn_chain_errors, "bytes": r.packed_bytes,
                            "modules": [{k: s.get(k) for k in MODULE_STATS} for s in r.modules_stats],
                            "student_dropout": cfg.mrem.student_dropout, "steps": cfg.mrem.steps, "command": "python " + " ".join(sys.argv)}
            print(f"[bench] {task} {key}: {row[key]} (FP {row['fp']}) train {r.train_s:.0f}s", flush=True)
            save({"metrics": row, "details": details, "config": to_dict(cfg.mrem)})  # nothing lost on a stop
    return {"metrics": row, "details": details, "config": to_dict(cfg.mrem)}


def measure_speed(task: str, args) -> dict:
    """MREM-P (2 actors) vs MREM-S training time, same steps per module, nothing else running."""
    fp = fp_reference(task)
    cfg = load_config(ROOT / args.config, [f"tasks=[{task}]", "output_dir=runs/mrem_speed", *args.set])
    out, times = Path(cfg.output_dir).resolve(), {}
    with tracking.parent_run(cfg.experiment_name, f"bench-speed-{task}", to_dict(cfg)):
        for mode in ("parallel", "sequential"):
            cfg.mrem.mode = mode
            r = run_mrem_stage(cfg, task, str(ROOT / fp["checkpoint"]), "w4a8", out)
            times[mode] = {"train_s": round(r.train_s, 1),
                           "s_per_step": [round(m["s_per_step"], 3) for m in r.modules_stats]}
    return {"steps_per_module": cfg.mrem.steps, "quant": "w4a8", "train_s": times,
            "speedup_p2_vs_s": round(times["sequential"]["train_s"] / times["parallel"]["train_s"], 2),
            "command": "python " + " ".join(sys.argv)}


def _single_process_peak(checkpoint: str, cache: str, quant: str, queue) -> None:
    """One process holding the whole FP teacher, its quantized student and every boundary's activations,
    doing a few Adam reconstruction steps (batch 16): what MREM's actors each avoid holding."""
    import resource

    import numpy as np
    import torch

    from pipelines import models
    from pipelines.calibrate import read_shard
    from quant import QuantConfig, quantize_model

    torch.set_num_threads(1)
    teacher, _, _ = models.load_checkpoint(checkpoint)
    student, _, _ = models.load_checkpoint(checkpoint)
    quantize_model(student, QuantConfig.parse(quant))
    shards = [{k: np.array(v) for k, v in read_shard(d).items()}  # copies: memory-mapped pages would not count
              for b in sorted(Path(cache).glob("b*")) for d in sorted(b.iterdir())]
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    for step in range(3):  # a few reconstruction steps with Adam, as a training process would do
        rows = slice(16 * step, 16 * step + 16)
        ids = torch.from_numpy(shards[0]["input_ids"][rows]).long()
        mask = torch.from_numpy(shards[0]["attention_mask"][rows]).long()
        with torch.no_grad():
            target = teacher.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out = student.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad()
    nbytes = sum(a.nbytes for sh in shards for a in sh.values())
    queue.put({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "activation_bytes": nbytes})


def measure_memory(task: str, args) -> dict:
    """Peak RSS of the single-process baseline, beside the per-actor peaks recorded by the runs."""
    import multiprocessing as mp

    cfg = load_config(ROOT / args.config, [f"tasks=[{task}]", *args.set])
    caches = sorted(Path(cfg.mrem.cache_dir).glob(f"{task}-*/meta.json"), key=lambda p: p.stat().st_mtime)
    metas = {c.parent: json.loads(c.read_text()) for c in caches}
    multi = [d for d, m in metas.items() if m["boundaries"] > 1 and m["num_samples"] == cfg.mrem.calib_samples]
    if not multi:  # the recorded runs' calibration set, not a pilot's (e.g. mrem.calib_samples=3668)
        raise SystemExit(f"no MREM activation cache of {cfg.mrem.calib_samples} samples for {task} in "
                         f"{cfg.mrem.cache_dir}: run bench/mrem.py first (or --set mrem.calib_samples=N)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_single_process_peak,
                       args=(str(ROOT / fp_reference(task)["checkpoint"]), str(multi[-1]), "w2a8", queue))
    proc.start()
    out = queue.get(timeout=1200)
    proc.join()
    return {**out, "cache": str(multi[-1]), "command": "python " + " ".join(sys.argv)}


def from_mlflow(task: str, experiment: str) -> dict:
    """Rebuild a task's figures from the stage runs a (possibly interrupted) bench logged to MLflow."""
    import mlflow

    tracking.setup(experiment)
    exp = mlflow.get_experiment_by_name(experiment)
    fp = fp_reference(task)
    row, details = {"fp": fp["f1"] if task in ("mrpc", "qqp") else fp["accuracy"]}, {}
    runs = mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["start_time ASC"],
                              filter_string="attributes.status = 'FINISHED'")
    for key, method, quant, mode in PLAN:
        name = f"rtn/{task}/{quant}" if method == "rtn" else f"mrem/{task}/{quant}-{mode}"
        run = next((r for r in reversed(runs) if r.info.run_name == name), None)
        if run is None:
            continue
        r = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{method}_result.json")
        metrics = r["eval"]["metrics"]
        row[key] = round(100 * metrics["f1" if task in ("mrpc", "qqp") else "accuracy"], 2)
        details[key] = {"wall_s": round(r["wall_s"], 1), "bytes": r["packed_bytes"], "mlflow_run": run.info.run_id}
        if method == "mrem":
            details[key].update(train_s=round(r["train_s"], 1), calib_s=round(r["calib_s"], 1),
                                calib_bytes=r["calib_bytes"], module_errors=r["chain_errors"],
                                rtn_module_errors=r["rtn_chain_errors"],
                                modules=[{k: s[k] for k in ("module", "layers", "s_per_step", "peak_rss_mb",
                                                            "pushed_bytes", "initial_error", "final_error")}
                                         for s in r["modules_stats"]])
    return {"metrics": row, "details": details, "config": "as logged in the MLflow stage runs"}


def recipe(detail: dict) -> tuple:
    """How an MREM run trained, as far as replicates must agree. Records from before "steps" was stored all
    used configs/mrem_bench.yaml's 400 steps per module."""
    return detail.get("student_dropout"), detail.get("steps", 400)


def seed_stats(res: dict) -> dict:
    """Per run key with replicates (--seed): every seed's metric, their mean and sample std. Seed 0 (the main
    table) only counts when it trained like the replicates (same student_dropout and steps)."""
    stats = {}
    for key, *_ in PLAN:
        reps = [(r["metrics"][key], recipe(r["details"][key]))
                for _, r in sorted(res.get("seeds", {}).items()) if key in r["metrics"]]
        if not reps:
            continue
        main = res["metrics"].get(key)
        same = main is not None and recipe(res["details"].get(key, {})) == reps[0][1]
        values = ([main] if same else []) + [v for v, how in reps if how == reps[0][1]]
        if len(values) < 2:
            continue
        stats[key] = {"values": values, "mean": round(statistics.mean(values), 2),
                      "std": round(statistics.stdev(values), 2)}
    return stats


def judged(res: dict) -> dict:
    """A task's figures as the Targets table judges them: seed 0, or the seed mean where replicated."""
    return {**res["metrics"], **{k: v["mean"] for k, v in seed_stats(res).items()}}


def issue_view(results: dict) -> dict:
    """The issue's recorded shape: {task: {key: m}} (judged figures), speedup_p2_vs_s (the first task's timing
    run), wall_s and peak_rss_mb per task; kept beside the full records under "tasks"."""
    tasks = results.get("tasks", {})
    speed = [r["speed"]["speedup_p2_vs_s"] for r in tasks.values() if "speed" in r]
    return {**{t: judged(r) for t, r in tasks.items()}, "speedup_p2_vs_s": speed[0] if speed else None,
            "wall_s": {t: r.get("wall_s") for t, r in tasks.items()},
            "peak_rss_mb": {t: r.get("peak_rss_mb") for t, r in tasks.items()}}


def summarize(results: dict) -> None:
    """Speed-up, bytes moved and memory from the recorded runs (SST-2 first); replicate means."""
    for task, res in results.get("tasks", {}).items():
        d = res["details"]
        if res.get("seeds"):
            res["seed_stats"] = seed_stats(res)
        if "mrem_p_w4a8" in d and "mrem_s_w4a8" in d:
            res["speedup_p2_vs_s_w4a8"] = round(d["mrem_s_w4a8"]["train_s"] / d["mrem_p_w4a8"]["train_s"], 2)
        if "mrem_p_w2a8" in d and "mrem_s_w2a8" in d:
            res["speedup_p2_vs_s_w2a8"] = round(d["mrem_s_w2a8"]["train_s"] / d["mrem_p_w2a8"]["train_s"], 2)
        res["wall_s"] = {k: v["wall_s"] for k, v in d.items()}
        res["peak_rss_mb"] = {k: [round(m["peak_rss_mb"]) for m in v["modules"]] for k, v in d.items() if "modules" in v}
        res["s_per_step"] = {k: [round(m["s_per_step"], 3) for m in v["modules"]] for k, v in d.items()
                             if "modules" in v}
        res["object_store_bytes_pushed"] = {k: sum(m["pushed_bytes"] for m in v["modules"]) for k, v in d.items()
                                            if "modules" in v}


def check_targets(results: dict) -> list[dict]:
    """The issue's bars per task: (target, measured, met)."""
    rows = []
    for t, r in results.get("tasks", {}).items():
        means = seed_stats(r)  # replicates, where run, are judged by their mean
        m = judged(r)
        fp, rtn = m.get("fp"), m.get("rtn_w2a8")
        below_fp = (lambda d: None) if fp is None else (lambda d: fp - d)  # noqa: E731
        rows += target_row(t, "mrem_p_w4a8 >= fp - 0.5", m.get("mrem_p_w4a8"), below_fp(0.5))
        rows += target_row(t, "mrem_p_w2a8 >= fp - 1.5", m.get("mrem_p_w2a8"), below_fp(1.5))
        rows += target_row(t, "mrem_p_w2a8 >= rtn_w2a8 + 2", m.get("mrem_p_w2a8"), None if rtn is None else rtn + 2)
        for q in ("w4a8", "w2a8"):
            p, s = m.get(f"mrem_p_{q}"), m.get(f"mrem_s_{q}")
            gap = None if p is None or s is None else round(abs(p - s), 2)
            rows += target_row(t, f"|mrem_p_{q} - mrem_s_{q}| <= 0.5", gap, 0.5, at_least=False)
        for row in rows:
            if row["task"] == t and any(k in means for k in row["target"].replace("|", " ").split()):
                row["target"] += " (seed mean)"
        speed = r.get("speed", {}).get("speedup_p2_vs_s")
        rows += target_row(t, "speed-up P (2 actors) vs S >= 1.7x", speed, 1.7)
    return rows


def with_dropout(details: dict) -> str:
    """MREM runs whose student trained with dropout (all runs before mrem.student_dropout existed)."""
    return ", ".join(k for k, v in details.items() if "module_errors" in v and v.get("student_dropout", True))


def paced(details: dict) -> str:
    """Whether an MREM-P run had successors keep pace with predecessors (stats added with it)."""
    return ", ".join(k for k, v in details.items() if k.startswith("mrem_p")
                     and any("repeated_batches" in m for m in v.get("modules", [])))


def write(results: dict, path: Path = RESULTS) -> None:
    summarize(results)
    results.update(issue_view(results))
    write_json_atomic(path, results)
    cols = ["task", "fp"] + [p[0] for p in PLAN]
    rows = [{"task": t, **judged(r)} for t, r in results["tasks"].items()]
    lines = ["# MREM (MiniLM-L6, CPU, 2 cores)", "",
             "Main dev metric in points (MRPC: F1); a figure with replicates (`--seed`) is their mean "
             "(per-seed values under its task).", "",
             markdown_table(rows, cols), "", "## Targets", "",
             markdown_table(check_targets(results), ["task", "target", "measured", "met"]), ""]
    for t, r in results["tasks"].items():
        lines += [f"## {t}", "", f"- speed-up MREM-P (2 actors) vs MREM-S, training time: "
                  f"W4A8 {r.get('speedup_p2_vs_s_w4a8')}x, W2A8 {r.get('speedup_p2_vs_s_w2a8')}x",
                  f"- seconds per step per actor: {r.get('s_per_step')}",
                  f"- peak RSS per actor (MB): {r.get('peak_rss_mb')}",
                  f"- object-store bytes pushed actor to actor: {r.get('object_store_bytes_pushed')}",
                  f"- wall time per run (s): {r.get('wall_s')}",
                  f"- MREM-P runs whose successor kept pace with its predecessor: {paced(r['details']) or 'none'}",
                  f"- runs whose student trained with dropout (before `mrem.student_dropout`, default off): "
                  f"{with_dropout(r['details']) or 'none'}",
                  ""]
        if r.get("seed_stats"):
            lines += ["- replicates (`--seed`; the Targets table judges these keys by their mean): "
                      + "; ".join(f"{k} {v['values']} mean {v['mean']} ± {v['std']}"
                                  for k, v in r["seed_stats"].items()), ""]
        if "single_process" in r:
            sp = r["single_process"]
            lines += [f"- single process holding the whole teacher + quantized student + all boundaries' "
                      f"activations ({sp['activation_bytes'] / 2**20:.0f} MiB), 3 Adam steps, no Ray: peak RSS "
                      f"**{sp['peak_rss_mb']} MB** (`{sp['command']}`)", ""]
        if "speed" in r:  # a dedicated timing run on an otherwise idle machine
            sp = r["speed"]
            lines += [f"- speed run ({sp['steps_per_module']} steps/module, {sp['quant']}): training time MREM-P "
                      f"{sp['train_s']['parallel']} vs MREM-S {sp['train_s']['sequential']}: "
                      f"**{sp['speedup_p2_vs_s']}x** (`{sp['command']}`)", ""]
    lines += [f"Last command: `{results['command']}` (each run's own command: `details` in the JSON)", "",
              f"Config: `{results['config_file']}` with {results['overrides']}"]
    if results.get("notes"):
        lines += ["", "## Notes (written after the runs above)", ""] + [f"- {n}" for n in results["notes"]]
    write_text_atomic(path.with_suffix(".md"), "\n".join(lines) + "\n")


def log_to_mlflow(results: dict, experiment: str, path: Path = RESULTS) -> str:
    """The tables of mrem.md (figures, Targets) and every figure as `<task>.<key>` metrics, in MLflow."""
    figures = [{"task": t, **judged(r)} for t, r in results["tasks"].items()]
    metrics = {f"{t}.{k}": v for t, r in results["tasks"].items() for k, v in judged(r).items()}
    metrics.update({f"{t}.speedup_p2_vs_s": r["speed"]["speedup_p2_vs_s"] for t, r in results["tasks"].items()
                    if "speed" in r})
    return log_results(experiment, [path, path.with_suffix(".md")],
                       {"mrem_figures": figures, "mrem_targets": check_targets(results)}, metrics,
                       results.get("command", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["sst2"])
    parser.add_argument("--config", default="configs/mrem_bench.yaml")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--only", nargs="*", default=None, help="subset of run keys")
    parser.add_argument("--seed", type=int, default=None,
                        help="a replicate with this mrem.seed, recorded beside the main (seed 0) figures")
    parser.add_argument("--from-mlflow", action="store_true", help="rebuild the figures from logged runs")
    parser.add_argument("--out", default=None, help="results file (default bench/results/mrem.json); for pilots")
    parser.add_argument("--log-only", action="store_true", help="only log the recorded figures to MLflow")
    parser.add_argument("--speed", action="store_true", help="only time MREM-P vs MREM-S (W4A8)")
    parser.add_argument("--memory", action="store_true",
                        help="only the single-process baseline: whole model + all activations in one process")
    args = parser.parse_args()
    path = Path(args.out).resolve() if args.out else RESULTS
    results = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    if args.seed is not None:
        args.set = [*args.set, f"mrem.seed={args.seed}"]
    if not (args.speed or args.memory or args.seed):  # these runs record their own command
        results.update(command="python " + " ".join(sys.argv), config_file=args.config, overrides=args.set)
    experiment = load_config(ROOT / args.config).experiment_name
    if args.log_only:
        print(f"logged {path.name} to MLflow run {log_to_mlflow(results, experiment, path)} ({experiment})")
        return
    for task in args.tasks:
        start = time.time()

        def merge(new: dict) -> None:
            old = results["tasks"].setdefault(task, {"metrics": {}, "details": {}})
            if args.seed:  # a replicate: its own record, the main table keeps seed 0
                old = old.setdefault("seeds", {}).setdefault(str(args.seed), {"metrics": {}, "details": {}})
            old["metrics"].update(new["metrics"])
            old["details"].update(new["details"])
            old["config"] = new["config"]
            old["bench_wall_s"] = round(time.time() - start, 1)
            write(results, path)

        if args.speed:
            results["tasks"].setdefault(task, {"metrics": {}, "details": {}})["speed"] = measure_speed(task, args)
            write(results, path)
        elif args.memory:
            results["tasks"].setdefault(task, {"metrics": {}, "details": {}})["single_process"] = \
                measure_memory(task, args)
            write(results, path)
        elif args.from_mlflow:
            merge(from_mlflow(task, experiment))
        else:
            merge(run_task(task, args, merge))
    print(json.dumps({t: r["metrics"] for t, r in results["tasks"].items()}, indent=2))
    if path == RESULTS:  # the recorded figures, not a pilot's (--out)
        log_to_mlflow(results, experiment)


if __name__ == "__main__":
    main()
