"""Recipe sweep of `pretrain`: a grid of (corpus, seed, recipe) runs as parallel Ray tasks, one
MLflow run each, then a comparison table (Markdown, CSV, JSON) and a loss-curve plot. Each run is
compared with the FP run of its corpus and seed; with several seeds a summary table gives the
mean and spread over seeds of every recipe's gap to FP.

Each run is `train_local` (the loop of pipelines/pretrain.py in a plain process), so a sweep
task needs no Ray Train; it resumes from its own checkpoint like a `pretrain` run.
"""
from __future__ import annotations

import math
import os
import statistics
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipelines.config import ConfigError, from_dict
from pipelines.pretrain import (LocalSession, PretrainRunConfig, _finished, _install, _prepare, run_dir, save_final,
                                stage_key, train, with_recipe)


def train_local(cfg: PretrainRunConfig, device: str = "cpu", run_id: str | None = None,
                tracking_uri: str | None = None, stop_at: int | None = None) -> dict:
    """One run in this process (no Ray): resumes from run_dir(cfg)/ckpt, writes run_dir(cfg)/model."""
    out, key = run_dir(cfg), stage_key(cfg)
    done = _finished(out / "model", key)
    if done:
        return done
    data = _prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{Path(cfg.data.corpus).stem} {cfg.quant.build()}"
    result, run = train(cfg, data, LocalSession(out / "ckpt", device, stop_at), tag, run_id, tracking_uri)
    if "stopped_at" in result:
        return result
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_final(run.inner, data, result, cfg, tmp)
        _install(Path(tmp), out / "model")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    return result


def _sweep_task(cfg_dict: dict, device: str, threads: int, run_id: str | None, uri: str | None) -> dict:
    torch.set_num_threads(threads)
    return train_local(from_dict(PretrainRunConfig, cfg_dict), device, run_id, uri)


