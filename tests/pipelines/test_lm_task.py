"""Language-modelling tasks: lookup, texts and token caches, windows, perplexity, calibration windows,
the checks before work, the report, and a run of finetune (adopt) -> evaluate -> rtn on tiny-llama."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from pipelines import checkpoints, lm_eval, models
from pipelines.config import DataConfig, EvaluateConfig, load_config
from pipelines.errors import ConfigError, DataError
from pipelines.evaluation import (
    calibration_batches,
    check_inputs,
    evaluate_model,
    majority_floor,
    report_row,
)
from pipelines.lm_data import CORPORA
from pipelines.report import COLUMNS, comparison_rows, report
from pipelines.stages import plan_kinds
from pipelines.tasks import GlueTask, LMTask, TextSource, check_task

WORDS = "the cat sat on a mat while dogs ran past and birds sang over green hills".split()


def write_text(path: Path, lines: int, seed: int = 0) -> Path:
    """A UTF-8 file of `lines` lines of random words."""
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(lines)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny-llama")


@pytest.fixture
def lm_data(cache_dir):
    return DataConfig(max_length=32, eval_examples=6, cache_dir=cache_dir)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return models.load_causal_lm("tiny-llama").eval()


class ConstantLM(torch.nn.Module):
    """Next-token logits that do not depend on the input: `log_probs` at every position."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1))


# --- lookup ---------------------------------------------------------------------------------------------

def test_one_lookup_returns_either_kind():
    assert isinstance(check_task("sst2"), GlueTask) and check_task("sst2").kind == "glue"
    wiki = check_task("wikitext2")
    assert isinstance(wiki, LMTask) and wiki.kind == "lm" and wiki.main_metric == "ppl"
    assert wiki.calibration == TextSource("corpus", "wikitext2")
    assert wiki.evaluation == TextSource("corpus", "wikitext2-test")
    shakespeare = check_task("tinyshakespeare")
    assert (shakespeare.calibration.part, shakespeare.evaluation.part) == ("head", "tail")
    hub = check_task("hub:wikitext:wikitext-2-raw-v1")
    assert hub.calibration == TextSource("hub", "wikitext", config="wikitext-2-raw-v1", split="train")
    assert hub.evaluation.split == "test" and hub.slug == "hub-wikitext_wikitext-2-raw-v1"


def test_unknown_task_names_both_kinds():
    with pytest.raises(ConfigError, match=r"unknown task 'wikitext3'; GLUE tasks: cola, sst2.*; "
                                          r"language-modelling tasks: wikitext2, tinyshakespeare, text:<file>, hub:"):
        check_task("wikitext3")
    with pytest.raises(ConfigError, match="unknown task"):
        load_config(None, ["tasks=[sst2,wikitext3]"])


def test_text_task_needs_an_existing_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"task text:.*missing.txt: no such file"):
        check_task(f"text:{tmp_path / 'missing.txt'}")
    write_text(tmp_path / "corpus.txt", 10)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model=tiny-llama", "tasks=[text:corpus.txt]"])
    assert cfg.tasks == [f"text:{tmp_path / 'corpus.txt'}"]  # absolute: stages may run in another folder
    assert check_task(cfg.tasks[0]).slug.startswith("text-corpus-") and "/" not in check_task(cfg.tasks[0]).slug


def test_text_task_splits_90_10_at_a_line(tmp_path):
    path = write_text(tmp_path / "c.txt", 200)
    task = f"text:{path}"
    spec = check_task(task)
    head, tail = lm_eval.read_text(task, spec.calibration), lm_eval.read_text(task, spec.evaluation)
    text = path.read_text()
    assert head + tail == text and head.endswith("\n")
    assert 0.09 < len(tail) / len(text) < 0.11


