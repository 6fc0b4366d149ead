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

from bench.common import markdown, write_results  # noqa: E402
from pipelines.config import load_config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fp_reference.json"


def machine() -> str:
    import os
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"


def run_fp(config: str, tasks: list[str] | None, overrides: list[str]) -> dict:
    # the driver loads Ray: rewriting the page needs none of it
    from pipelines import runner

    cfg = load_config(ROOT / config, ([f"tasks=[{','.join(tasks)}]"] if tasks else []) + overrides)
    command = f"python bench/fp_reference.py --part fp --tasks {' '.join(cfg.tasks)}" + "".join(
        f" --set {o}" for o in overrides) + f"  (plmq run {config})"
    summary = runner.run(cfg)
    out = {}
    for row in summary.rows:
        model = Path(summary.output_dir) / row["task"] / "finetune" / "model"
        meta = json.loads((model / "plmq_meta.json").read_text())
        out[row["task"]] = {**{k: round(100 * v, 2) for k, v in row["metrics"].items()},
                            "train_examples": meta["train_examples"], "epochs": cfg.finetune.epochs,
                            "lr": cfg.finetune.lr, "batch_size": cfg.finetune.batch_size,
                            "wall_s": row["wall_s"], "checkpoint": f"{cfg.output_dir}/{row['task']}/finetune/model",
                            "command": command}
    out["config"] = config
    return out


def write(results: dict) -> None:
    """fp_reference.json and its page: the table and each task's command (notes stay in the JSON)."""
    rows = [{"task": t, **v} for t, v in results.items() if isinstance(v, dict) and "wall_s" in v]
    md = markdown("FP references (MiniLM-L6, CPU)", f"Machine: {results.get('machine')}",
                  (rows, ["task", "accuracy", "f1", "train_examples", "epochs", "lr", "batch_size", "wall_s"]),
                  footer="\n".join(f"- {r['task']}: `{r.get('command', results.get('command'))}`" for r in rows))
    write_results(RESULTS, results, md)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["fp"], default="fp", help="`make demo` is timed by bench/demo.py")
    parser.add_argument("--config", default="configs/fp_reference.yaml")
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of the config's tasks")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--write-only", action="store_true", help="only rewrite the Markdown from the JSON")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.write_only:
        write(results)
        return
    results["machine"] = machine()
    results.update(run_fp(args.config, args.tasks, args.overrides))
    write(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
