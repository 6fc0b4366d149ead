"""On a CUDA GPU: MREM-P module actors pinned to GPUs (a whole GPU each, or two sharing one at
gpus_per_actor=0.5), on a classifier and on a causal LM; RTN's packed export evaluated on CUDA.
Skipped without CUDA."""
from __future__ import annotations

import math

import pytest
import torch

from pipelines import checkpoints
from pipelines.config import load_config
from pipelines.evaluation import evaluate_model
from pipelines.stages import plan_kinds

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")]

MREM = ["mrem.quant=[w4a8]", "mrem.use_gpu=true", "mrem.steps=20", "mrem.batch_size=16", "mrem.lr=1e-4",
        "mrem.calib_samples=128", "mrem.shard_size=64", "mrem.checkpoint_every=10", "mrem.log_every=10",
        "mrem.eval_samples=64"]


def run_kinds(cfg, kinds: tuple[str, ...], checkpoint: str | None = None) -> dict:
    """The stages of `kinds` through the driver (resources resolved there); their outcomes by name."""
    from pipelines.runner import run

    stages = plan_kinds(cfg, kinds, checkpoint, with_report=False)
    return run(cfg, stages, name="gpu-test").outcomes


def check_modules_on_cuda(info: dict, share: float) -> list[list[str]]:
    """Every module actor trained on cuda, on one Ray GPU id, and measured its peak CUDA memory."""
    stats = info["modules_stats"]
    assert {s["device"] for s in stats} == {"cuda"}, stats
    assert all(len(s["gpu_ids"]) == max(1, int(share)) and s["peak_cuda_mb"] > 0 for s in stats), stats
    assert info["eval"]["device"] == "cuda"  # the assembled packed export, evaluated in the stage's task
    return [s["gpu_ids"] for s in stats]


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_mrem_p_actors_are_pinned_to_gpus(ray_session, mlflow_uri, tiny_teacher, tiny_run_cfg, share):
    """A whole GPU each: K is the GPUs the node holds (at most 2, the CPUs), distinct ids; half a GPU each:
    K = 2 on any GPU node, both actors on one GPU at once (the same id)."""
    cfg = tiny_run_cfg("experiment=gpu-mrem", f"mrem.gpus_per_actor={share}", *MREM)
    outcomes = run_kinds(cfg, ("calibrate", "mrem"), tiny_teacher)
    mrem = outcomes["mrem/sst2/w4a8-parallel"]
    k = min(2, torch.cuda.device_count()) if share == 1.0 else 2
    assert mrem["info"]["modules"] == k and mrem["resources"]["gpus"] == k * share
    ids = check_modules_on_cuda(mrem["info"], share)
    assert len({i[0] for i in ids}) == (k if share == 1.0 else 1), ids
    assert mrem["info"]["modules_stats"][-1]["steps"] == 20 and 0 <= mrem["row"]["value"] <= 100


def test_rtn_packed_export_is_evaluated_on_cuda_like_on_the_cpu(ray_session, mlflow_uri, tiny_teacher,
                                                                 tiny_run_cfg):
    cfg = tiny_run_cfg("experiment=gpu-rtn", "rtn.quant=[w4a8]", "rtn.calib_samples=64")
    outcomes = run_kinds(cfg, ("evaluate", "rtn"), tiny_teacher)
    rtn, fp = outcomes["rtn/sst2/w4a8"], outcomes["evaluate/sst2/checkpoint"]
    assert rtn["info"]["eval"]["device"] == "cuda" and fp["info"]["device"] == "cuda"
    assert 0 < rtn["info"]["packed_bytes"] < rtn["info"]["fp_bytes"]
    packed = checkpoints.load(rtn["checkpoint"])
    on_cpu = evaluate_model(packed.model, packed.tokenizer, "sst2", cfg.data, cfg.evaluate, device="cpu")
    on_gpu = rtn["info"]["eval"]["metrics"]["accuracy"]
    assert abs(on_cpu.metrics["accuracy"] - on_gpu) <= 0.05  # activation rounding may flip a few near-ties


def test_mrem_p_on_a_causal_lm_shares_one_gpu(ray_session, mlflow_uri, tmp_path, cache_dir):
    cfg = load_config(None, ["model=tiny-llama", "tasks=[wikitext2]", f"output_dir={tmp_path / 'out'}",
                             "experiment=gpu-lm", "data.max_length=32", "data.eval_examples=8",
                             f"data.cache_dir={cache_dir}", "evaluate.batch_size=4", "mrem.quant=[w4g16]",
                             "mrem.use_gpu=true", "mrem.gpus_per_actor=0.5", "mrem.steps=6", "mrem.batch_size=4",
                             "mrem.calib_samples=16", "mrem.calib_batch_size=8", "mrem.shard_size=8",
                             "mrem.eval_samples=8", "mrem.checkpoint_every=3", "mrem.log_every=3"])
    outcomes = run_kinds(cfg, ("finetune", "calibrate", "mrem"))
    info = outcomes["mrem/wikitext2/w4g16a16-parallel"]["info"]
    assert info["modules"] == 2 and [s["layers"] for s in info["modules_stats"]] == [[0, 2], [2, 4]]
    ids = check_modules_on_cuda(info, 0.5)
    assert ids[0] == ids[1]
    assert math.isfinite(info["eval"]["metrics"]["ppl"]) and info["eval"]["metrics"]["ppl"] > 1
