"""Autoscaling for real on one machine (Ray's fake multi-node provider, GPU worker type from cluster.yaml):
MREM's K one-GPU module actors make the autoscaler launch K nodes, and the idle nodes go away afterwards."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mrem_actors_make_the_autoscaler_launch_gpu_nodes(tmp_path):
    out = tmp_path / "autoscale.json"
    proc = subprocess.run([sys.executable, "bench/autoscale.py", "--modules", "3", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["nodes_launched"] == 3  # the head has no GPU: every actor needed a new node
    assert figures["distinct_node_gpu_slots"] == 3  # one actor per (node, GPU)
    assert figures["seconds_to_all_actors"] > 0
    assert figures["nodes_left_after_s"] == 0  # idle nodes released
    assert figures["worker_type"] == {"gpu_worker": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 2**20}}
