"""PreQuant figures: FP, RTN, PreQuant (W4, W3) and the PEFT baselines on the same low-bit base.

    python bench/prequant.py --tasks sst2 rte mrpc            # MiniLM, configs/prequant.yaml
    python bench/prequant.py --smoke                          # tiny-bert, a few steps: checks the script
    python bench/prequant.py --tasks mrpc --only prequant_act_w4 --seed 1 --set prequant.lr=5e-3  # a replicate

Writes bench/results/prequant.json ({task: {fp_full, rtn_w4, prequant_w4, prequant_w4a8, prequant_w3,
lora_w4, bitfit_w4, random_cols_w4, prequant_act_w4, prequant_act_w3, prequant_act_w4a8, prequant_gptq_w4,
prequant_gptq_w3, prequant_gptq_w4a8, lora_gptq_w4, rtn_g128_w4, prequant_g128_w4, prequant_g128_w3,
lora_g128_w4, random_cols_g128_w4, ..., trainable_pct}}, every key of PLAN below), main dev metric in points;
*_w4a8 add 8-bit activations; prequant_act_* use the activation-outlier criterion instead of the configured one;
*_gptq_* GPTQ rounding onto per-row MSE grids (prequant_gptq_*: with the activation criterion; lora_gptq_w4:
LoRA on that base); *_g128_* per-group grids (128 weights of a row, MSE clipping; RTN to nearest, the
others with GPTQ, the same base for PreQuant, LoRA and random columns; *_g128scaled_*: each FP column's steps
scaled down by its input RMS, prequant.scale_outlier_lr; *_g128norms_*: biases and LayerNorm trained too,
prequant.train_norms; *_g128normsscaled_*: both; *_g128nodrop_*: no dropout in the frozen body,
prequant.body_dropout=0; *_g128drop20_*: 0.2; *_g128top2_*: FP columns only in the last two blocks,
prequant.column_blocks=2); prequant_g128_w8: the same on a near-lossless 8-bit base, a diagnostic of how much
of the gap to FP is the trainable budget rather than the bits); `--set finetune.pooling=mean`
runs the methods (FP included) with a mean-pooled head and records them as <key>_mean, judged against
fp_full_mean (models under <output_dir>_mean), and likewise
`--set finetune.epochs=6` as <key>_e6 against fp_full_e6 (both: <key>_mean_e6), data.train_examples=N as
<key>_nN, finetune.batch_size=B as <key>_bB; other data or finetune settings (weight decay, warm-up, ...)
have no key and run only into a pilot file (--out runs/<pilot>.json); per-method
trainable %, optimizer-state bytes, peak memory,
fine-tuning wall time and the command that produced the figure under "details") and prequant.md,
merging tasks into what is there. Learning-rate search: run a method again with another
`--set prequant.lr=...` (or finetune.lr for fp_full) and the best dev score of the lrs tried stands for
it, every lr's score kept under details["lr_search"] (give every method the same lrs).
FP numbers come from bench/results/fp_reference.json and RTN
from bench/results/rtn.json when they hold the task (and, for RTN, the same QuantConfig);
otherwise they are run here. --smoke writes under runs/prequant_smoke/ instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import log_results, target_row  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.config import load_config, to_dict  # noqa: E402
from pipelines.data import check_task  # noqa: E402
from pipelines.io import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402
from pipelines.prequant import run_prequant_finetune_stage, run_prequant_quantize_stage  # noqa: E402
from quant import QuantConfig  # noqa: E402
from quant.outliers import with_quantizer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prequant.json"
FP = ROOT / "bench" / "results" / "fp_reference.json"
RTN = ROOT / "bench" / "results" / "rtn.json"
# (result key, method, QuantConfig, prequant overrides). Every key pins its base (grid, criterion, rounding),
# so that its recorded figures keep their meaning whatever configs/prequant.yaml recommends: the main
# table's keys were recorded on per-row min-max grids, weight criterion, round-to-nearest.
ROW = {"quantizer": "row", "criterion": "weight", "gptq": False, "scale_outlier_lr": False,
       "train_norms": False, "body_dropout": None, "column_blocks": None}
ACT = {**ROW, "criterion": "activation"}
# GPTQ rounding onto per-row MSE-clipped grids, activation criterion; LoRA on the same base.
GPTQ_BASE = {**ROW, "quantizer": "row-mse", "gptq": True}
GPTQ = {**GPTQ_BASE, "criterion": "activation"}
# The same with groups of 128 weights per row (per-group MSE grids): RTN of the FP model, PreQuant
# (activation criterion), LoRA and random columns on that base.
G128_BASE = {**ROW, "quantizer": "group-mse", "gptq": True}
G128 = {**G128_BASE, "criterion": "activation"}
G128_ASYM = {**G128, "quantizer": "group-mse-asym"}  # zero point per group: 8 levels at W3, not 7
# The g128 bases with each FP column's steps scaled by min(1, median input RMS / its input RMS)
# (prequant.scale_outlier_lr): PreQuant's and its random-columns ablation's.
G128_SCALED_BASE = {**G128_BASE, "scale_outlier_lr": True}
G128_SCALED = {**G128_SCALED_BASE, "criterion": "activation"}
# The g128 bases with biases and LayerNorm trained too (prequant.train_norms), inside the same budget:
# fewer FP columns (RTE 6 epochs: 56.68 vs 53.07 without).
G128_NORMS_BASE = {**G128_BASE, "train_norms": True}
G128_NORMS = {**G128_NORMS_BASE, "criterion": "activation"}
# Both: train_norms and scaled column steps. On 512 RTE examples the activation columns at full steps
# fit worse than frozen ones (train loss 0.375 vs 0.325); scaled they fit better (0.304), yet RTE dev
# (6 epochs) drops to 49.46 / 49.82: not recommended. Its random-columns figure is the unscaled one.
G128_NORMS_SCALED = {**G128_NORMS, "scale_outlier_lr": True}
# The g128 bases with no dropout in the frozen body (prequant.body_dropout=0; the head keeps BERT's 0.1):
# PreQuant's SST-2 train loss ends ~0.23 at 6 epochs, so dropout looked like a cost; 0 overfits instead
# (SST-2 83.6, train loss 0.03; RTE 46.93).
G128_NODROP_BASE = {**G128_BASE, "body_dropout": 0.0}
G128_NODROP = {**G128_NODROP_BASE, "criterion": "activation"}
# And the other way: dropout 0.2 in the frozen body (SST-2 6 epochs without dropout: train loss 0.03, dev 83.6
# against 86.24 at BERT's 0.1: the PEFT methods overfit there).
G128_DROP20_BASE = {**G128_BASE, "body_dropout": 0.2}
G128_DROP20 = {**G128_DROP20_BASE, "criterion": "activation"}
# The g128 bases with every FP column in the last two of MiniLM's six blocks (prequant.column_blocks=2):
# the same budget, ~10 columns per matrix instead of ~3, and backward stops above block 4.
G128_TOP2_BASE = {**G128_BASE, "column_blocks": 2}
G128_TOP2 = {**G128_TOP2_BASE, "criterion": "activation"}
PLAN = [("fp_full", "fp", None, ROW), ("rtn_w4", "rtn", "w4", ROW), ("prequant_w4", "prequant", "w4", ROW),
        ("prequant_w4a8", "prequant", "w4a8", ROW), ("prequant_w3", "prequant", "w3", ROW),
        ("lora_w4", "lora", "w4", ROW), ("bitfit_w4", "bitfit", "w4", ROW), ("random_cols_w4", "random", "w4", ROW),
        ("prequant_act_w4", "prequant", "w4", ACT), ("prequant_act_w3", "prequant", "w3", ACT),
        ("prequant_act_w4a8", "prequant", "w4a8", ACT), ("prequant_gptq_w4", "prequant", "w4", GPTQ),
        ("prequant_gptq_w3", "prequant", "w3", GPTQ), ("prequant_gptq_w4a8", "prequant", "w4a8", GPTQ),
        ("lora_gptq_w4", "lora", "w4", GPTQ_BASE), ("rtn_g128_w4", "rtn", "w4", {**ROW, "quantizer": "group-mse"}),
        ("prequant_g128_w4", "prequant", "w4", G128), ("prequant_g128_w3", "prequant", "w3", G128),
        ("prequant_g128_w4a8", "prequant", "w4a8", G128), ("prequant_g128asym_w3", "prequant", "w3", G128_ASYM),
        ("lora_g128_w4", "lora", "w4", G128_BASE),
        ("random_cols_g128_w4", "random", "w4", G128_BASE),
        ("prequant_g128scaled_w4", "prequant", "w4", G128_SCALED),
        ("prequant_g128scaled_w3", "prequant", "w3", G128_SCALED),
        ("random_cols_g128scaled_w4", "random", "w4", G128_SCALED_BASE),
        ("prequant_g128norms_w4", "prequant", "w4", G128_NORMS),
        ("prequant_g128norms_w3", "prequant", "w3", G128_NORMS),
        ("prequant_g128norms_w4a8", "prequant", "w4a8", G128_NORMS),
        ("random_cols_g128norms_w4", "random", "w4", G128_NORMS_BASE),
        ("prequant_g128normsscaled_w4", "prequant", "w4", G128_NORMS_SCALED),
        ("prequant_g128nodrop_w4", "prequant", "w4", G128_NODROP),
        ("prequant_g128nodrop_w3", "prequant", "w3", G128_NODROP),
        ("prequant_g128nodrop_w4a8", "prequant", "w4a8", G128_NODROP),
        ("lora_g128nodrop_w4", "lora", "w4", G128_NODROP_BASE),
        ("random_cols_g128nodrop_w4", "random", "w4", G128_NODROP_BASE),
        ("prequant_g128drop20_w4", "prequant", "w4", G128_DROP20),
        ("lora_g128drop20_w4", "lora", "w4", G128_DROP20_BASE),
        ("random_cols_g128drop20_w4", "random", "w4", G128_DROP20_BASE),
        ("prequant_g128top2_w4", "prequant", "w4", G128_TOP2),
        ("random_cols_g128top2_w4", "random", "w4", G128_TOP2_BASE),
        ("prequant_g128_w8", "prequant", "w8", G128)]
# The LoRA and random-columns figures on a PreQuant figure's low-bit base (default: lora_w4, random_cols_w4).
SAME_BASE = {"prequant_gptq_w4": ("lora_gptq_w4", "random_cols_w4"),
             "prequant_g128_w4": ("lora_g128_w4", "random_cols_g128_w4"),
             "prequant_g128scaled_w4": ("lora_g128_w4", "random_cols_g128scaled_w4"),
             "prequant_g128norms_w4": ("lora_g128_w4", "random_cols_g128norms_w4"),
             "prequant_g128normsscaled_w4": ("lora_g128_w4", "random_cols_g128norms_w4"),
             "prequant_g128nodrop_w4": ("lora_g128nodrop_w4", "random_cols_g128nodrop_w4"),
             "prequant_g128drop20_w4": ("lora_g128drop20_w4", "random_cols_g128drop20_w4"),
             "prequant_g128top2_w4": ("lora_g128_w4", "random_cols_g128top2_w4")}
# A recipe other than the config file's (finetune.pooling=mean, other finetune.epochs) runs every method
# with it: its figures are kept apart, under "<key><suffix>" ("_mean", "_e6", "_mean_e6"), judged against
# fp_full<suffix>, with their models under <output_dir><suffix>.
POOLING_SUFFIX = {"cls": "", "mean": "_mean"}
SMOKE = ["data.train_examples=64", "data.eval_examples=64", "finetune.epochs=1", "finetune.log_every=1"]


def points(result) -> float:
    return round(100 * result.main, 2)


def fp_baseline(cfg, task: str, out: Path) -> tuple[float, str, dict]:
    """(metric, FP checkpoint, details): fp_reference.json's model when it was fine-tuned with this config's
    data and finetune settings (same epochs as the PEFT methods), else fine-tune FP here."""
    from pipelines.finetune import stage_key
    from pipelines.models import finished_meta
    from pipelines.run import run_evaluate_stage, run_finetune_stage

    ref = json.loads(FP.read_text()).get(task) if FP.exists() and cfg.model == "minilm-l6" else None
    if ref and finished_meta(ROOT / ref["checkpoint"], stage_key(task, cfg.model, cfg.data, cfg.finetune)):
        metric = ref[check_task(task).main_metric]
        return metric, str(ROOT / ref["checkpoint"]), {"source": str(FP.relative_to(ROOT)), "train_s": ref["wall_s"],
                                                       **schedule(cfg.finetune.lr, cfg)}
    ft = run_finetune_stage(cfg, task, out)
    result, _ = run_evaluate_stage(cfg, task, ft.checkpoint, "fp")
    return points(result), ft.checkpoint, {"source": "run", "train_s": round(ft.wall_s, 1),
                                           "bytes": result.model_bytes, **schedule(cfg.finetune.lr, cfg)}


def majority_points(task: str, data) -> float | None:
    """The floor every figure is read against: the dev metric of always predicting the most frequent train
    label (RTE 52.71: a figure there learned nothing)."""
    from pipelines.evaluate import majority_floor

    return majority_floor([task], data).get(task, (None, None))[1]


def schedule(lr: float, cfg) -> dict:
    """What a figure was trained with: its learning rate, epochs and batch size (same epochs for all)."""
    return {"lr": lr, "epochs": cfg.finetune.epochs, "batch_size": cfg.finetune.batch_size}


def fp_details(checkpoint: str, details: dict) -> dict:
    """Full fine-tuning trains everything. Optimizer state and peak memory as the worker measured them
    (models fine-tuned before finetune recorded them: 2 fp32 AdamW moments per parameter, analytic)."""
    from safetensors import safe_open

    from pipelines.models import META_FILE

    with safe_open(str(Path(checkpoint) / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    meta_path = Path(checkpoint) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    memory = {"optimizer_state_bytes": meta.get("optimizer_state_bytes"), "peak_rss_mb": meta.get("peak_rss_mb")}
    if memory["optimizer_state_bytes"] is None:
        memory.update(optimizer_state_bytes=8 * params,
                      optimizer_state_note="analytic: 2 fp32 AdamW moments per parameter")
    return {**details, "trainable_pct": 100.0, "trainable_params": params, **memory}


def rtn_baseline(cfg, task: str, quant: str, alias: str, checkpoint: str, out: Path,
                 reference: bool) -> tuple[float, dict]:
    """rtn.json's number for this QuantConfig (named `quant` or `alias`) when present and the FP model is the
    reference (reference=True), else run RTN on `checkpoint`."""
    from pipelines.run import run_rtn_stage

    recorded = json.loads(RTN.read_text()).get(task, {}) if RTN.exists() and reference else {}
    for name in (quant, alias):
        if isinstance(recorded, dict) and isinstance(recorded.get(name), dict):
            return recorded[name]["metric"], {"source": str(RTN.relative_to(ROOT)), "quant": name,
                                              "bytes": recorded[name].get("bytes"), "trainable_pct": 0.0}
    r = run_rtn_stage(cfg, task, checkpoint, quant, out)
    return points(r.eval), {"source": "run", "quant": r.quant_config, "bytes": r.packed_bytes,
                            "wall_s": round(r.wall_s, 1), "trainable_pct": 0.0}


def peft_details(r, q, cfg) -> dict:
    return {**schedule(cfg.prequant.lr, cfg), "head_lr": cfg.prequant.head_lr, "quant": r.quant_config,
            "criterion": cfg.prequant.criterion, "quantizer": cfg.prequant.quantizer, "gptq": cfg.prequant.gptq,
            "scale_outlier_lr": cfg.prequant.scale_outlier_lr, "train_norms": cfg.prequant.train_norms,
            "body_dropout": cfg.prequant.body_dropout, "column_blocks": cfg.prequant.column_blocks,
            "trainable_pct": round(r.trainable_pct, 4), "trainable_params": r.trainable_params,
            "optimizer_state_bytes": r.optimizer_state_bytes, "peak_rss_mb": r.peak_rss_mb,
            "train_s": round(r.train_s, 1), "bytes": r.packed_bytes, "steps": r.steps,
            "quantize_s": round(q.wall_s, 1), "quantize_reused": q.reused}


# Settings that change what a figure measures, besides the learning rate (searched: the best stands) and the
# seed (replicates). Those named in recipe_suffix get keys of their own; the rest only go to a pilot's --out.
UNRECORDED = {"data": ("source", "dir", "max_length", "eval_examples"),
              "finetune": ("weight_decay", "warmup_ratio", "num_workers")}
SEARCHED = ("lr", "head_lr", "quant", "methods", "dir")  # prequant settings a figure's key or lr_search records


def recipe_suffix(cfg, base) -> str:
    """"" for the config file's recipe, else what differs: "_mean" (mean-pooled head), "_e6" (6 epochs),
    "_n24000" (data.train_examples; "_nall": every row), "_b16" (batch size)."""
    ft, data = cfg.finetune, cfg.data
    return (POOLING_SUFFIX[ft.pooling] + (f"_e{ft.epochs:g}" if ft.epochs != base.finetune.epochs else "")
            + (f"_n{data.train_examples or 'all'}" if data.train_examples != base.data.train_examples else "")
            + (f"_b{ft.batch_size}" if ft.batch_size != base.finetune.batch_size else ""))


def check_recorded_recipe(cfg, base, plan: list, pilot: bool) -> None:
    """Before any work: a setting that the results' keys cannot tell apart goes to a pilot file, else its
    figures would sit under the main table's keys as if trained with the config file's recipe."""
    changed = {f"{section}.{name}" for section, names in UNRECORDED.items() for name in names
               if getattr(getattr(cfg, section), name) != getattr(getattr(base, section), name)}
    for _, method, _, overrides in plan:  # prequant.* as each key runs it (PLAN pins some)
        if method not in ("fp", "rtn"):
            mine, theirs = (to_dict(replace(c.prequant, **overrides)) for c in (cfg, base))
            changed |= {f"prequant.{k}" for k in mine if k not in SEARCHED and mine[k] != theirs[k]}
    if changed and not pilot:
        raise SystemExit(f"{', '.join(sorted(changed))} differ from {RESULTS.name}'s recipe and no key records "
                         f"them: pass --out runs/<pilot>.json to keep these figures in a file of their own")


def split_key(key: str) -> tuple[str, str] | None:
    """A figure's key as (PLAN key, recipe suffix), e.g. "prequant_w4a8_mean_e6" -> ("prequant_w4a8",
    "_mean_e6"); None for other keys (trainable_pct)."""
    bases = [p[0] for p in PLAN if key == p[0] or key.startswith(p[0] + "_")]
    if not bases:
        return None
    base = max(bases, key=len)
    return base, key[len(base):]


RECIPE_PARTS = {"e": "{} epochs (finetune.epochs={})", "n": "{} training examples (data.train_examples={})",
                "b": "batch {} (finetune.batch_size={})"}


def recipe_title(sfx: str) -> str:
    parts = ["mean-pooled head (finetune.pooling=mean)" if p == "mean" else RECIPE_PARTS[p[0]].format(p[1:], p[1:])
             for p in sfx.strip("_").split("_")]
    return ", ".join(parts)


def run_task(task: str, args) -> tuple[dict, dict]:
    cfg = load_config(ROOT / args.config, [f"tasks=[{task}]", *args.set])
    base = load_config(ROOT / args.config, getattr(args, "base_set", []))  # the recipe of the main table
    plan = [p for p in PLAN if not args.only or p[0] in args.only]
    check_recorded_recipe(cfg, base, plan, pilot=getattr(args, "out", None) is not None)
    suffix = recipe_suffix(cfg, base)
    replicate = f"_seed{args.seed}" if getattr(args, "seed", None) is not None else ""
    out = Path(cfg.output_dir + suffix + replicate).resolve()  # never overwrites another head's or seed's models
    cfg = replace(cfg, output_dir=str(out))
    row, details = {}, {}
    with tracking.parent_run(cfg.experiment_name, f"bench-prequant-{task}", to_dict(cfg)):
        # Only fp_full and RTN need the FP model: a PEFT-only run does not fine-tune it.
        if any(method in ("fp", "rtn") for _, method, _, _ in plan):
            fp, checkpoint, fp_info = fp_baseline(cfg, task, out)
        for key, method, quant, overrides in plan:
            if method == "fp":
                metric, detail = fp, fp_details(checkpoint, fp_info)
            elif method == "rtn":
                grid = overrides["quantizer"]  # every PLAN key pins its grid
                full = str(with_quantizer(quant, grid))
                reference = fp_info["source"] != "run"
                alias = quant if full == str(QuantConfig.parse(quant)) else full  # rtn.json's "w4": the default grid
                metric, detail = rtn_baseline(cfg, task, full, alias, checkpoint, out, reference)
            else:
                run_cfg = replace(cfg, prequant=replace(cfg.prequant, **overrides))
                q = run_prequant_quantize_stage(run_cfg, quant, method)
                r = run_prequant_finetune_stage(run_cfg, task, quant, method)
                metric, detail = points(r.eval), peft_details(r, q, run_cfg)
            name = key + suffix  # another recipe's figures are kept apart from the main table's
            row[name], details[name] = metric, {**detail, "pooling": cfg.finetune.pooling}
            print(f"[bench prequant] {task} {name}: {metric}", flush=True)
    return row, {"details": details, "config": to_dict(cfg.prequant), "finetune": to_dict(cfg.finetune)}


def lr_label(detail: dict) -> str:
    """A run's place in the learning-rate search: its lr, and its head's when that differs (prequant.head_lr)."""
    head = detail.get("head_lr")
    return str(detail.get("lr")) if head is None else f"{detail.get('lr')} (head {head})"


def merge_figure(old: tuple[float, dict] | None, new: tuple[float, dict]) -> tuple[float, dict]:
    """The learning-rate search: a figure re-run at another lr joins the earlier ones and the best
    dev score stands for the method (each lr's run stays in details["lr_runs"], its score in
    "lr_search"); a re-run at the same lr replaces that lr's run; figures without an lr (RTN) replace."""
    metric, detail = new
    if old is None or old[0] is None or "lr" not in old[1] or "lr" not in detail:
        return new
    runs = dict(old[1].get("lr_runs") or {lr_label(old[1]): {**old[1], "metric": old[0]}})
    runs[lr_label(detail)] = {**detail, "metric": metric}
    best = max(runs, key=lambda lr: runs[lr]["metric"])
    chosen = {k: v for k, v in runs[best].items() if k != "metric"}
    return runs[best]["metric"], {**chosen, "lr_search": {lr: r["metric"] for lr, r in runs.items()}, "lr_runs": runs}


