"""On a CUDA GPU: Ray Train fine-tunes a classifier and pre-trains a tiny Llama on the GPU (the workers'
parameters on cuda, recorded by the stages), and the FP reference is evaluated there. Skipped without CUDA."""
from __future__ import annotations

import math

import pytest
import torch

from pipelines import checkpoints
from pipelines.config import load_config
from pipelines.lm_data import CORPORA
from pipelines.pretrain_config import PretrainRunConfig
from pipelines.stages import pretrain
from pipelines.stages.base import Context

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")]


def test_finetune_trains_on_cuda_and_evaluates_there(ray_session, mlflow_uri, tiny_run_cfg):
    from pipelines.runner import run

    cfg = tiny_run_cfg("experiment=gpu-finetune", "finetune.use_gpu=true", "finetune.epochs=1",
                       "finetune.batch_size=16", "finetune.lr=2e-3", "finetune.log_every=10")
    summary = run(cfg)
    ft = summary.outcomes["finetune/sst2"]
    assert ft["info"]["device"].startswith("cuda"), ft["info"]  # the Ray Train worker's parameters
    assert ft["resources"]["gpus"] == 1 and ft["info"]["examples_per_s"] > 0
    meta = checkpoints.read_meta(ft["checkpoint"])
    assert meta["device"] == ft["info"]["device"] and meta["peak_cuda_mb"] > 0
    fp = summary.outcomes["evaluate/sst2/fp"]
    assert fp["info"]["device"] == "cuda" and 0 <= fp["row"]["value"] <= 100


def test_pretrain_trains_a_tiny_llama_on_cuda(ray_session, mlflow_uri, tmp_path):
    corpus = tmp_path / "shakes.txt"
    corpus.write_text(CORPORA["tinyshakespeare"].read_text()[:50_000])
    cfg = load_config(None, ["model.preset=tiny-llama", "model.block_size=32", "data.vocab_size=300",
                             f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_windows=8",
                             "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
                             "train.eval_every=100", "train.checkpoint_every=100", "train.use_gpu=true",
                             "quant.recipe=w8a8", f"output_dir={tmp_path / 'out'}"], cls=PretrainRunConfig)
    (stage,) = pretrain.plan(cfg)
    res = pretrain.run(cfg, stage, {}, Context(root=tmp_path / "out", key="gpu"))
    assert res.info["device"].startswith("cuda") and res.resources["gpus"] == 1
    assert res.info["steps"] == 3 and math.isfinite(res.info["val_loss"])
    loaded = checkpoints.load(res.checkpoint)  # the FP master weights, readable on the CPU
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.meta["recipe"] == "w8a8"
