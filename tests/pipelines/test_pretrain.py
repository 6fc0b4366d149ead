"""Quantized pre-training: loss goes down under every recipe (GPT-2 and Llama), resume is exact (train
state read with weights_only), the pretrain stage trains on Ray Train and logs to its MLflow run, the
report stage compares each run with the FP run of its seed, bad recipes and corpora fail before work;
several corpora train the tokenizer and an evaluation corpus is the validation text; Llama widths,
grouped-query attention and checkpoints that load back with identical logits."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from typer.testing import CliRunner

from pipelines import checkpoints
from pipelines.cli import app
from pipelines.config import ConfigError, load_config
from pipelines.lm_data import (
    CORPORA,
    corpus_label,
    eval_windows,
    get_batch,
    load_tokenizer,
    prepare_corpus,
    read_corpus,
    split_text,
)
from pipelines.lm_train import LocalSession, build_model, evaluate, prepare, save_model, train
from pipelines.pretrain_config import ModelSection, PretrainRunConfig, with_recipe
from pipelines.stages import pretrain, pretrain_report
from pipelines.stages.base import Context
from quant.qtrain import Recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TINY = ["model.preset=tiny-gpt2", "model.block_size=32", "data.vocab_size=300", "data.eval_windows=16",
        "train.steps=30", "train.batch_size=8", "train.lr=5e-3", "train.warmup_steps=3", "train.log_every=10",
        "train.eval_every=10", "train.checkpoint_every=10"]
RECIPES = ["fp", "w8", "w4", "a8", "g8", "gx8", "gw8", "m8v8", "m4", "w8a8", "w8a8g8gw8m8v8"]


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
    head, val = split_text(Path(path).read_text(), 0.1)
    assert head.endswith("\n") and abs(len(val) / (len(head) + len(val)) - 0.1) < 0.01
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


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_several_corpora_train_the_tokenizer_and_an_eval_corpus_is_the_validation_text(tmp_path):
    """The training text is the corpora joined by a newline; the tokenizer never sees the evaluation text
    (which is full of 'z', a letter the training text lacks); the validation ids are the whole eval text."""
    a = _write(tmp_path / "a.txt", [f"the cat sat on the mat {i % 7}" for i in range(400)])
    b = _write(tmp_path / "b.txt", [f"a bird in the hand is worth two in the bush {i % 5}" for i in range(400)])
    e = _write(tmp_path / "e.txt", [f"zyzzyva buzz fizz quizzical {i}" for i in range(300)])
    cache = tmp_path / "cache"
    data = prepare_corpus(f"{a}+{b}", 300, cache_dir=cache, eval_corpus=e)
    tok = load_tokenizer(data.tokenizer_dir)
    joined = Path(a).read_text() + "\n" + Path(b).read_text()
    assert tok.decode(data.load("train").tolist()) == joined
    assert tok.decode(data.load("val").tolist()) == Path(e).read_text()
    merges = [t for t in tok.get_vocab() if len(t) > 1 and t != "<|endoftext|>"]
    assert len(merges) > 20 and not any("z" in t for t in merges)
    leaky = load_tokenizer(prepare_corpus(f"{a}+{b}+{e}", 300, 0.1, cache).tokenizer_dir)
    assert any("zz" in t for t in leaky.get_vocab())  # a tokenizer that saw the eval text would learn its 'zz'
    meta = json.loads((Path(data.tokenizer_dir).parent / "meta.json").read_text())
    assert meta["eval_corpus"] == e and meta["train_chars"] == len(joined)
    cfg = load_config(None, [f"data.corpus={a}+{b}", f"data.eval_corpus={e}", "data.vocab_size=300",
                             f"data.cache_dir={cache}"], cls=PretrainRunConfig)
    assert prepare(cfg) == data  # the config's eval_corpus reaches the data, and the cache is reused
    # the cache key follows everything that changes the tokens
    e2 = _write(tmp_path / "e2.txt", [f"zyzzyva buzz fizz quizzical {i + 1}" for i in range(300)])
    others = [prepare_corpus(f"{b}+{a}", 300, cache_dir=cache, eval_corpus=e),
              prepare_corpus(f"{a}+{b}", 300, cache_dir=cache, eval_corpus=e2),
              prepare_corpus(f"{a}+{b}", 300, 0.1, cache),
              prepare_corpus(f"{a}+{b}", 400, cache_dir=cache, eval_corpus=e)]
    assert len({d.tokenizer_dir for d in [data, *others]}) == 5
    assert load_tokenizer(others[2].tokenizer_dir).decode(others[2].load("val").tolist()) == \
        split_text(joined, 0.1)[1]  # without eval_corpus: the tail of the joined text


def test_bundled_corpora_join_with_a_newline():
    ts, wt = CORPORA["tinyshakespeare"].read_text(), CORPORA["wikitext2"].read_text()
    assert read_corpus("tinyshakespeare+wikitext2") == ts + "\n" + wt
    assert corpus_label("tinyshakespeare+wikitext2") == "tinyshakespeare+wikitext2"
    assert corpus_label("/data/a.txt+wikitext2-test") == "a+wikitext2-test"


@pytest.mark.parametrize("overrides, message", [
    (["data.corpus=tinyshakespeare+nope"], "data.corpus='nope' is neither a bundled corpus"),
    (["data.corpus=tinyshakespeare++wikitext2"], "empty corpus name"),
    (["data.eval_corpus=nope"], "data.eval_corpus='nope' is neither a bundled corpus"),
    (["data.corpus=tinyshakespeare+wikitext2-test", "data.eval_corpus=wikitext2-test"], "is also in data.corpus"),
    (["sweep.recipes=[fp]", "sweep.corpora=[tinyshakespeare, nope.txt]"], "sweep.corpora[1]='nope.txt'"),
])
def test_unknown_corpora_fail_when_planned(overrides, message):
    cfg = load_config(None, overrides, cls=PretrainRunConfig)
    with pytest.raises(ConfigError, match=re.escape(message)):
        pretrain.plan_sweep(cfg) if cfg.sweep.recipes else pretrain.plan(cfg)
    result = CliRunner().invoke(app, ["pretrain-sweep" if cfg.sweep.recipes else "pretrain",
                                      *[x for o in overrides for x in ("--set", o)]])
    assert result.exit_code == 2 and message in result.output  # before any work, no traceback


def llama_param_count(vocab: int, d: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool) -> int:
    kv = d // heads * kv_heads
    block = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    return vocab * d * (1 if tied else 2) + layers * block + d


def test_llama_builds_with_the_given_widths_and_grouped_query_attention():
    m = ModelSection(arch="llama", n_layer=3, n_embd=96, n_head=6, n_kv_head=2, block_size=64)
    model = build_model(m, 500, seed=0)
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (96, 3, 6, 2)
    assert c.intermediate_size == 256 and c.max_position_embeddings == 64 and c.vocab_size == 500
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (96, 32, 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == llama_param_count(500, 96, 3, 6, 2, 256, tied=True)
    untied = build_model(ModelSection(arch="llama", n_layer=2, n_embd=64, n_head=4, tie_embeddings=False,
                                      intermediate_size=100), 500, seed=0)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.config.num_key_value_heads == 4  # n_kv_head None: one per query head
    assert sum(p.numel() for p in untied.parameters()) == llama_param_count(500, 64, 2, 4, 4, 100, tied=False)
    # the Llama rule for the MLP width: 8/3 * n_embd rounded up to a multiple of 64; GPT-2 keeps 4 * n_embd
    assert [ModelSection(arch="llama", n_embd=d).ffn_size for d in (96, 128, 256, 384)] == [256, 384, 704, 1024]
    gpt2 = build_model(ModelSection(n_layer=1, n_embd=64, n_head=4), 500, seed=0)
    assert isinstance(gpt2, GPT2LMHeadModel) and gpt2.transformer.h[0].mlp.c_fc.weight.shape == (64, 256)
    same, other = build_model(m, 500, seed=0), build_model(m, 500, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters()))  # fixed by the seed
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


def test_a_preset_names_its_architecture():
    cfg = load_config(None, ["model.preset=tiny-llama"], cls=PretrainRunConfig)
    assert cfg.model.arch == "llama" and isinstance(build_model(cfg.model, 300, 0), LlamaForCausalLM)


@pytest.mark.parametrize("recipe", ["fp", "w8a8g8gw8m8v8"])
def test_a_llama_checkpoint_loads_back_with_identical_logits(corpus, tmp_path, recipe):
    cfg = with_recipe(tiny_cfg(corpus, tmp_path, "model.preset=null", "model.arch=llama", "model.n_layer=2",
                               "model.n_embd=32", "model.n_kv_head=2", "train.steps=3"), recipe)
    data = prepare(cfg)
    result, run = train(cfg, data, LocalSession(tmp_path / "ckpt"))
    save_model(run.inner, data, result, cfg, tmp_path / "model")
    loaded = checkpoints.load(tmp_path / "model")
    assert type(loaded.model) is LlamaForCausalLM and loaded.meta["recipe"] == recipe
    assert loaded.model.config.num_key_value_heads == 2
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied
    master = build_model(cfg.model, data.vocab_size, seed=99).eval()  # a plain model holding the trained weights
    master.load_state_dict(run.inner.state_dict())
    assert not torch.equal(master.model.embed_tokens.weight, build_model(cfg.model, data.vocab_size, 0).model
                           .embed_tokens.weight)  # it did train
    ids = torch.from_numpy(np.asarray(data.load("val")[:33], dtype=np.int64)).view(1, -1)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
        assert torch.equal(logits, master(input_ids=ids).logits)
        if recipe == "fp":
            assert torch.equal(logits, run.inner.eval()(input_ids=ids).logits)


def train_local(cfg: PretrainRunConfig, ckpt_dir: Path, stop_at: int | None = None) -> dict:
    return train(cfg, prepare(cfg), LocalSession(ckpt_dir, stop_at=stop_at))[0]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("preset, linears", [("tiny-gpt2", 4), ("tiny-llama", 7)])  # Linear layers per block
def test_every_recipe_lowers_the_loss(corpus, tmp_path, recipe, preset, linears):
    cfg = with_recipe(tiny_cfg(corpus, tmp_path, f"model.preset={preset}"), recipe)
    result = train_local(cfg, tmp_path / "ckpt")
    data = prepare_corpus(corpus[0], 300, 0.1, corpus[1])
    untrained = evaluate(build_model(cfg.model, 300, cfg.train.seed), eval_windows(data.load("val"), 32, 16), 8)
    assert result["recipe"] == recipe and result["steps"] == 30 and not result["diverged"]
    assert result["val_loss"] < untrained - 0.5, (result["val_loss"], untrained)
    assert (result["quantized_layers"] == 4 * linears + 1) == Recipe.parse(recipe).quantizes_linear  # + lm_head


def test_resume_continues_the_same_loss_curve_exactly(corpus, tmp_path):
    """Stochastic rounding and dropout draw from the RNG, which the checkpoint restores; the
    batches are a function of the step. So an interrupted run matches an uninterrupted one bit for bit."""
    cfg = with_recipe(tiny_cfg(corpus, tmp_path, "train.steps=20"), "w8a8g8m8v8:grad_output.rounding=stochastic")
    straight = train_local(cfg, tmp_path / "a")
    first = train_local(cfg, tmp_path / "b", stop_at=10)
    assert first["stopped_at"] == 10 and len(first["history"]["train"]) == 10
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)  # no pickled objects
    assert state["step"] == 10 and state["optimizer"]["state"]
    resumed = train_local(cfg, tmp_path / "b")
    assert resumed["history"] == straight["history"]
    assert resumed["val_loss"] == straight["val_loss"]


def test_plan_and_fragment():
    cfg = load_config(None, ["quant.recipe=w8", "quant.weight={granularity: group, group_size: 32}",
                             "sweep.recipes=[fp, w4]", "sweep.seeds=[0, 1]",
                             "sweep.corpora=[tinyshakespeare, wikitext2]"], cls=PretrainRunConfig)
    (single,) = pretrain.plan(cfg)
    assert pretrain.job_config(cfg, single).quant.build() == cfg.quant.build()  # per-kind settings kept in the name
    assert single.task == "tinyshakespeare" and single.method == "0"
    stages = pretrain.plan_sweep(cfg)
    assert [(s.task, s.quant, s.method) for s in stages[:4]] == [
        ("tinyshakespeare", "fp", "0"), ("tinyshakespeare", "w4", "0"), ("tinyshakespeare", "fp", "1"),
        ("tinyshakespeare", "w4", "1")]
    assert len(stages) == 8 and len({s.name for s in stages}) == 8
    (report,) = pretrain_report.plan(cfg)
    assert report.deps == tuple(s.name for s in stages)
    frags = [json.dumps(pretrain.fragment(cfg, s), sort_keys=True) for s in stages]
    assert len(set(frags)) == 8  # recipe, corpus and seed all change the result
    quiet = load_config(None, ["train.log_every=3", "train.checkpoint_every=7", "data.cache_dir=/x"],
                        cls=PretrainRunConfig)
    base = load_config(None, [], cls=PretrainRunConfig)
    assert pretrain.fragment(quiet, pretrain.plan(quiet)[0]) == pretrain.fragment(base, pretrain.plan(base)[0])
    lr = load_config(None, ["train.lr=2e-3"], cls=PretrainRunConfig)
    assert pretrain.fragment(lr, pretrain.plan(lr)[0]) != pretrain.fragment(base, pretrain.plan(base)[0])
    with pytest.raises(ConfigError, match="sweep.recipes is empty"):
        pretrain_report.plan(base)


@pytest.mark.ray
@pytest.mark.slow  # Ray Train controller and workers: ~40 s on an idle 2-core machine
def test_stage_trains_on_ray_train_logs_every_step_and_resumes_by_key(corpus, tmp_path, ray_session, mlflow_uri):
    import mlflow
    from transformers import AutoTokenizer

    cfg = tiny_cfg(corpus, tmp_path, "train.steps=12", "quant.recipe=w8a8g8m8v8", "train.checkpoint_every=6")
    (stage,) = pretrain.plan(cfg)
    with mlflow.start_run() as active:
        ctx = Context(root=tmp_path / "out", key="k1", run_id=active.info.run_id, tracking_uri=mlflow_uri)
        res = pretrain.run(cfg, stage, {}, ctx)
    result = res.info
    assert result["steps"] == 12 and result["val_loss"] < math.log(300) and result["quantized_layers"] == 17
    assert res.metrics["val_loss"] == result["val_loss"] and res.outputs.endswith("-k1")
    model = GPT2LMHeadModel.from_pretrained(res.checkpoint)  # a plain HF checkpoint (FP master weights)
    assert model.config.vocab_size == 300 and len(AutoTokenizer.from_pretrained(res.checkpoint)) == 300
    meta = json.loads((Path(res.checkpoint) / "plmq_meta.json").read_text())
    assert meta["recipe"] == "w8a8g8m8v8" and meta["format"] == "fp"
    client = mlflow.MlflowClient(mlflow_uri)
    assert len(client.get_metric_history(active.info.run_id, "train_loss")) == 12  # every step, from the worker
    assert len(client.get_metric_history(active.info.run_id, "val_loss")) == 2
    (tmp_path / "out" / res.outputs / "model" / "result.json").unlink()  # the stage's output is gone, its run is not
    again = pretrain.run(cfg, stage, {}, Context(root=tmp_path / "out", key="k1"))
    assert again.info["step_s"] == result["step_s"]  # the Ray Train run of key k1 re-reported its final model


@pytest.mark.ray
@pytest.mark.slow  # the driver, a Ray task and Ray Train workers
def test_plmq_pretrain_trains_a_llama_and_saves_a_checkpoint_that_loads(corpus, tmp_path, ray_session, mlflow_uri):
    path, cache = corpus
    sets = [*TINY, "model.preset=tiny-llama", "train.steps=3", f"data.cache_dir={cache}", "experiment=llama"]
    args = ["pretrain", "--corpus", path, "--recipe", "w8a8", "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args + [x for kv in sets for x in ("--set", kv)])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "out" / "pretrain").glob("*/*/model")
    info = json.loads((folder / "result.json").read_text())
    assert info["steps"] == 3 and info["recipe"] == "w8a8" and info["quantized_layers"] == 4 * 7 + 1
    loaded = checkpoints.load(folder)
    assert type(loaded.model) is LlamaForCausalLM and loaded.meta["recipe"] == "w8a8"
    assert loaded.model.config.vocab_size == 300 and len(loaded.tokenizer) == 300
    ids = loaded.tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def _outcome(recipe: str, seed: int, val: float, diverged: bool = False) -> dict:
    info = {"corpus": "c", "recipe": recipe, "seed": seed, "val_loss": val, "val_ppl": math.exp(val),
            "diverged": diverged, "opt_state_bytes": 8 if recipe == "fp" else 2, "step_s": 1.0,
            "quantized_layers": 1, "steps": 5, "history": {"train": [(1, val + 1), (5, val)], "val": [(5, val)]}}
    return {"info": info}


def test_report_stage_compares_each_run_with_the_fp_run_of_its_seed(tmp_path):
    cfg = load_config(None, ["sweep.recipes=[fp, w8, v8]", "sweep.seeds=[0, 1]"], cls=PretrainRunConfig)
    (stage,) = pretrain_report.plan(cfg)
    values = {("fp", 0): 4.0, ("fp", 1): 5.0, ("w8", 0): 4.2, ("w8", 1): 5.0, ("v8", 0): 400.0, ("v8", 1): 5.5}
    upstream = {s.name: _outcome(s.quant, int(s.method), values[s.quant, int(s.method)], s.quant == "v8" and
                                 s.method == "0") for s in pretrain.plan_sweep(cfg)}
    res = pretrain_report.run(cfg, stage, upstream, Context(root=tmp_path, key="k1"))
    rows = {(r["recipe"], r["seed"]): r for r in res.info["rows"]}
    assert rows["w8", 0]["rel_to_fp"] == pytest.approx(4.2 / 4.0) and rows["w8", 1]["rel_to_fp"] == 1.0
    assert rows["w8", 0]["opt_bytes_vs_fp"] == 0.25
    summary = {r["recipe"]: r for r in res.info["summary"]}
    assert summary["w8"]["seeds"] == 2 and summary["w8"]["gap_mean"] == pytest.approx(0.025)
    assert summary["w8"]["gap_max"] == pytest.approx(0.05) and summary["w8"]["gap_std"] == pytest.approx(0.05 / 2**0.5)
    assert summary["fp"]["gap_mean"] == 0.0 and summary["v8"]["diverged"] == 1
    out = tmp_path / res.outputs
    for name in ("sweep_results.md", "sweep_results.csv", "sweep_results.json", "loss_curves.png"):
        assert (out / name).stat().st_size > 0
    assert "Mean over seeds" in (out / "sweep_results.md").read_text()
    assert len(json.loads((out / "sweep_results.json").read_text())["runs"]) == 6


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
    ("model.arch=bert", "model.arch='bert': use one of gpt2, llama"),
    ("model.preset=tiny-bert", "model.preset='tiny-bert': use tiny-gpt2, tiny-llama or null"),
    ("model.arch=llama&model.preset=tiny-gpt2", "model.preset=tiny-gpt2 is a gpt2 model"),
    ("model.arch=llama&model.n_kv_head=3", "model.n_kv_head=3: must divide model.n_head=4 (one of 1, 2, 4;"),
    ("model.arch=llama&model.n_kv_head=0", "model.n_kv_head=0: must divide model.n_head=4"),
    ("model.n_kv_head=2", "model.n_kv_head and model.tie_embeddings=false need model.arch=llama"),
    ("model.tie_embeddings=false", "model.n_kv_head and model.tie_embeddings=false need model.arch=llama"),
    ("model.arch=llama&model.n_embd=36&model.n_head=4", "head size n_embd / n_head = 9 must be even"),
    ("model.arch=llama&model.intermediate_size=0", "model.intermediate_size=0: must be >= 1"),
])
def test_bad_configs_fail_before_work(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split("&"), cls=PretrainRunConfig)
    assert message in str(err.value)


def test_cli_rejects_a_bad_recipe():
    result = CliRunner().invoke(app, ["pretrain", "--recipe", "w8a8:act.bits=16"])
    assert result.exit_code == 2 and "act.bits=16 is out of range" in result.output


def test_config_files_load():
    cfg = load_config(CONFIGS / "pretrain.yaml", cls=PretrainRunConfig)
    assert str(cfg.quant.build()) == "w8a8g8" and cfg.model.n_layer == 4
    sweep_cfg = load_config(CONFIGS / "pretrain_sweep.yaml", cls=PretrainRunConfig)
    assert "fp" in sweep_cfg.sweep.recipes and len(sweep_cfg.sweep.corpora) == 2
    decoder = load_config(CONFIGS / "lm-decoder.yaml", cls=PretrainRunConfig)
    (stage,) = pretrain.plan(decoder)  # its corpora exist
    assert stage.task == "tinyshakespeare+wikitext2" and decoder.data.eval_corpus == "wikitext2-test"
    assert str(decoder.quant.build()) == "fp" and decoder.train.cpus_per_worker == 2
    model = build_model(decoder.model, decoder.data.vocab_size, decoder.train.seed)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_key_value_heads < model.config.num_attention_heads
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 30e6
