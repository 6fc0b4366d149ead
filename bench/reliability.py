"""Reliability figures: the faults and bad inputs of the reliability issue, tried on tiny-bert and the bundled
SST-2; for each, what happened and the work redone.

    python -m bench.reliability             # writes bench/results/reliability.json and .md
    python -m bench.reliability --quick     # faults only, no bad inputs; prints, writes nothing

Faults are injected with `pipelines.faults` (PLMQ_FAULTS): a module actor, a Ray Train worker, a stage process and
the driver each exit at a given step, once; the driver is also killed while its fine-tune's worker holds at a step,
and a two-node `ray.cluster_utils.Cluster` loses the node of a module actor holding at a step. A fault counts as
survived when the same command again (or Ray's own restart) completes and only the interrupted work is redone. Bad
inputs run `plmq run` as a user would; one counts when it exits with status 2, one `error:` line and no traceback,
before any stage record exists. Afterwards the output folders are searched for half-written files (temporary names
left behind), and the product code for loads that could unpickle (bench/reliability_cases.py lists the inputs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import common
from bench.reliability_cases import make_bad_inputs

ROOT = common.ROOT
RESULTS = ROOT / "bench" / "results" / "reliability.json"
BASE = {"model": "tiny-bert", "tasks": ["sst2"], "experiment": "bench-reliability",
        "data": {"max_length": 32, "train_examples": 608, "eval_examples": 128},
        "finetune": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "log_every": 20},
        "rtn": {"quant": ["w8a8", "w4a8"], "calib_samples": 64},
        "mrem": {"quant": [], "modules": 2, "steps": 60, "batch_size": 16, "calib_samples": 128, "shard_size": 64,
                 "checkpoint_every": 10, "log_every": 10, "eval_samples": 64},
        "prequant": {"quant": []}}


def config(out: Path, **sections):
    from pipelines.config import load_config

    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    data["output_dir"] = str(out)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, []), path


class Faults:
    """Arm fault points for the runs inside a `with` (this process and the Ray work it starts)."""

    def __init__(self, root: Path, *points: str):
        self.dir, self.points = root / f"faults-{time.time_ns()}", points

    def __enter__(self):
        from pipelines import faults

        self.dir.mkdir(parents=True)
        os.environ.update({faults.ENV: ",".join(self.points), faults.DIR_ENV: str(self.dir)})
        return self

    def __exit__(self, *exc):
        from pipelines import faults

        os.environ.pop(faults.ENV, None)
        os.environ.pop(faults.DIR_ENV, None)

    def fired(self) -> list[str]:
        from pipelines import faults

        return faults.fired(self.dir)


def row(case: str, outcome: str, redone_s: float, survived: bool, **extra) -> dict:
    return {"case": case, "outcome": outcome, "redone_s": round(redone_s, 1), "survived": survived, **extra}


FT3 = {**BASE["finetune"], "epochs": 3}  # 114 steps of 38 per epoch: a fault at step 80 finds a registered checkpoint


def _same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(f"{s.outcomes['finetune/sst2']['checkpoint']}/model.safetensors") for s in (a, b))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def worker_fault(tmp: Path) -> list[dict]:
    """A Ray Train worker dies in epoch 3; `plmq run` is killed while its worker is there; and the reference run
    both must equal."""
    from pipelines.runner import run

    whole = run(config(tmp / "ft-whole", rtn={"quant": []}, finetune=FT3)[0])
    with Faults(tmp, "finetune.rank0@80") as f:
        cut = run(config(tmp / "ft-cut", rtn={"quant": []}, finetune=FT3)[0])
    info = whole.outcomes["finetune/sst2"]["info"]
    per_step = info["train_s"] / info["steps"]
    resumed = cut.outcomes["finetune/sst2"]["info"]["resumed_from_step"]
    equal = _same_weights(whole, cut)
    rows = [row("Ray Train worker killed at step 80 of 114 (fine-tune, 38 steps per epoch)",
                f"restarted by Ray Train from the step-{resumed} checkpoint; weights equal to an uninterrupted run: "
                f"{equal}", (80 - resumed) * per_step, bool(f.fired()) and resumed > 0 and equal)]
    return rows + [driver_in_stage_fault(tmp, whole, per_step)]


def driver_in_stage_fault(tmp: Path, whole, per_step: float) -> dict:
    """`plmq run` is killed (SIGKILL) while its fine-tune's worker is at step 80; the same command again."""
    import signal
    import subprocess

    from pipelines import faults
    from pipelines.runner import run

    cfg, path = config(tmp / "ft-driver", rtn={"quant": []}, finetune=FT3)
    (tmp / "ft-driver-faults").mkdir()
    env = {**os.environ, faults.ENV: "finetune.rank0@80:hold", faults.DIR_ENV: str(tmp / "ft-driver-faults"),
           "RAY_ADDRESS": ray_address()}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(path)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not faults.fired(tmp / "ft-driver-faults") and driver.poll() is None:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    killed = driver.wait() == -signal.SIGKILL
    again = run(cfg)
    resumed = again.outcomes["finetune/sst2"]["info"]["resumed_from_step"]
    equal = _same_weights(whole, again)
    return row("driver (`plmq run`) killed (SIGKILL) while its fine-tune was at step 80 of 114",
               f"the same command again resumed the fine-tune from its step-{resumed} checkpoint; weights equal to an "
               f"uninterrupted run: {equal}", (80 - resumed) * per_step, killed and resumed > 0 and equal,
               mlflow_runs_left_running=running_runs())