def test_hub_task_offline_fails_before_work_naming_the_task(monkeypatch, cache_dir):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = load_config(None, ["model=tiny-llama", "tasks=[hub:wikitext:wikitext-2-raw-v1]", "data.max_length=32",
                             f"data.cache_dir={cache_dir}"])
    with pytest.raises(DataError, match=r"task hub:wikitext:wikitext-2-raw-v1 reads the Hugging Face dataset "
                                        r"'wikitext', but HF_\w+_OFFLINE is set"):
        check_inputs(cfg, cfg.model)


def test_hub_task_that_cannot_be_loaded_says_which(monkeypatch):
    for flag in lm_eval.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(lm_eval.datasets, "load_dataset", unreachable)
    task = "hub:someone/corpus"
    with pytest.raises(DataError, match=r"task hub:someone/corpus: cannot load split 'train' of the Hugging Face "
                                        r"dataset 'someone/corpus': Couldn't reach the Hub"):
        lm_eval.read_text(task, check_task(task).calibration)


def test_hub_task_joins_the_text_column(monkeypatch):
    import datasets

    for flag in lm_eval.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    splits = {"train": ["a b", "c"], "test": ["d"]}
    monkeypatch.setattr(lm_eval.datasets, "load_dataset",
                        lambda name, config, split: datasets.Dataset.from_dict({"text": splits[split]}))
    spec = check_task("hub:x")
    assert lm_eval.read_text("hub:x", spec.calibration) == "a b\n\nc"
    assert lm_eval.read_text("hub:x", spec.evaluation) == "d"


def test_prequant_refuses_lm_tasks_and_mrem_takes_them():
    with pytest.raises(ConfigError, match=r"prequant.quant=\['w4'\]: PreQuant runs on GLUE tasks only, "
                                          r"not on the language-modelling task\(s\) wikitext2"):
        load_config(None, ["tasks=[sst2,wikitext2]", "prequant.quant=[w4]"])
    cfg = load_config(None, ["tasks=[sst2,wikitext2]", "rtn.quant=[w8a8]", "mrem.quant=[w4a8]"])
    assert cfg.tasks == ["sst2", "wikitext2"] and cfg.mrem.quant == ["w4a8"]


# --- tokens and windows -----------------------------------------------------------------------------------

def test_tokens_are_the_model_tokenizer_on_the_whole_text_and_cached(tok, tmp_path, cache_dir):
    path = write_text(tmp_path / "c.txt", 50)
    task, data = f"text:{path}", DataConfig(cache_dir=cache_dir)
    src = check_task(task).evaluation
    ids = lm_eval.token_ids(task, src, tok, data)
    assert ids.tolist() == tok(lm_eval.read_text(task, src))["input_ids"]
    cached = sorted((Path(cache_dir) / "lm").glob("*.npy"))
    assert len(cached) == 1
    assert lm_eval.token_ids(task, src, tok, data).tolist() == ids.tolist()
    assert sorted((Path(cache_dir) / "lm").glob("*.npy")) == cached  # read back, not written again
    write_text(path, 50, seed=1)  # new text: a new cache entry with its own tokens
    assert lm_eval.token_ids(task, src, tok, data).tolist() != ids.tolist()
    assert len(list((Path(cache_dir) / "lm").glob("*.npy"))) == 2


def test_a_saved_tokenizer_keeps_its_identity(tok, tmp_path):
    checkpoints.save(tiny_llama(), tok, tmp_path / "fp", {"task": "wikitext2"}, "fp")
    assert lm_eval.tokenizer_identity(checkpoints.load(tmp_path / "fp").tokenizer) == lm_eval.tokenizer_identity(tok)
    assert lm_eval.tokenizer_identity(models.load_tokenizer("minilm-l6")) == lm_eval.tokenizer_identity(tok)