def merge_task(results: dict, task: str, row: dict, info: dict) -> None:
    """One bench invocation's figures into the results (others stay as recorded)."""
    figures = dict(results.get(task, {}))
    details = dict(results["details"].get(task, {}).get("details", {}))
    for key, metric in row.items():  # run_task gives each figure its details
        figures[key], details[key] = merge_figure(
            (figures.get(key), details[key]) if key in details else None, (metric, info["details"][key]))
    if "prequant_w4" in details:
        figures["trainable_pct"] = details["prequant_w4"].get("trainable_pct")
    results[task] = figures
    results["details"][task] = {**info, "details": details}


def add_replicate(results: dict, task: str, key: str, seed: int, metric: float, detail: dict) -> None:
    """A --seed run of a figure, kept beside the main one; a re-run at the same seed and lr_label replaces it."""
    reps = results.setdefault("replicates", {}).setdefault(task, {}).setdefault(key, [])
    reps[:] = [r for r in reps if (r["seed"], lr_label(r)) != (seed, lr_label(detail))]
    reps.append({"seed": seed, "metric": metric,
                 **{k: detail.get(k) for k in ("lr", "head_lr", "epochs", "batch_size", "train_s", "command")}})
    reps.sort(key=lambda r: (r["seed"], r["lr"] or 0))


