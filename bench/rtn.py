"""RTN figures on the FP references: W8A8, W4A8, W3A8, W2A8 (ternary), each with and without
8-bit embeddings; dev metric, drop vs FP and packed bytes.

    python bench/rtn.py --tasks sst2 rte mrpc

Uses runs/fp_reference/<task>/finetune/model (bench/fp_reference.py): the rtn stages of each task, planned
from that checkpoint, run through pipelines.runner.run (logged to MLflow, experiment plmq-rtn-bench).
Writes bench/results/rtn.json and .md; --write-only rewrites the page from the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import fp_reference, markdown, write_results  # noqa: E402
from pipelines.config import load_config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rtn.json"
CONFIGS = ["w8a8", "w4a8", "w3a8", "w2a8", "w8a8-e8", "w4a8-e8", "w3a8-e8", "w2a8-e8"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte", "mrpc"])
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--write-only", action="store_true", help="only rewrite the Markdown from the JSON")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.write_only:
        write(results)
        return
    # the driver loads Ray: rewriting the page needs none of it
    from pipelines import runner
    from pipelines.stages import plan_kinds

    for task in args.tasks:
        fp = fp_reference(task)
        metric = "f1" if task == "mrpc" else "accuracy"
        cfg = load_config(None, ["model=minilm-l6", f"tasks=[{task}]", "output_dir=runs/rtn_bench",
                                 "experiment=plmq-rtn-bench", "data.max_length=128", f"rtn.quant=[{','.join(CONFIGS)}]",
                                 f"rtn.calib_samples={args.calib_samples}"])
        stages = plan_kinds(cfg, ("rtn",), str(ROOT / fp["checkpoint"]), with_report=False)
        summary = runner.run(cfg, stages, name=f"bench-{task}")
        row = {"fp": {"metric": fp[metric], "bytes": None}}
        for quant, stage in zip(CONFIGS, stages, strict=True):
            outcome = summary.outcomes[stage.name]
            value, info = outcome["row"]["value"], outcome["info"]
            row[quant] = {"metric": value, "drop_vs_fp": round(fp[metric] - value, 2), "bytes": info["packed_bytes"],
                          "fp32_bytes": info["fp_bytes"]}
            print(f"[bench rtn] {task} {quant}: {value} (FP {fp[metric]}), {info['packed_bytes'] / 2**20:.1f} MiB",
                  flush=True)
        results[task] = row
        results["command"] = "python " + " ".join(sys.argv)
        results["metric"] = "accuracy (MRPC: F1), dev, points; calib samples per run: " + str(args.calib_samples)
        write(results)


def write(results: dict) -> None:
    rows = []
    for task, row in results.items():
        if not isinstance(row, dict):
            continue
        for quant, v in row.items():
            rows.append({"task": task, "config": quant, "metric": v["metric"], "drop_vs_fp": v.get("drop_vs_fp"),
                         "MiB": round(v["bytes"] / 2**20, 1) if v.get("bytes") else None,
                         "vs_fp32": round(v["fp32_bytes"] / v["bytes"], 2) if v.get("bytes") else None})
    md = markdown("RTN on the FP references (MiniLM-L6)", results.get("metric", ""),
                  (rows, ["task", "config", "metric", "drop_vs_fp", "MiB", "vs_fp32"]),
                  footer=f"Command: `{results.get('command')}`")
    write_results(RESULTS, results, md)


if __name__ == "__main__":
    main()