def _child_run(client, exp_id: str, parent: str | None, cfg: PretrainRunConfig) -> str:
    from pipelines.tracking import flatten

    tags = {"plmq.stage": "pretrain", "plmq.recipe": str(cfg.quant.build()), "plmq.corpus": cfg.data.corpus,
            "plmq.seed": str(cfg.train.seed)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    name = f"pretrain/{Path(cfg.data.corpus).stem}/{cfg.quant.build()}/seed{cfg.train.seed}"
    run = client.create_run(exp_id, run_name=name, tags=tags)
    params = flatten({"model": asdict(cfg.model), "data": asdict(cfg.data), "train": asdict(cfg.train),
                      "recipe": str(cfg.quant.build())})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def sweep(cfg: PretrainRunConfig, parent_run_id: str | None = None, tracking_uri: str | None = None) -> dict:
    """Every (corpus, seed, recipe) of cfg.sweep as a Ray task (at most max_parallel at once), each
    its own MLflow run; writes sweep_results.{json,md,csv} and loss_curves.png to output_dir/sweep."""
    import mlflow
    import ray

    from pipelines.cluster import ensure_ray, worker_resources

    cfg.validate()
    if not cfg.sweep.recipes:
        raise ConfigError("sweep.recipes is empty: list the recipes to compare, e.g. [fp, w8a8, w4]")
    jobs = [with_recipe(cfg, r, c, s) for c in (cfg.sweep.corpora or [cfg.data.corpus])
            for s in (cfg.sweep.seeds or [cfg.train.seed]) for r in cfg.sweep.recipes]
    for c in {j.data.corpus for j in jobs}:
        _prepare(cfg, c)  # tokenizers and ids once, on the driver; tasks read the cache
    ensure_ray()
    res = worker_resources(cfg.train.use_gpu, cfg.train.cpus_per_worker)
    task = ray.remote(_sweep_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=2)
    client = mlflow.MlflowClient(tracking_uri) if tracking_uri else None
    exp_id = client.get_run(parent_run_id).info.experiment_id if client and parent_run_id else None
    start, results, pending, queue = time.time(), {}, {}, list(enumerate(jobs))
    while queue or pending:
        while queue and len(pending) < cfg.sweep.max_parallel:
            i, job = queue.pop(0)
            run_id = _child_run(client, exp_id, parent_run_id, job) if exp_id else None
            pending[task.remote(asdict(job), res.torch_device, res.num_cpus, run_id, tracking_uri)] = (i, run_id)
        ready, _ = ray.wait(list(pending), num_returns=1)
        i, run_id = pending.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except Exception as err:  # one broken recipe must not lose the others' results
            print(f"[sweep] {jobs[i].data.corpus} {jobs[i].quant.recipe} failed: {err}", flush=True)
            results[i] = _failed(jobs[i], err)
        results[i] = {**results[i], "seed": jobs[i].train.seed}
        _finish_child(client, run_id, results[i])
        r = results[i]
        print(f"[sweep] {len(results)}/{len(jobs)} {r['corpus']} seed {r['seed']} {r['recipe']}: "
              f"val_loss {r['val_loss']:.4f} ({time.time() - start:.0f} s)", flush=True)
    rows = [results[i] for i in range(len(jobs))]
    return write_sweep(rows, Path(cfg.output_dir).resolve() / "sweep", asdict(cfg))


def _failed(cfg: PretrainRunConfig, err: Exception) -> dict:
    nan = float("nan")
    return {"corpus": cfg.data.corpus, "recipe": str(cfg.quant.build()), "steps": 0, "val_loss": nan,
            "val_ppl": nan, "diverged": True, "final_train_loss": nan, "opt_state_bytes": 0, "step_s": nan,
            "params": 0, "quantized_layers": 0, "history": {"train": [], "val": []},
            "error": f"{type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}"}


def _finish_child(client, run_id: str | None, result: dict) -> None:
    if client is None or run_id is None:
        return
    for k in ("val_loss", "val_ppl", "opt_state_bytes", "step_s", "final_train_loss"):
        if isinstance(result.get(k), (int, float)) and math.isfinite(result[k]):
            client.log_metric(run_id, k, float(result[k]))
    client.log_metric(run_id, "diverged", float(result["diverged"]))
    client.set_terminated(run_id, "FAILED" if "error" in result else "FINISHED")


def compare(rows: list[dict]) -> list[dict]:
    """Table rows: each run relative to the FP run of its corpus and seed."""
    fp = {(r["corpus"], r.get("seed")): r for r in rows if r["recipe"] == "fp"}
    out = []
    for r in rows:
        ref = fp.get((r["corpus"], r.get("seed")))
        rel = lambda k: r[k] / ref[k] if ref and ref[k] else None  # noqa: E731
        out.append({"corpus": r["corpus"], "recipe": r["recipe"], "seed": r.get("seed"),
                    "val_loss": r["val_loss"], "val_ppl": r["val_ppl"],
                    "rel_to_fp": rel("val_loss"), "diverged": r["diverged"], "opt_state_bytes": r["opt_state_bytes"],
                    "opt_bytes_vs_fp": rel("opt_state_bytes"), "step_s": r["step_s"],
                    "step_time_vs_fp": rel("step_s"), "quantized_layers": r["quantized_layers"], "steps": r["steps"]})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (corpus, recipe) over its seeds: mean val loss, mean/std/max of the gap to FP
    (rel_to_fp - 1, a fraction), diverged seeds, and the mean of the byte and time ratios."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["corpus"], r["recipe"]), []).append(r)

    def mean(vals):
        vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        return statistics.fmean(vals) if vals else None

    out = []
    for (corpus, recipe), rs in groups.items():
        gaps = [r["rel_to_fp"] - 1 for r in rs if r["rel_to_fp"] is not None and math.isfinite(r["rel_to_fp"])]
        out.append({"corpus": corpus, "recipe": recipe, "seeds": len(rs), "val_loss": mean(r["val_loss"] for r in rs),
                    "rel_to_fp": mean(r["rel_to_fp"] for r in rs), "gap_mean": mean(gaps),
                    "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0 if gaps else None,
                    "gap_max": max(gaps) if gaps else None, "diverged": sum(bool(r["diverged"]) for r in rs),
                    "opt_state_bytes": rs[0]["opt_state_bytes"], "opt_bytes_vs_fp": rs[0]["opt_bytes_vs_fp"],
                    "step_s": mean(r["step_s"] for r in rs), "step_time_vs_fp": mean(r["step_time_vs_fp"] for r in rs)})
    return out


def write_sweep(results: list[dict], out: Path, config: dict) -> dict:
    """sweep_results.json (with loss histories), .md and .csv tables, loss_curves.png (first seed)."""
    from pipelines.io import markdown_table, write_json_atomic, write_text_atomic

    rows = compare(results)
    summary = summarize(rows)
    cols = list(rows[0]) if rows else []
    table = markdown_table(rows, cols)
    if len({r["seed"] for r in rows}) > 1:
        table = ("Mean over seeds (gap = val loss / FP val loss of the same seed - 1):\n\n"
                 + markdown_table(summary, list(summary[0])) + "\n\nEvery run:\n\n" + table)
    csv = "\n".join([",".join(cols)] + [",".join("" if r[c] is None else str(r[c]) for c in cols) for r in rows])
    write_text_atomic(out / "sweep_results.md", table + "\n")
    write_text_atomic(out / "sweep_results.csv", csv + "\n")
    write_json_atomic(out / "sweep_results.json", {"rows": rows, "summary": summary, "runs": results,
                                                   "config": config})
    first = min((r.get("seed") or 0 for r in results), default=0)
    plot_losses([r for r in results if (r.get("seed") or 0) == first], out / "loss_curves.png")
    return {"rows": rows, "summary": summary, "table": table, "output_dir": str(out)}


def _ema(values, alpha: float = 0.1) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None or not math.isfinite(ema) else (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


def plot_losses(results: list[dict], path: Path) -> Path:
    """Smoothed training loss (lines) and validation loss (dots) per recipe, one panel per
    corpus. Diverged runs are dashed and the y-axis stays on the runs that did not diverge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = sorted({r["corpus"] for r in results})
    fig, axes = plt.subplots(1, len(corpora), figsize=(7.5 * len(corpora), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, corpus in zip(axes[0], corpora):
        runs = [r for r in results if r["corpus"] == corpus and r["history"]["train"]]
        for i, r in enumerate(runs):
            steps, losses = zip(*r["history"]["train"])
            style = dict(ls="--", lw=1.0) if r["diverged"] else dict(ls="-", lw=1.3)
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path




def run_sweep_stage(cfg: PretrainRunConfig) -> dict:
    """`plmq pretrain-sweep`: a parent run; each (corpus, recipe) run is a child of it."""
    import mlflow

    from pipelines import tracking

    with tracking.parent_run(cfg.experiment_name, "pretrain-sweep", asdict(cfg)) as parent:
        summary = sweep(cfg, parent_run_id=parent, tracking_uri=tracking.tracking_uri())
        mlflow.log_text(summary["table"], "sweep_results.md")
        mlflow.log_artifact(str(Path(summary["output_dir"]) / "loss_curves.png"))
    return summary