def seed_stats(results: dict, task: str) -> dict:
    """Per figure with replicates: the main figure and the replicates trained like it (same lr, epochs and
    batch size), their mean and sample std."""
    stats = {}
    details = results.get("details", {}).get(task, {}).get("details", {})
    main_seed = results.get("details", {}).get(task, {}).get("finetune", {}).get("seed", 42)
    for key, reps in results.get("replicates", {}).get(task, {}).items():
        d = details.get(key)
        if d is None or results[task].get(key) is None:
            continue
        how = (lr_label(d), d.get("epochs"), d.get("batch_size"))
        by_seed = {main_seed: results[task][key], **{r["seed"]: r["metric"] for r in reps
                                                    if (lr_label(r), r["epochs"], r["batch_size"]) == how}}
        values = list(by_seed.values())
        if len(values) >= 2:
            stats[key] = {"values": values, "by_seed": by_seed, "mean": round(statistics.mean(values), 2),
                          "std": round(statistics.stdev(values), 2)}
    return stats


def paired_gap(stats: dict, key: str, reference: str, margin: float) -> str | None:
    """key - (reference - margin) over the seeds both were run at: "mean ± standard error (n seeds)", the
    seed-to-seed spread that both share taken out; None below two common seeds."""
    a, b = (stats.get(k, {}).get("by_seed", {}) for k in (key, reference))
    gaps = [a[s] - (b[s] - margin) for s in a.keys() & b.keys()]
    if len(gaps) < 2:
        return None
    return f"{statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps) / math.sqrt(len(gaps)):.2f} ({len(gaps)} seeds)"