def node_fault(tmp: Path) -> list[dict]:
    """A two-node cluster (`ray.cluster_utils.Cluster`, the head without CPUs) loses the node of MREM-P's module 1 at
    its step 25 and gains a new one, as an autoscaler would add; the stage goes on, module 1 from its checkpoint."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        with Faults(tmp, "mrem.module1@25:hold") as f:
            outcome = _lose_module_node(tmp, cluster, f.fired)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return [outcome]


def _lose_module_node(tmp: Path, cluster, fired) -> dict:
    """Run MREM-P in a thread (Ray adds nodes from the main thread only); when module 1 holds at step 25, remove
    its node and add another."""
    import threading

    import ray

    from pipelines.runner import StageFailure, run

    cfg, _ = config(tmp / "node", rtn={"quant": []}, finetune={**BASE["finetune"], "epochs": 1},
                    mrem={**BASE["mrem"], "quant": ["w4a8"]})
    outcome: dict = {}

    def go() -> None:
        try:
            outcome["summary"] = run(cfg)
        except StageFailure as err:
            outcome["error"] = err

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    while not fired() and thread.is_alive():
        time.sleep(0.2)
    name = next(n for n in ray.util.list_named_actors() if n.startswith("mrem-") and n.endswith("-1"))
    node_id = ray.get(ray.get_actor(name).placement.remote())["node_id"]
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node_id))
    cluster.add_node(num_cpus=1)
    thread.join()
    again = "" if "summary" in outcome else "; its stage failed (its process was on that node), the same command again"
    summary = outcome.get("summary") or run(cfg)
    info = next(o["info"] for n, o in summary.outcomes.items() if n.startswith("mrem/"))
    s0, s1 = info["modules_stats"]
    ok = s1["resumed_from_step"] == 20 and s1["node_id"] != node_id and not s0["restarted"]
    return row("worker node of MREM-P module 1 removed at its step 25 of 60 (two-node Cluster; a new node added)",
               f"module 1 restarted on the new node from step {s1['resumed_from_step']}{again}; module 0 restarted: "
               f"{s0['restarted']}", (25 - s1["resumed_from_step"]) * info["train_s"] / 60, bool(fired()) and ok)


def actor_fault(tmp: Path) -> list[dict]:
    from pipelines.runner import run

    cfg, _ = config(tmp / "mrem", rtn={"quant": []}, mrem={**BASE["mrem"], "quant": ["w4a8"]})
    with Faults(tmp, "mrem.module1@25") as f:
        summary = run(cfg)
    info = next(o["info"] for n, o in summary.outcomes.items() if n.startswith("mrem/"))
    s1 = info["modules_stats"][1]
    per_step = info["train_s"] / 60
    ok = bool(f.fired()) and s1["restarted"] and s1["resumed_from_step"] == 20
    others = [s["module"] for s in info["modules_stats"] if s["restarted"] and s["module"] != 1]
    return [row("MREM-P module actor 1 killed at step 25 of 60 (K=2)",
                f"Ray restarted it; resumed from step {s1['resumed_from_step']}; other modules restarted: {others}",
                (25 - s1["resumed_from_step"]) * per_step, ok)]


def stage_fault(tmp: Path) -> list[dict]:
    """A stage process dies inside its MLflow run; the same command again redoes that stage only."""
    from pipelines.runner import StageFailure, run

    cfg, _ = config(tmp / "stage", finetune={**BASE["finetune"], "epochs": 1})
    with Faults(tmp, "stage.rtn/sst2/w8a8@0") as f:
        try:
            run(cfg)
            failed = False
        except StageFailure:
            failed = True
    again = run(cfg)
    redone = sorted(set(again.outcomes) - set(again.skipped) - {"report"})
    return [row("stage process rtn/sst2/w8a8 killed inside its MLflow run",
                f"that stage failed, the others completed; the same command again redid {redone}",
                sum(again.outcomes[n].get("stage_s", 0) for n in redone),
                bool(f.fired()) and failed and redone == ["rtn/sst2/w8a8"], mlflow_runs_left_running=running_runs())]


def driver_fault(tmp: Path) -> list[dict]:
    """`plmq run` dies once the fine-tune is recorded; the same command again keeps it."""
    import subprocess

    from pipelines import faults
    from pipelines.runner import run

    cfg, path = config(tmp / "driver", finetune={**BASE["finetune"], "epochs": 1})
    (tmp / "driver-faults").mkdir()
    env = {**os.environ, faults.ENV: "driver.finetune/sst2@0", faults.DIR_ENV: str(tmp / "driver-faults"),
           "RAY_ADDRESS": ray_address()}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    again = run(cfg)
    redone = sorted(set(again.outcomes) - set(again.skipped) - {"report"})
    ok = out.returncode == faults.EXIT_CODE and "finetune/sst2" in again.skipped
    return [row("driver (`plmq run`) killed once finetune/sst2 was recorded",
                f"exit {out.returncode}; the same command again kept the fine-tune and ran {redone}",
                0.0, ok, mlflow_runs_left_running=running_runs())]


def record_faults(tmp: Path) -> list[dict]:
    """A truncated stage record and a crafted module checkpoint in the output folder."""
    from pipelines.io import UnsafeFile
    from pipelines.runner import StageFailure, run
    from tests.crafted import crafted_pickle

    cfg, _ = config(tmp / "driver", finetune={**BASE["finetune"], "epochs": 1})  # the driver fault's folder
    record = Path(cfg.output_dir) / "stages" / "rtn__sst2__w4a8.json"
    record.write_text(record.read_text()[:40])
    again = run(cfg)
    rows = [row("stage record truncated (rtn/sst2/w4a8)", "not trusted: recomputed with a warning",
                again.outcomes["rtn/sst2/w4a8"]["stage_s"], "rtn/sst2/w4a8" not in again.skipped)]
    mcfg, _ = config(tmp / "mrem", rtn={"quant": []}, mrem={**BASE["mrem"], "quant": ["w4a8"]})
    states = sorted(Path(mcfg.output_dir).rglob("module1/state.pt"))
    marker = crafted_pickle(states[0]) if states else crafted_pickle(tmp / "none" / "state.pt")
    for rec in (Path(mcfg.output_dir) / "stages").glob("mrem__*.json"):
        rec.unlink()
    try:
        run(mcfg)
        outcome = "resumed without error: the crafted file was read"
    except (StageFailure, UnsafeFile) as err:
        outcome = "refused: " + ("UnsafeFile names the file" if "refusing to load" in str(err) else str(err)[-200:])
    rows.append(row("crafted pickle as module 1's checkpoint, MREM record deleted", outcome, 0.0,
                    bool(states) and not marker.exists() and outcome.startswith("refused")))
    return rows


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def running_runs() -> int:
    import mlflow

    runs = mlflow.search_runs(experiment_names=[BASE["experiment"]], output_format="list")
    return sum(r.info.status == "RUNNING" for r in runs)


def half_written(root: Path) -> list[str]:
    """Temporary files or folders (io's `.<name>.<pid>.<hex>.tmp`, atomic_dir's `<name>.tmp`) left behind."""
    return [str(p) for p in root.rglob("*.tmp")]


def unsafe_loads() -> list[str]:
    """Calls that could unpickle a file, in the product code (io.load_tensors' weights_only load excepted)."""
    found = []
    for path in [p for d in ("quant", "actors", "pipelines") for p in (ROOT / d).rglob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True", code) and \
                    "weights_only=True" not in code:
                found.append(f"{path.relative_to(ROOT)}:{i}")
    return found


def bad_input_rows(tmp: Path) -> list[dict]:
    import subprocess

    _, path = config(tmp / "bad", finetune={**BASE["finetune"], "epochs": 1})
    rows = []
    for case, args, expect in make_bad_inputs(tmp, path):
        start = time.time()
        env = {**os.environ, "RAY_ADDRESS": ray_address()}
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        err = [line for line in out.stderr.splitlines() if re.match(r"(config )?error:", line)]
        clear = out.returncode == 2 and len(err) == 1 and "Traceback" not in out.stderr and expect in err[0]
        stages = any((tmp / "bad").rglob("stages/*.json"))
        rows.append({"case": case, "outcome": err[0][:240] if err else f"exit {out.returncode}: "
                     f"{out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else ''}",
                     "clear_error_before_work": clear and not stages, "s": round(time.time() - start, 1)})
    return rows


def markdown(results: dict) -> str:
    lines = ["# Reliability: faults and bad inputs (tiny-bert, bundled SST-2)", "",
             f"Faults tried {results['faults']['tried']}, survived {results['faults']['survived']}; bad inputs "
             f"tried {results['bad_inputs']['tried']}, answered with a clear error before work "
             f"{results['bad_inputs']['clear_error_before_work']}; half-written files "
             f"{results['half_written_files']}; unsafe loads {results['unsafe_loads']}.", "",
             "## Faults", "", common.markdown_table(results["rows"], ["case", "outcome", "redone_s", "survived"])]
    if results.get("bad_input_rows"):
        lines += ["", "## Bad inputs", "",
                  common.markdown_table(results["bad_input_rows"], ["case", "outcome", "clear_error_before_work"])]
    lines += ["", f"Command: `{results['command']}` ({results['machine']}, {results['wall_s']} s)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="faults only; print, write nothing")
    args = parser.parse_args()
    start = time.time()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    from pipelines.cluster import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = [r for fn in (worker_fault, actor_fault, stage_fault, driver_fault, record_faults) for r in fn(tmp)]
        bad = [] if args.quick else bad_input_rows(tmp)
        rows += node_fault(tmp)  # last: it replaces this process's Ray instance with a Cluster
        results = {"faults": {"tried": len(rows), "survived": sum(r["survived"] for r in rows)},
                   "bad_inputs": {"tried": len(bad), "clear_error_before_work":
                                  sum(r["clear_error_before_work"] for r in bad)},
                   "half_written_files": len(half_written(tmp)), "half_written": half_written(tmp),
                   "unsafe_loads": len(unsafe_loads()), "rows": rows, "bad_input_rows": bad,
                   "command": "python -m bench.reliability" + (" --quick" if args.quick else ""),
                   "machine": f"{os.cpu_count()} cores, no GPU", "wall_s": round(time.time() - start)}
    print(markdown(results))
    if not args.quick:
        common.write_results(RESULTS, results, markdown(results))


if __name__ == "__main__":
    main()
