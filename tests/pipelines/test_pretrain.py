"""Stage `pretrain` (quantized pre-training) and its data: loss goes down under every recipe,
resume is exact, Ray Train and sweep runs log to MLflow, bad recipes fail before work."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import ConfigError, load_config
from pipelines.lm_data import CORPORA, eval_windows, get_batch, prepare_corpus, split_text
from pipelines.pretrain import PretrainRunConfig, build_model, evaluate, run_pretrain_stage, with_recipe
from pipelines.pretrain_sweep import compare, summarize, sweep, train_local
from quant.qtrain import Recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TINY = ["model.preset=tiny-gpt2", "model.block_size=32", "data.vocab_size=300", "data.eval_windows=16",
        "train.steps=30", "train.batch_size=8", "train.lr=5e-3", "train.warmup_steps=3", "train.log_every=10",
        "train.eval_every=10", "train.checkpoint_every=10"]
RECIPES = ["fp", "w8", "w4", "a8", "g8", "gx8", "gw8", "m8v8", "m4", "w8a8g8gw8m8v8"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 100k characters of tinyshakespeare (fast to tokenize) and a shared cache."""
    root = tmp_path_factory.mktemp("lm")
    path = root / "shakes.txt"
    path.write_text(CORPORA["tinyshakespeare"].read_text()[:100_000])
    return str(path), str(root / "cache")


def tiny_cfg(corpus, tmp_path, *extra: str) -> PretrainRunConfig:
    path, cache = corpus
    return load_config(None, TINY + [f"data.corpus={path}", f"data.cache_dir={cache}",
                                     f"output_dir={tmp_path / 'out'}", *extra], cls=PretrainRunConfig)


def test_split_tokenizer_cache_and_batches(corpus):
    path, cache = corpus
    train, val = split_text(open(path).read(), 0.1)
    assert train.endswith("\n") and abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01
    data = prepare_corpus(path, 300, 0.1, cache)
    tok_file = data.tokenizer_dir + "/tokenizer.json"
    mtime = os.path.getmtime(tok_file)
    again = prepare_corpus(path, 300, 0.1, cache)
    assert again == data and os.path.getmtime(tok_file) == mtime  # reused, not retrained
    assert data.vocab_size == 300 and data.load("train").dtype == np.uint16
    assert prepare_corpus(path, 400, 0.1, cache).tokenizer_dir != data.tokenizer_dir  # keyed by vocab size
    ids = data.load("train")
    x, y = get_batch(ids, 4, 16, seed=0, step=7)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, get_batch(ids, 4, 16, seed=0, step=7)[0])  # the position is a function of the step
    assert not torch.equal(x, get_batch(ids, 4, 16, seed=0, step=7, rank=1)[0])  # ranks read different data


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_lowers_the_loss(corpus, tmp_path, recipe):
    cfg = with_recipe(tiny_cfg(corpus, tmp_path), recipe)
    result = train_local(cfg)
    data = prepare_corpus(corpus[0], 300, 0.1, corpus[1])
    untrained = evaluate(build_model(cfg.model, 300, cfg.train.seed), eval_windows(data.load("val"), 32, 16), 8)
    assert result["recipe"] == recipe and result["steps"] == 30 and not result["diverged"]
    assert result["val_loss"] < untrained - 0.5, (result["val_loss"], untrained)
    assert (result["quantized_layers"] == 4 * 4 + 1) == Recipe.parse(recipe).quantizes_linear  # 4 per block + lm_head


def test_resume_continues_the_same_loss_curve_exactly(corpus, tmp_path):
    """Stochastic rounding and dropout draw from the RNG, which the checkpoint restores; the
    batches are a function of the step. So an interrupted run matches an uninterrupted one bit for bit."""
    recipe = "w8a8g8m8v8:grad_output.rounding=stochastic"
    straight = train_local(with_recipe(tiny_cfg(corpus, tmp_path / "a", "train.steps=20"), recipe))
    cfg = with_recipe(tiny_cfg(corpus, tmp_path / "b", "train.steps=20"), recipe)
    first = train_local(cfg, stop_at=10)
    assert first["stopped_at"] == 10 and len(first["history"]["train"]) == 10
    resumed = train_local(cfg)
    assert resumed["history"] == straight["history"]
    assert resumed["val_loss"] == straight["val_loss"]