def lrs_tried(detail: dict | None) -> int | str:
    """How many learning rates (and head lrs) a figure's search tried; 0 for figures without an lr (RTN),
    "?" when the figure has no details recorded."""
    if detail is None:
        return "?"
    if detail.get("lr") is None:
        return 0
    return len(detail.get("lr_search") or {}) or 1


def check_targets(results: dict) -> list[dict]:
    """The issue's bars per task: (target, measured, met); replicated figures are judged by their seed mean,
    with the gap paired by seed beside it, and "lrs": the learning rates each side's search tried (the issue
    asks for the same search budget for every method)."""
    rows = []
    for t in results.get("tasks", []):
        means = seed_stats(results, t)
        details = results.get("details", {}).get(t, {}).get("details", {})
        r = {**results[t], **{k: v["mean"] for k, v in means.items()}}
        for key, reference, margin in (bar for sfx in recipes(r) for bar in _bars(sfx)):  # each recipe vs its own FP
            target = f"{key} >= {reference}" + (f" - {margin}" if margin else "")
            limit = None if r.get(reference) is None else r[reference] - margin
            for row in target_row(t, target, r.get(key), limit):
                row["lrs"] = f"{lrs_tried(details.get(key))} / {lrs_tried(details.get(reference))}"
                if key in means or reference in means:
                    row["target"] += " (seed mean)"
                    row["paired_gap"] = paired_gap(means, key, reference, margin)
                rows.append(row)
        if r.get("trainable_pct") is not None:
            rows.append({"task": t, "target": "trainable <= 1%", "measured": f"{r['trainable_pct']:.3f}%",
                         "met": r["trainable_pct"] <= 1.0})
    return rows


