"""FP reference figures: longer fine-tunes on SST-2, RTE, MRPC.

    python bench/fp_reference.py --tasks mrpc [--set finetune.lr=5e-5 ...]   (configs/fp_reference.yaml)

`make demo`'s wall time and accuracy are recorded by bench/demo.py.

Writes bench/results/fp_reference.json and .md (merging with what is already there).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.config import load_config  # noqa: E402
from pipelines.io import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fp_reference.json"


def machine() -> str:
    import os
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"


def run_fp(config: str, tasks: list[str] | None, overrides: list[str]) -> dict:
    from pipelines.run import run

    cfg = load_config(ROOT / config, ([f"tasks=[{','.join(tasks)}]"] if tasks else []) + overrides)
    command = f"python bench/fp_reference.py --part fp --tasks {' '.join(cfg.tasks)}" + "".join(
        f" --set {o}" for o in overrides) + f"  (plmq run {config})"
    summary = run(cfg)
    out = {}
    for row in summary.rows:
        meta = json.loads((Path(summary.output_dir) / row["task"] / "finetune" / "model" / "plmq_meta.json").read_text())
        out[row["task"]] = {**{k: round(100 * v, 2) for k, v in row["metrics"].items()},
                            "train_examples": meta["train_examples"], "epochs": cfg.finetune.epochs,
                            "lr": cfg.finetune.lr, "batch_size": cfg.finetune.batch_size,
                            "wall_s": row["wall_s"], "checkpoint": f"{cfg.output_dir}/{row['task']}/finetune/model",
                            "command": command}
    out["config"] = config
    return out


def write(results: dict) -> None:
    write_json_atomic(RESULTS, results)
    rows = [{"task": t, **v} for t, v in results.items() if isinstance(v, dict) and "wall_s" in v]
    md = ["# FP references (MiniLM-L6, CPU)", "", f"Machine: {results.get('machine')}", "",
          markdown_table(rows, ["task", "accuracy", "f1", "train_examples", "epochs", "lr", "wall_s"]), "",
          *[f"- {r['task']}: `{r.get('command', results.get('command'))}`" for r in rows], "", f"Notes: {results.get('notes', '')}", "",
          f"`make demo`: {results.get('demo_wall_s')} s, SST-2 dev accuracy {results.get('demo_accuracy')} "
          f"(`{results.get('demo_command')}`)"]
    write_text_atomic(RESULTS.with_suffix(".md"), "\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["fp"], default="fp", help="`make demo` is timed by bench/demo.py")
    parser.add_argument("--config", default="configs/fp_reference.yaml")
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of the config's tasks")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = machine()
    results.update(run_fp(args.config, args.tasks, args.overrides))
    write(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