def test_eval_windows_do_not_overlap_and_cover_the_text():
    ids = np.arange(1000)
    windows = lm_eval.eval_windows(ids, 64)
    assert windows.shape == (15, 64) and windows.dtype == torch.int64
    assert windows.flatten().tolist() == list(range(960))  # in order, each token once; 40 < 64 left over
    assert lm_eval.eval_windows(ids, 64, max_windows=3).tolist() == windows[:3].tolist()
    assert lm_eval.eval_windows(ids, 64, max_windows=100).shape == (15, 64)


# --- perplexity ---------------------------------------------------------------------------------------------

def test_perplexity_is_exp_of_transformers_mean_loss_over_windows(tok, lm_data):
    model = tiny_llama(seed=1)
    result = evaluate_model(model, tok, "wikitext2", lm_data, EvaluateConfig(batch_size=4))
    ids = tok(CORPORA["wikitext2-test"].read_text(encoding="utf-8"))["input_ids"]
    losses = []
    with torch.no_grad():
        for i in range(6):
            window = torch.tensor([ids[i * 32:(i + 1) * 32]])
            losses.append(model(input_ids=window, labels=window).loss.item())
    assert result.metrics["ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    assert result.metrics["nll"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert result.main_metric == "ppl" and result.main == result.metrics["ppl"] and result.examples == 6
    assert result.extra["context"] == 32 and result.extra["windows"] == 6 and result.extra["tokens"] == 6 * 31
    assert result.extra["text_tokens"] == len(ids)


def test_uniform_logits_score_the_vocabulary_size_and_a_better_model_scores_lower(tok, lm_data):
    vocab = len(tok)
    uniform = evaluate_model(ConstantLM(torch.zeros(vocab)), tok, "wikitext2", lm_data, EvaluateConfig())
    assert uniform.metrics["ppl"] == pytest.approx(vocab, rel=1e-6)

    # A unigram model fit on the calibration text: its perplexity is exp(cross-entropy) of the predicted tokens.
    calib = lm_eval.token_ids("wikitext2", check_task("wikitext2").calibration, tok, lm_data)
    log_p = torch.log_softmax(torch.log(torch.bincount(torch.from_numpy(calib).long(), minlength=vocab) + 1.0), -1)
    unigram = evaluate_model(ConstantLM(log_p), tok, "wikitext2", lm_data, EvaluateConfig(batch_size=2))
    targets = lm_eval.eval_windows(lm_eval.token_ids("wikitext2", check_task("wikitext2").evaluation, tok, lm_data),
                                   32, 6)[:, 1:]
    assert unigram.metrics["ppl"] == pytest.approx(math.exp(-log_p[targets].double().mean().item()), rel=1e-6)
    assert unigram.metrics["ppl"] < vocab / 10


def test_evaluation_text_shorter_than_a_window_is_an_error(tok, tmp_path, cache_dir):
    path = tmp_path / "short.txt"
    path.write_text("one line\n" * 9 + "the last line\n")
    data = DataConfig(max_length=64, cache_dir=cache_dir)
    with pytest.raises(ConfigError, match=r"evaluation text has \d+ tokens, fewer than one window of "
                                          r"data.max_length=64: lower data.max_length"):
        evaluate_model(ConstantLM(torch.zeros(len(tok))), tok, f"text:{path}", data, EvaluateConfig())


# --- calibration ----------------------------------------------------------------------------------------

def test_calibration_windows_are_slices_of_the_text_reproducible_by_seed(tok, tmp_path, cache_dir):
    task = f"text:{write_text(tmp_path / 'c.txt', 100)}"
    data = DataConfig(max_length=16, cache_dir=cache_dir)
    windows = lm_eval.calibration_windows(task, tok, data, 12, seed=3)
    assert windows.shape == (12, 16) and windows.dtype == torch.int64
    assert torch.equal(windows, lm_eval.calibration_windows(task, tok, data, 12, seed=3))
    assert not torch.equal(windows, lm_eval.calibration_windows(task, tok, data, 12, seed=4))
    stream = lm_eval.token_ids(task, check_task(task).calibration, tok, data).tolist()
    slices = {tuple(stream[s:s + 16]) for s in range(len(stream) - 16)}
    assert all(tuple(w) in slices for w in windows.tolist())
    batches = list(calibration_batches(task, tok, data, 12, 5, seed=3))
    assert [b["input_ids"].shape for b in batches] == [(5, 16), (5, 16), (2, 16)]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), windows)
    assert all(b["attention_mask"].eq(1).all() for b in batches)