def recipes(figures: dict) -> list[str]:
    """The recipe suffixes among a task's figures, the main recipe ("") first."""
    return sorted({s[1] for s in map(split_key, figures) if s} | {""}, key=lambda sfx: (sfx != "", sfx))


def _bars(sfx: str) -> list[tuple[str, str, float]]:
    """The bars of one recipe's figures (sfx: "" for the config file's, "_mean", "_e6", ...), each
    (figure, reference, margin): figure >= reference - margin."""
    prequant_keys = [(key, quant) for key, method, quant, _ in PLAN  # W8 is a diagnostic, not a bar
                     if method == "prequant" and QuantConfig.parse(quant).weight.bits in (3, 4)]
    bars = [(key + sfx, "fp_full" + sfx, 2.0 if QuantConfig.parse(quant).weight.bits == 3 else 1.0)
            for key, quant in prequant_keys]  # the bars: W4 (A16 and A8) >= FP - 1, W3 >= FP - 2
    for key in (key for key, quant in prequant_keys if quant == "w4"):  # criteria, grids: vs the PEFT baselines
        bars += [(key + sfx, other + sfx, 0.0) for other in SAME_BASE.get(key, ("lora_w4", "random_cols_w4"))]
    return bars


def quantizer_label(detail: dict) -> str | None:
    """The weight grid and rounding a PEFT figure's base used (recorded since GPTQ: row-mse+gptq)."""
    if not detail.get("quantizer"):
        return None
    return detail["quantizer"] + ("+gptq" if detail.get("gptq") else "")


