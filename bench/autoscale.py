"""Autoscaling for real on one machine: the MREM stage makes Ray's autoscaler launch GPU worker nodes.

    python bench/autoscale.py --record          # writes bench/results/autoscale.json
    python bench/autoscale.py --out result.json # what tests/system/test_autoscale.py runs

Ray's fake multi-node provider stands in for the cloud: its GPU worker type is derived
from cluster.yaml (its name and GPUs per node; 1 CPU per node so that it fits on
2 cores; max_workers = K). The head has no GPU, so the K module actors (one GPU
each) can only run once the autoscaler has launched K worker nodes; they must land
on K distinct (node, GPU) slots, and the idle nodes must be released afterwards.
The head runs in its own process group, ports and temp dir (never `ray stop`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import free_port, stop_process_group  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "autoscale.json"
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def fake_cluster_config(cluster_yaml: Path, port: int, workers: int) -> dict:
    """cluster.yaml's GPU node types on the fake provider (1 CPU per node, <= `workers` nodes)."""
    real = yaml.safe_load(cluster_yaml.read_text())
    gpu_types = {name: t for name, t in real["available_node_types"].items() if t.get("resources", {}).get("GPU")}
    if not gpu_types:
        raise SystemExit(f"{cluster_yaml} has no node type with a GPU")
    types = {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0}}
    for name, t in gpu_types.items():
        types[name] = {"resources": {"CPU": 1, "GPU": t["resources"]["GPU"], "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": 0, "max_workers": min(workers, t.get("max_workers", workers))}
    return {
        "cluster_name": "plmq-fake", "max_workers": workers, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "external", "module": PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
        "cluster_synced_files": [], "file_mounts": {}, "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def autoscaling_head(config: dict, port: int):
    temp = tempfile.mkdtemp(prefix="ras", dir="/tmp")
    cfg_path = Path(temp) / "autoscaler.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_ADDRESS": ""}
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
           f"--autoscaling-config={cfg_path}", f"--temp-dir={temp}", "--include-dashboard=false",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield f"127.0.0.1:{port}", cfg_path
    finally:
        import ray

        ray.shutdown()
        stop_process_group(head, timeout=60)


def tiny_inputs(tmp: Path, modules: int):
    """A tiny-bert teacher and a run config on a separable SST-2 folder (no downloads)."""
    from pipelines import checkpoints, models
    from pipelines.config import load_config
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_separable_sst2

    glue = write_separable_sst2(tmp / "glue", n_train=200, n_dev=64)
    checkpoints.save(models.load_classifier("tiny-bert", 2, seed=3), models.load_tokenizer("tiny-bert"),
                     tmp / "teacher", {"task": "sst2"}, "fp")
    cfg = load_config(None, [
        "model=tiny-bert", "tasks=[sst2]", "data.source=dir", f"data.dir={glue}", "data.max_length=16",
        f"data.cache_dir={tmp / 'tok'}", "evaluate.batch_size=32", "mrem.quant=[w4a8]", f"mrem.modules={modules}",
        "mrem.use_gpu=true", "mrem.steps=4", "mrem.batch_size=8", "mrem.calib_samples=32", "mrem.shard_size=16",
        "mrem.calib_batch_size=16", "mrem.checkpoint_every=2", "mrem.eval_samples=16", "mrem.log_every=2",
        "mrem.placement_timeout_s=300"])
    return str(tmp / "teacher"), cfg


def run_mrem(cfg, teacher: str, root: Path):
    """The calibrate and mrem stages on the teacher, run here (the actors ask the autoscaler for GPU nodes)."""
    import dataclasses

    from pipelines.stages import Context, calibrate, mrem

    (cal_stage,), (mrem_stage,) = calibrate.plan(cfg, teacher), mrem.plan(cfg, teacher)
    cal = calibrate.run(cfg, cal_stage, {}, Context(root, "calibrate"))
    return mrem.run(cfg, mrem_stage, {cal_stage.name: dataclasses.asdict(cal)}, Context(root, "mrem"))


def alive_workers(ray) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]


def measure(modules: int, cluster_yaml: Path) -> dict:
    import ray

    port = free_port()
    config = fake_cluster_config(cluster_yaml, port, modules)
    with tempfile.TemporaryDirectory() as tmp, autoscaling_head(config, port) as (address, _):
        teacher, cfg = tiny_inputs(Path(tmp), modules)
        ray.init(address=address, log_to_driver=False)
        assert not alive_workers(ray), "worker nodes before any request"
        start, seen, done = time.time(), set(), threading.Event()

        def watch() -> None:  # idle nodes may be released before MREM returns: count every node seen alive
            while not done.is_set():
                seen.update(alive_workers(ray))
                time.sleep(0.5)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = run_mrem(cfg, teacher, Path(tmp) / "out")
        finally:
            done.set()
            watcher.join()
        stats = result.info["modules_stats"]
        slots = sorted({(s["node_id"], tuple(s["gpu_ids"])) for s in stats})
        launched = len(seen | {s["node_id"] for s in stats})
        t_end = time.time()
        while alive_workers(ray) and time.time() - t_end < 180:
            time.sleep(1)
        return {"modules": modules, "nodes_launched": launched,
                "seconds_to_all_actors": round(max(s["wait_s"] for s in stats), 1),
                "distinct_node_gpu_slots": len(slots),
                "actor_slots": [f"node ..{n[-8:]} gpu {','.join(g)}" for n, g in slots],
                "nodes_left_after_s": len(alive_workers(ray)), "released_within_s": round(time.time() - t_end, 1),
                "mrem_wall_s": round(time.time() - start, 1), "accuracy": result.metrics["eval_accuracy"],
                "worker_type": {k: v["resources"] for k, v in config["available_node_types"].items()
                                if k != "ray.head.default"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modules", type=int, default=3)
    parser.add_argument("--cluster-yaml", default=str(ROOT / "cluster.yaml"))
    parser.add_argument("--out", help="write the measurement here (JSON)")
    parser.add_argument("--record", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Token auth for the head and this driver; set before Ray is imported (it reads them once).
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    figures = measure(args.modules, Path(args.cluster_yaml))
    figures["command"] = f"python bench/autoscale.py --modules {args.modules} --record"
    print(json.dumps(figures, indent=2))
    from pipelines.io import write_json_atomic
    if args.out:
        write_json_atomic(args.out, figures)
    if args.record:
        write_json_atomic(RESULTS, {**figures, "machine": f"{os.cpu_count()} cores, no GPU (fake GPU nodes)",
                                    "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