@pytest.mark.ray
@pytest.mark.slow  # ~35 s on an idle 2-core machine (Ray Train controller and workers), ~75 s under load
def test_ray_train_stage_logs_nested_runs_and_sweep_writes_table(corpus, tmp_path, ray_session, mlflow_uri):
    import mlflow
    from transformers import GPT2LMHeadModel

    cfg = tiny_cfg(corpus, tmp_path, "train.steps=12", "quant.recipe=w8a8g8m8v8", "train.checkpoint_every=6")
    result = run_pretrain_stage(cfg)
    assert result["steps"] == 12 and result["val_loss"] < math.log(300) and result["quantized_layers"] == 17
    model = GPT2LMHeadModel.from_pretrained(result["checkpoint"])  # a plain HF checkpoint (FP master weights)
    assert model.config.vocab_size == 300
    assert json.loads(open(result["checkpoint"] + "/plmq_meta.json").read())["recipe"] == "w8a8g8m8v8"
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("plmq-pretrain").experiment_id])
    stage = next(r for r in runs if r.data.tags.get("plmq.stage") == "pretrain" and "mlflow.parentRunId" in r.data.tags)
    assert stage.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in runs}
    assert len(client.get_metric_history(stage.info.run_id, "train_loss")) == 12  # every step
    assert "val_loss" in stage.data.metrics

    cfg = tiny_cfg(corpus, tmp_path, "train.steps=6", "sweep.recipes=[fp, w4]", "sweep.seeds=[0, 1]",
                   "sweep.max_parallel=2")
    with mlflow.start_run(run_name="sweep-parent") as parent:
        summary = sweep(cfg, parent.info.run_id, mlflow_uri)
    rows = {(r["recipe"], r["seed"]): r for r in summary["rows"]}
    assert sorted(rows) == [("fp", 0), ("fp", 1), ("w4", 0), ("w4", 1)]
    assert rows["fp", 0]["val_loss"] != rows["fp", 1]["val_loss"]  # the seed changes the run
    assert rows["fp", 1]["rel_to_fp"] == 1.0 and 0.8 < rows["w4", 1]["rel_to_fp"] < 1.2
    assert rows["w4", 1]["rel_to_fp"] == rows["w4", 1]["val_loss"] / rows["fp", 1]["val_loss"]  # same-seed FP
    w4 = next(r for r in summary["summary"] if r["recipe"] == "w4")
    assert w4["seeds"] == 2 and w4["gap_mean"] == pytest.approx((rows["w4", 0]["rel_to_fp"] + rows["w4", 1]["rel_to_fp"]) / 2 - 1)
    for name in ("sweep_results.md", "sweep_results.csv", "sweep_results.json", "loss_curves.png"):
        assert (tmp_path / "out" / "sweep" / name).stat().st_size > 0
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((c.data.tags["plmq.recipe"], c.data.tags["plmq.seed"]) for c in children) == [
        ("fp", "0"), ("fp", "1"), ("w4", "0"), ("w4", "1")]
    assert all(c.info.status == "FINISHED" for c in children)


def test_sweep_summary_averages_each_recipe_gap_over_seeds():
    rows = [{"corpus": "c", "recipe": r, "seed": s, "val_loss": v, "val_ppl": math.exp(v), "diverged": d,
             "opt_state_bytes": 8, "step_s": 1.0, "quantized_layers": 1, "steps": 5}
            for r, s, v, d in [("fp", 0, 4.0, False), ("fp", 1, 5.0, False), ("w8", 0, 4.2, False),
                               ("w8", 1, 5.0, False), ("v8", 0, 400.0, True), ("v8", 1, 5.5, False)]]
    summary = {r["recipe"]: r for r in summarize(compare(rows))}
    assert summary["w8"]["seeds"] == 2 and summary["w8"]["gap_mean"] == pytest.approx(0.025)
    assert summary["w8"]["gap_max"] == pytest.approx(0.05) and summary["w8"]["gap_std"] == pytest.approx(0.05 / 2**0.5)
    assert summary["fp"]["gap_mean"] == 0.0 and summary["v8"]["diverged"] == 1


@pytest.mark.parametrize("override, message", [
    ("quant.recipe=w9", "quant.recipe='w9': weight.bits=9 is out of range 2..8"),
    ("quant.recipe=w8x4", "cannot parse 'x4'"),
    ("quant.wieght={bits: 4}", "unknown config key 'quant.wieght'"),
    ("quant.weight={bits: 12}", "quant.weight.bits=12 is out of range"),
    ("quant.weight={granularity: row}", "quant.weight.granularity='row'"),
    ("quant.opt_v={code: log}", "quant.opt_v.code='log'"),
    ("quant.opt_m={bits: 2}", "quant.opt_m.bits=2 is not supported"),
    ("sweep.recipes=[fp, w8, m3]", "sweep.recipes[2]='m3': opt_m.bits=3"),
    ("sweep.seeds=[0, 0]", "sweep.seeds=[0, 0]: expected distinct integers"),
    ("model.n_head=3", "n_embd divisible by n_head"),
])
def test_bad_configs_fail_before_work(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], cls=PretrainRunConfig)
    assert message in str(err.value)


def test_cli_rejects_a_bad_recipe():
    result = CliRunner().invoke(app, ["pretrain", "--recipe", "w8a8:act.bits=16"])
    assert result.exit_code == 2 and "act.bits=16 is out of range" in result.output


def test_config_files_load():
    cfg = load_config(CONFIGS / "pretrain.yaml", cls=PretrainRunConfig)
    assert str(cfg.quant.build()) == "w8a8g8" and cfg.model.n_layer == 4
    sweep_cfg = load_config(CONFIGS / "pretrain_sweep.yaml", cls=PretrainRunConfig)
    assert "fp" in sweep_cfg.sweep.recipes and len(sweep_cfg.sweep.corpora) == 2