def write(results: dict, path: Path) -> None:
    write_json_atomic(path, results)
    tasks = results.get("tasks", [])
    cols = ["task", "majority_class"] + [p[0] for p in PLAN] + ["trainable_pct"]
    rows = [{"task": t, **results[t]} for t in tasks]
    other = sorted({sfx for t in tasks for sfx in recipes(results[t])} - {""})
    detail_rows = [{"task": t, "method": k, "metric": results[t].get(k), "trainable_pct": d.get("trainable_pct"),
                    "trainable_params": d.get("trainable_params"),
                    "optimizer_state_MB": round(d["optimizer_state_bytes"] / 2**20, 3)
                    if d.get("optimizer_state_bytes") is not None else None,
                    "peak_rss_MB": d.get("peak_rss_mb"), "train_s": d.get("train_s"), "lr": d.get("lr"),
                    "lr_search": ", ".join(f"{lr}: {m}" for lr, m in d.get("lr_search", {}).items()) or None,
                    "epochs": d.get("epochs"), "quantizer": quantizer_label(d),
                    "model_MB": round(d["bytes"] / 2**20, 2) if d.get("bytes") else None, "source": d.get("source")}
                   for t in tasks for k, d in results["details"].get(t, {}).get("details", {}).items()]
    md = [f"# PreQuant ({results['model']}, {results['machine']})", "",
          "Main dev metric in points (MRPC: F1); a method run at several learning rates shows its best (all in "
          "lr_search below). trainable_pct: prequant_w4's trainable parameters, % of the model. majority_class: "
          "always predicting the most frequent train label; a figure at it learned nothing.",
          "", markdown_table(rows, cols), ""]
    for sfx in other:
        sfx_cols = [p[0] + sfx for p in PLAN if any(p[0] + sfx in results[t] for t in tasks)]
        sfx_rows = [r for r in rows if any(c in r for c in sfx_cols)]
        md += [f"## Recipe {sfx}: {recipe_title(sfx)}, every method and its FP reference", "",
               markdown_table(sfx_rows, ["task", "majority_class"] + sfx_cols), ""]
    md += ["## Targets", "",
           "paired_gap: figure - bar over the seeds both figures were run at, mean ± standard error; it "
           "takes out the spread the seeds share (a gap within about two standard errors of 0 is not resolved). "
           "lrs: how many learning rates the figure's / the bar's search tried (0: no lr, e.g. RTN; ?: not recorded).", "",
           markdown_table(check_targets(results), ["task", "target", "measured", "met", "paired_gap", "lrs"]), "",
           "## Per method", "",
           markdown_table(detail_rows, ["task", "method", "metric", "trainable_pct", "trainable_params",
                                        "optimizer_state_MB", "peak_rss_MB", "train_s", "lr", "lr_search", "epochs",
                                        "quantizer", "model_MB", "source"]), "",
           "peak_rss_MB: peak resident memory of the Ray Train worker process. fp_full optimizer state is measured "
           "when its checkpoint recorded it, else analytic (optimizer_state_note in the JSON).",
           "", f"Last command: `{results.get('command')}` (each figure's own command: `details` in the JSON)",
           "", f"Config: `{results.get('config_file')}` with {results.get('overrides')}"]
    reps = [{"task": t, "figure": k, "values": ", ".join(map(str, v["values"])), "mean": v["mean"], "std": v["std"]}
            for t in tasks for k, v in seed_stats(results, t).items()]
    if reps:
        md += ["", "## Replicates (`--seed`)", "",
               "The main figure first, then the `--seed` runs trained like it; the Targets table judges these "
               "figures by their mean.", "", markdown_table(reps, ["task", "figure", "values", "mean", "std"])]
    if results.get("notes"):
        md += ["", "## Notes (written after the runs above)", ""] + [f"- {n}" for n in results["notes"]]
    write_text_atomic(path.with_suffix(".md"), "\n".join(md) + "\n")


