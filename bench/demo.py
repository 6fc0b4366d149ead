"""`make demo` timed: the whole DAG on MiniLM + bundled SST-2 (configs/demo.yaml), from an empty run folder.

    python bench/demo.py      # run it alone: timings on a busy 2-core machine are meaningless

Writes bench/results/demo.json ({"wall_s", "table", "command"}) and .md, and the demo
figures of issue 2 (demo_wall_s, demo_accuracy) into bench/results/fp_reference.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.io import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402
from pipelines.report import COLUMNS, comparison_rows  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NOTE = ("wall_s is a stage's time from its start, including time queued for workers (the 2 cores hold one "
        "2-CPU training worker at a time, so PreQuant's fine-tune waited for the FP fine-tune); cpu_s/gpu_s are "
        "wall_s times the CPUs/GPUs the stage's workers reserved.")


def main() -> None:
    shutil.rmtree(ROOT / "runs" / "demo", ignore_errors=True)
    start = time.time()
    subprocess.run([str(Path(sys.executable).parent / "plmq"), "run", "configs/demo.yaml"], cwd=ROOT, check=True)
    wall = round(time.time() - start, 1)
    rows = comparison_rows(json.loads((ROOT / "runs" / "demo" / "results.json").read_text()))
    fp = next(r for r in rows if r["method"] == "fp")
    result = {"wall_s": wall, "table": rows, "command": "make demo  (plmq run configs/demo.yaml; venv installed, "
              "runs/demo removed first)", "machine": f"{os.cpu_count()} cores, no GPU",
              "date": time.strftime("%Y-%m-%d %H:%M")}
    write_json_atomic(RESULTS / "demo.json", result)
    write_text_atomic(RESULTS / "demo.md", f"# `make demo` ({result['machine']}, {result['date']})\n\n"
                      f"Wall time: {wall} s\n\n{markdown_table(rows, COLUMNS)}\n\n{NOTE}\n\n"
                      f"Command: `{result['command']}`\n")
    fp_path = RESULTS / "fp_reference.json"
    ref = json.loads(fp_path.read_text()) if fp_path.exists() else {}
    ref.update(demo_wall_s=wall, demo_accuracy=round(fp["value"] / 100, 4), demo_command=result["command"])
    write_json_atomic(fp_path, ref)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
