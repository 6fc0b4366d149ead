"""RTN figures on the FP references: W8A8, W4A8, W3A8, W2A8 (ternary), each with and without
8-bit embeddings; dev metric, drop vs FP and packed bytes.

    python bench/rtn.py --tasks sst2 rte mrpc

Uses runs/fp_reference/<task>/finetune/model (bench/fp_reference.py). Every run is logged to
MLflow (experiment plmq-rtn-bench). Writes bench/results/rtn.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import fp_reference  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.config import load_config, to_dict  # noqa: E402
from pipelines.io import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402
from pipelines.run import run_rtn_stage  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rtn.json"
CONFIGS = ["w8a8", "w4a8", "w3a8", "w2a8", "w8a8-e8", "w4a8-e8", "w3a8-e8", "w2a8-e8"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte", "mrpc"])
    parser.add_argument("--calib-samples", type=int, default=512)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for task in args.tasks:
        fp = fp_reference(task)
        metric = "f1" if task == "mrpc" else "accuracy"
        cfg = load_config(None, ["model=minilm-l6", f"tasks=[{task}]", "output_dir=runs/rtn_bench",
                                 "experiment=plmq-rtn-bench", "data.max_length=128",
                                 f"rtn.calib_samples={args.calib_samples}"])
        checkpoint = str(ROOT / fp["checkpoint"])
        row = {"fp": {"metric": fp[metric], "bytes": None}}
        with tracking.parent_run(cfg.experiment_name, f"bench-{task}", to_dict(cfg)):
            for quant in CONFIGS:
                r = run_rtn_stage(cfg, task, checkpoint, quant, Path(cfg.output_dir).resolve())
                value = round(100 * r.eval.metrics[metric], 2)
                row[quant] = {"metric": value, "drop_vs_fp": round(fp[metric] - value, 2), "bytes": r.packed_bytes,
                              "fp32_bytes": r.fp_bytes}
                print(f"[bench rtn] {task} {quant}: {value} (FP {fp[metric]}), {r.packed_bytes / 2**20:.1f} MiB",
                      flush=True)
        results[task] = row
        results["command"] = "python " + " ".join(sys.argv)
        results["metric"] = "accuracy (MRPC: F1), dev, points; calib samples per run: " + str(args.calib_samples)
        write(results)


def write(results: dict) -> None:
    write_json_atomic(RESULTS, results)
    rows = []
    for task, row in results.items():
        if not isinstance(row, dict):
            continue
        for quant, v in row.items():
            rows.append({"task": task, "config": quant, "metric": v["metric"], "drop_vs_fp": v.get("drop_vs_fp"),
                         "MiB": round(v["bytes"] / 2**20, 1) if v.get("bytes") else None,
                         "vs_fp32": round(v["fp32_bytes"] / v["bytes"], 2) if v.get("bytes") else None})
    md = ["# RTN on the FP references (MiniLM-L6)", "", results.get("metric", ""), "",
          markdown_table(rows, ["task", "config", "metric", "drop_vs_fp", "MiB", "vs_fp32"]), "",
          f"Command: `{results.get('command')}`"]
    write_text_atomic(RESULTS.with_suffix(".md"), "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