def log_to_mlflow(results: dict, path: Path, experiment: str) -> str:
    """The figures table, the Targets table and every figure as `<task>.<key>` metrics, in MLflow."""
    tasks = results.get("tasks", [])
    return log_results(experiment, [path, path.with_suffix(".md")],
                       {"prequant_figures": [{"task": t, **results[t]} for t in tasks],
                        "prequant_targets": check_targets(results)},
                       {f"{t}.{k}": v for t in tasks for k, v in results[t].items()}, results.get("command", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--config", default=None, help="default configs/prequant.yaml (--smoke: prequant_tiny.yaml)")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--only", nargs="*", default=None, help="subset of result keys, e.g. prequant_w4 lora_w4")
    parser.add_argument("--smoke", action="store_true", help="tiny-bert, a few steps, results under runs/")
    parser.add_argument("--log-only", action="store_true", help="only log the recorded figures to MLflow")
    parser.add_argument("--out", default=None, help="results file (default bench/results/prequant.json); for pilots")
    parser.add_argument("--seed", type=int, default=None,
                        help="a replicate with this finetune.seed, recorded beside the main figures")
    args = parser.parse_args()
    torch_threads()
    args.config = args.config or ("configs/prequant_tiny.yaml" if args.smoke else "configs/prequant.yaml")
    args.base_set = SMOKE if args.smoke else []  # the main table's recipe
    if args.smoke:
        args.set = SMOKE + ["output_dir=runs/prequant_smoke", *args.set]
    if args.seed is not None:
        args.set = [*args.set, f"finetune.seed={args.seed}"]
    path = ROOT / "runs" / "prequant_smoke" / "prequant.json" if args.smoke else RESULTS
    path = Path(args.out).resolve() if args.out else path
    cfg = load_config(ROOT / args.config, args.set)
    tasks, experiment = args.tasks or cfg.tasks, cfg.experiment_name
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.log_only:
        print(f"logged {path.name} to MLflow run {log_to_mlflow(results, path, experiment)} ({experiment})")
        return
    results.setdefault("details", {})
    command = "python " + " ".join(sys.argv)
    if args.seed is None:  # a replicate records its command beside its figure
        results.update(command=command, config_file=args.config, overrides=args.set)
    results.update(model=cfg.model, machine=f"{platform.machine()}, {os.cpu_count()} cores")
    for task in tasks:
        start = time.time()
        row, info = run_task(task, args)
        results.setdefault(task, {})["majority_class"] = majority_points(task, cfg.data)
        for d in info["details"].values():
            d["command"] = command  # several invocations fill one table: each figure keeps its own
        if args.seed is not None:
            for key, metric in row.items():
                add_replicate(results, task, key, args.seed, metric, info["details"][key])
            write(results, path)
            continue
        merge_task(results, task, row, info)
        results["details"][task]["bench_wall_s"] = round(time.time() - start, 1)
        results["tasks"] = sorted(set(results.get("tasks", [])) | {task})
        write(results, path)
    print(json.dumps({t: results[t] for t in results.get("tasks", [])}, indent=2))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if path == RESULTS:  # the recorded figures, not a pilot's (--out) or a smoke run's
        print(f"MLflow run {log_to_mlflow(results, path, experiment)} ({experiment})")


def torch_threads() -> None:
    """The driver only quantizes and evaluates; keep it off the workers' cores."""
    import torch

    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
