"""bench/gpu.sh and bench/gpu.py: without CUDA they skip and record nothing; the figures are taken in order,
saved as they come, cut by the time budget, and written as a page (fake figures: no Ray, no GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import common, gpu

ACTOR = {"module": 0, "layers": [0, 3], "device": "cuda", "gpu_ids": ["0"], "s_per_step": 0.0123, "wall_s": 2.5,
         "peak_cuda_mb": 301.4, "peak_rss_mb": 900.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_script_skips_cleanly_without_cuda_and_records_nothing():
    before = gpu.RESULTS.stat().st_mtime if gpu.RESULTS.exists() else None
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(common.ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU: skipped" in done.stdout and "nothing recorded" in done.stdout
    assert (gpu.RESULTS.stat().st_mtime if gpu.RESULTS.exists() else None) == before


def _fakes(monkeypatch, calls: list) -> None:
    def finetune(out, args):
        calls.append("finetune")
        return {"train_examples": 4000, "device": "cuda:0", "examples_per_s": 900.0, "train_s": 4.4,
                "peak_cuda_mb": 700.0, "accuracy": 85.0, "cpu_recorded": {"examples_per_s": 8.8}}, "ckpt"

    def mrem(out, checkpoint, k, share, args):
        calls.append(("mrem", checkpoint, k, share))
        return {"modules": k, "gpus_per_actor": share, "steps_per_module": 200, "train_s": 10.0 * (3 - k),
                "accuracy": 86.0, "actors": [{**ACTOR, "module": i} for i in range(k)]}

    def decoder(out, args):
        calls.append("decoder")
        return {"model": "tiny-llama", "modules": 2, "gpus_per_actor": 0.5, "steps_per_module": 200,
                "train_s": 5.0, "mrem_ppl": 31000.0, "actors": [ACTOR, {**ACTOR, "module": 1}]}

    monkeypatch.setattr(gpu, "finetune_figure", finetune)
    monkeypatch.setattr(gpu, "mrem_figure", mrem)
    monkeypatch.setattr(gpu, "decoder_figure", decoder)


def test_figures_in_order_each_saved_and_the_page_written(monkeypatch, tmp_path):
    calls, saved = [], []
    _fakes(monkeypatch, calls)
    results = {"machine": {"gpu": "H100"}, "command": "python -m bench.gpu", "mrem": {}, "not_run": []}
    gpu.measure(results, tmp_path, SimpleNamespace(budget_s=1e9), lambda: saved.append(len(calls)))
    assert calls == ["finetune", ("mrem", "ckpt", 2, 0.5), ("mrem", "ckpt", 1, 1.0), "decoder"]
    assert saved == [1, 2, 3, 4] and results["mrem"]["train_speedup_k2_vs_k1"] == 2.0
    gpu.write(results, tmp_path / "gpu.json")
    page = (tmp_path / "gpu.md").read_text()
    assert "| finetune | MiniLM SST-2, 4000 examples, 1 epoch | cuda:0 | 900 | 4.4 |  | 700 |" in page
    assert "| mrem k2_half_gpu | K=2, 0.5 GPU/actor, 200 steps | cuda |" in page and "[['0'], ['0']]" in page
    assert "tiny-llama" in page and "CPU recorded 8.8 ex/s" in page and "Not run" not in page


def test_figures_past_the_budget_are_listed_not_run(monkeypatch, tmp_path):
    calls = []
    _fakes(monkeypatch, calls)
    results = {"mrem": {}, "not_run": []}
    gpu.measure(results, tmp_path, SimpleNamespace(budget_s=-1), lambda: None)
    assert calls == [] and results["not_run"] == ["finetune", "mrem.k2_half_gpu", "mrem.k1_whole_gpu", "decoder"]
    gpu.write(results, tmp_path / "gpu.json")
    assert "Not run (time budget): finetune, mrem.k2_half_gpu" in (tmp_path / "gpu.md").read_text()