def test_calibration_text_shorter_than_a_window_is_an_error_and_overlap_a_warning(tok, tmp_path, cache_dir):
    task = f"text:{write_text(tmp_path / 'c.txt', 40)}"
    tokens = len(lm_eval.token_ids(task, check_task(task).calibration, tok, DataConfig(cache_dir=cache_dir)))
    short = DataConfig(max_length=tokens, cache_dir=cache_dir)
    with pytest.raises(ConfigError, match=rf"calibration text has {tokens} tokens, fewer than one window of "
                                          rf"data.max_length={tokens} plus one"):
        lm_eval.calibration_windows(task, tok, short, 1)
    assert lm_eval.calibration_windows(task, tok, DataConfig(max_length=tokens - 1, cache_dir=cache_dir), 2).shape \
        == (2, tokens - 1)
    warning = lm_eval.check_calibration_text(task, tokens, 16, tokens)
    assert f"rtn.calib_samples={tokens} windows of data.max_length=16 tokens need {16 * tokens}" in warning
    assert lm_eval.check_calibration_text(task, tokens, 16, tokens // 16) is None


# --- checks before work -----------------------------------------------------------------------------------

def lm_cfg(cache_dir, *overrides):
    return load_config(None, ["model=tiny-llama", "tasks=[wikitext2]", "data.max_length=32",
                              f"data.cache_dir={cache_dir}", *overrides])


def test_bad_lm_settings_fail_before_work_naming_the_setting(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="data.max_length=256: model tiny-llama has 128 positions"):
        check_inputs(lm_cfg(cache_dir, "data.max_length=256"), "tiny-llama")
    with pytest.raises(ConfigError, match=r"rtn.quant\[1\]='w4g128': groups of 128 weights do not divide the input "
                                          r"width 32 of model.layers.0.self_attn.q_proj; .* widths \[32, 64\]"):
        check_inputs(lm_cfg(cache_dir, "rtn.quant=[w4g16,w4g128]"), "tiny-llama")
    with pytest.raises(ConfigError, match=r"model='minilm-l6' \(bert\) is not a causal language model"):
        check_inputs(lm_cfg(cache_dir, "model=minilm-l6"), "minilm-l6")
    path = tmp_path / "short.txt"
    path.write_text("a few words\n" * 30)  # its last 10%: 3 lines, under one window of 32 tokens
    with pytest.raises(ConfigError, match=r"task text:.*short.txt: the evaluation text has \d+ tokens, fewer than "
                                          "one window of data.max_length=32: lower data.max_length"):
        check_inputs(lm_cfg(cache_dir, f"tasks=[text:{path}]", "rtn.quant=[w8a8]"), "tiny-llama")
    cfg = lm_cfg(cache_dir, "rtn.quant=[w4g16,w8a8]", "rtn.calib_samples=64")
    check_inputs(cfg, "tiny-llama")  # fits: nothing raised
    assert list((Path(cache_dir) / "lm").glob("wikitext2-*.npy"))  # tokenized once, for the stages


def test_checkpoints_answer_their_kind_of_task(tok, tmp_path, tiny_teacher, cache_dir):
    checkpoints.save(tiny_llama(), tok, tmp_path / "lm", {"task": "wikitext2", "head": "causal-lm"}, "fp")
    lm = str(tmp_path / "lm")
    with pytest.raises(ConfigError, match="is a causal language model: it has no classifier head for the GLUE task "
                                          "sst2"):
        plan_kinds(lm_cfg(cache_dir, "tasks=[sst2]"), ("evaluate",), lm)
    with pytest.raises(ConfigError, match="is a classifier .fine-tuned on sst2.: it predicts no tokens, so it cannot "
                                          "be scored on the language-modelling task wikitext2"):
        plan_kinds(lm_cfg(cache_dir), ("evaluate",), tiny_teacher)
    stages = plan_kinds(lm_cfg(cache_dir, "tasks=[tinyshakespeare]"), ("evaluate",), lm)  # any LM task
    assert [s.name for s in stages] == ["evaluate/tinyshakespeare/checkpoint", "report"]


# --- report -----------------------------------------------------------------------------------------------

def test_report_shows_ppl_and_its_increase_over_fp(tmp_path):
    def result(ppl):
        return SimpleNamespace(main_metric="ppl", main=ppl, metrics={"ppl": ppl}, model_bytes=2**20,
                               examples_per_s=1.0)
    res = {"cpus": 1, "gpus": 0}
    rows = [report_row("wikitext2", "fp", result(20.0), 1.0, None, 100.0, res),
            report_row("wikitext2", "rtn-w4g16a16", result(25.123), 1.0, "w4g16", 0.0, res),
            {"task": "sst2", "method": "fp", "metric": "accuracy", "value": 90.0, "bits": 32}]
    assert rows[1]["value"] == 25.12 and rows[1]["metric"] == "ppl"  # not x100
    table = {(r["task"], r["method"]): r for r in comparison_rows(rows)}
    assert table["wikitext2", "rtn-w4g16a16"]["increase_vs_fp"] == 5.12
    assert table["wikitext2", "rtn-w4g16a16"]["increase_pct"] == 25.6
    assert table["wikitext2", "rtn-w4g16a16"]["drop_vs_fp"] is None
    assert table["wikitext2", "fp"]["increase_vs_fp"] == 0.0 and table["sst2", "fp"]["drop_vs_fp"] == 0.0
    glue_only = comparison_rows([rows[2]])
    assert list(glue_only[0]) == COLUMNS  # GLUE reports keep their columns
    markdown = Path(report(rows, tmp_path).markdown).read_text()
    assert "| wikitext2 | rtn-w4g16a16 | 4 | ppl | 25.12 |  | 5.12 | 25.60 |" in markdown
    assert "| sst2 | fp | 32 | accuracy | 90 | 0 |  |  |" in markdown


def test_lm_tasks_have_no_majority_floor():
    assert list(majority_floor(["wikitext2", "rte"], DataConfig())) == ["rte"]


# --- a whole run ----------------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_adopt_evaluate_rtn_on_tiny_llama_reports_ppl(ray_session, mlflow_uri, tmp_path, cache_dir):
    cfg = load_config(None, ["model=tiny-llama", "tasks=[wikitext2]", f"output_dir={tmp_path / 'out'}",
                             "experiment=lm-test", "data.max_length=32", "data.eval_examples=8",
                             f"data.cache_dir={cache_dir}", "evaluate.batch_size=4", "rtn.quant=[w4g16,w8a8]",
                             "rtn.calib_samples=8", "rtn.batch_size=4", "export.formats=[onnx,compressed-tensors]",
                             "export.latency_batch=2", "export.latency_tokens=16", "export.latency_runs=2"])
    from pipelines.runner import run

    summary = run(cfg)
    rows = {r["method"]: r for r in summary.rows}
    exports = {f"rtn-{q}@{r}" for q in ("w4g16a16", "w8a8") for r in ("onnxruntime", "transformers")}
    assert set(rows) == {"fp", "rtn-w4g16a16", "rtn-w8a8"} | exports
    assert {r["metric"] for r in rows.values()} == {"ppl"}
    for name in exports:  # the decoder runs in ONNX Runtime and transformers with plmq's perplexity
        assert rows[name]["value"] == pytest.approx(rows[name.split("@")[0]]["value"], rel=1e-4)
    assert all(r["value"] > 1000 for r in rows.values())  # a random model over a 30k vocabulary
    assert rows["rtn-w4g16a16"]["bits"] == 4 and rows["rtn-w4g16a16"]["model_MB"] < rows["fp"]["model_MB"]
    assert "| wikitext2 | rtn-w4g16a16 | 4 | ppl |" in summary.table and "increase_vs_fp" in summary.table

    finetune = summary.outcomes["finetune/wikitext2"]
    meta = checkpoints.read_meta(finetune["checkpoint"])
    assert meta["head"] == "causal-lm" and meta["adopted"] and meta["task"] == "wikitext2"
    assert not (tmp_path / "out" / "wikitext2" / "finetune" / "ray_train").exists()  # no Ray Train
    fp = checkpoints.load(finetune["checkpoint"])
    direct = evaluate_model(fp.model, fp.tokenizer, "wikitext2", cfg.data, cfg.evaluate)
    assert rows["fp"]["value"] == round(direct.metrics["ppl"], 2)

    runs = mlflow.search_runs([mlflow.get_experiment_by_name("lm-test").experiment_id], output_format="list")
    metrics = {r.info.run_name: r.data.metrics for r in runs}
    assert metrics["evaluate/wikitext2/fp"]["eval_ppl"] == pytest.approx(direct.metrics["ppl"])
    assert metrics["rtn/wikitext2/w8a8"]["eval_ppl"] == pytest.approx(rows["rtn-w8a8"]["value"], abs=0.01)


@pytest.mark.ray
@pytest.mark.slow
def test_mrem_parallel_on_a_causal_lm_reports_ppl(ray_session, mlflow_uri, tmp_path, cache_dir):
    """Calibration windows of the LM text, two module actors loading only their blocks, ppl in the report."""
    cfg = load_config(None, ["model=tiny-llama", "tasks=[wikitext2]", f"output_dir={tmp_path / 'out'}",
                             "experiment=lm-mrem", "data.max_length=32", "data.eval_examples=8",
                             f"data.cache_dir={cache_dir}", "evaluate.batch_size=4", "mrem.quant=[w4g16]",
                             "mrem.modules=2", "mrem.steps=6", "mrem.batch_size=4", "mrem.calib_samples=16",
                             "mrem.calib_batch_size=8", "mrem.shard_size=8", "mrem.eval_samples=8",
                             "mrem.checkpoint_every=3", "mrem.log_every=3", "mrem.e2e.enabled=true",
                             "mrem.e2e.samples=8", "mrem.e2e.batch_size=4"])
    from pipelines.runner import run

    summary = run(cfg)
    rows = {r["method"]: r for r in summary.rows}
    assert rows["mrem-parallel-w4g16a16"]["metric"] == "ppl" and rows["mrem-parallel-w4g16a16"]["value"] > 1
    # mrem-e2e tunes the steps on text windows against the FP model's next-token distributions
    e2e = summary.outcomes["mrem-e2e/wikitext2/w4g16a16-parallel"]["info"]
    assert rows["mrem-parallel+e2e-w4g16a16"]["metric"] == "ppl" and e2e["steps"] == 8 // 4 and e2e["workers"] == 2
    assert e2e["before"]["value"] == rows["mrem-parallel-w4g16a16"]["value"]
    cal = summary.outcomes["calibrate/wikitext2"]["info"]
    assert cal["calib_samples"] == 16 and cal["modules"] == 2
    info = summary.outcomes["mrem/wikitext2/w4g16a16-parallel"]["info"]
    assert [s["layers"] for s in info["modules_stats"]] == [[0, 3], [3, 4]]  # the last also runs the 32000-word head
    assert len(info["chain_errors"]) == 2 and all(e > 0 for e in info["chain_errors"])
    loaded = checkpoints.load(info["checkpoint"])
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.meta["format"] == "packed"
