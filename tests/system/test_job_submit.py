"""`ray job submit -- plmq run configs/tiny.yaml` against a local head node with token auth.

The head runs in its own process group, temp dir and ports, so it never touches
another Ray on the machine (the test session's, or a user's); it is stopped by
signalling that group, not by `ray stop` (which stops every Ray of the user).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.common import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", "runs", "mlruns", "mlartifacts", "mlflow.db", ".git", "**/__pycache__", "bench/results"]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (sockets held open together, so no port is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def local_head(num_cpus: int = 2):
    """`ray start --head --block` with token auth; yields (dashboard address, env for ray CLI calls)."""
    gcs, dash, agent, grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(8)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": ""}
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=true",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--num-cpus={num_cpus}", f"--temp-dir={temp}",
           "--disable-usage-stats", "--block"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_process_group(head)


def submit(address: str, env: dict, job_id: str, entrypoint: list[str], env_vars: dict, timeout: float = 600):
    """Submit (retrying while the job agent starts), wait for the end, return the final status."""
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": env_vars})
    args = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
            "--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--no-wait", "--", *entrypoint]
    deadline = time.time() + 120
    while True:
        out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
        if out.returncode == 0 or time.time() > deadline:
            break
        time.sleep(2)  # "No available agent to submit job": the agent is still starting
    assert out.returncode == 0, out.stderr[-3000:]
    status = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    return status, logs


@pytest.mark.slow
def test_plmq_run_as_a_ray_job(tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_dir, tok = tmp_path / "run", tmp_path / "tok"
    entry = ["plmq", "run", "configs/tiny.yaml", "--set", f"output_dir={run_dir}", "--set",
             f"data.cache_dir={tok}", "--set", "experiment=job-test", "--set", "mrem.steps=6",
             "--set", "data.train_examples=128"]
    with local_head() as (address, env):
        unauthenticated = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                         env={**env, "RAY_AUTH_TOKEN": "wrong-token"}, capture_output=True,
                                         text=True)
        status, logs = submit(address, env, "plmq-tiny", entry,
                              {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert unauthenticated.returncode != 0  # token auth is on: a wrong token is refused
    assert "succeeded" in status, logs[-4000:]
    assert "| sst2 | fp |" in logs and (run_dir / "report.md").exists()
    assert "mrem-parallel+e2e-w4a8" in (run_dir / "report.md").read_text()  # the DAG ran mrem-e2e after mrem
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("job-test").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) >= 8  # the parent and a nested run per stage
