"""Bad data and model input fails before any work with one line naming the file (and line) or setting to fix:
task TSVs, LM texts and corpora, model folders and their weights, checkpoints without a trained head; and the
majority-class floor is computed on the examples the metric sees. No Ray: these are the up-front checks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from typer.testing import CliRunner

from pipelines import checkpoints, lm_eval, models
from pipelines import data as glue
from pipelines.cli import app
from pipelines.config import DataConfig, RunConfig, load_config
from pipelines.errors import ConfigError, DataError
from pipelines.evaluation import check_inputs, majority_baseline, majority_floor
from pipelines.lm_data import LMData, check_windows
from pipelines.pretrain_config import PretrainRunConfig
from pipelines.stages import plan, plan_kinds, pretrain

SST2_HEADER = b"sentence\tlabel\n"


def _dir_cfg(root) -> DataConfig:
    return DataConfig(source="dir", dir=str(root))


def _sst2(root, train: bytes, dev: bytes = SST2_HEADER + b"fine film\t1\n"):
    """An SST-2 folder under `root` with the given raw bytes as train.tsv and dev.tsv."""
    folder = root / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_bytes(train)
    (folder / "dev.tsv").write_bytes(dev)
    return folder


# ---------------------------------------------------------------- task TSVs (data.dir)

def test_missing_data_dir_names_the_setting(tmp_path):
    with pytest.raises(DataError, match=rf"data.dir={re.escape(str(tmp_path / 'nope'))}: no such folder"):
        glue.check_data("sst2", _dir_cfg(tmp_path / "nope"))


def test_missing_task_folder_names_the_folder_and_its_files(tmp_path):
    with pytest.raises(DataError, match=r"task rte: data.dir=.* has no folder RTE/; .*train.tsv, dev.tsv"):
        glue.check_data("rte", _dir_cfg(tmp_path))


def test_missing_split_file_is_found_before_work(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(SST2_HEADER + b"good\t1\n")
    with pytest.raises(DataError, match=r"task sst2: split file .*SST-2/dev.tsv is missing"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_empty_file_is_named(tmp_path):
    folder = _sst2(tmp_path, b"")
    with pytest.raises(DataError, match=rf"task sst2: {re.escape(str(folder / 'train.tsv'))} is empty"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_header_only_file_is_named(tmp_path):
    folder = _sst2(tmp_path, SST2_HEADER + b"good\t1\n", dev=SST2_HEADER)
    with pytest.raises(DataError, match=rf"{re.escape(str(folder / 'dev.tsv'))} has a header line but no examples"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_wrong_column_count_is_found_before_work_with_file_and_line(tmp_path):
    _sst2(tmp_path, SST2_HEADER + b"good\t1\nbad\t0\n", dev=SST2_HEADER + b"fine\t1\nso so\n")
    with pytest.raises(DataError, match=r"task sst2, .*SST-2/dev.tsv, line 3: expected 2 tab-separated columns, "
                                        r"found 1"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_non_numeric_label_names_file_line_label_and_the_valid_labels(tmp_path):
    _sst2(tmp_path, SST2_HEADER + b"good\t1\nbad\t0\nmeh\tpositive\n")
    with pytest.raises(DataError, match=r"SST-2/train.tsv, line 4: label 'positive' is not one of \['0', '1'\]"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_out_of_range_label_names_file_line_and_label(tmp_path):
    _sst2(tmp_path, SST2_HEADER + b"good\t1\nbad\t2\n")
    with pytest.raises(DataError, match=r"SST-2/train.tsv, line 3: label '2' is not one of \['0', '1'\]"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


@pytest.mark.parametrize("score", ["high", "nan", "inf"])
def test_regression_label_that_is_no_finite_number_is_named(tmp_path, score):
    text = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" \
           f"0\tmain\tf\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t{score}\n"
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "dev.tsv").write_text(text)
    with pytest.raises(DataError, match=rf"STS-B/dev.tsv, line 2: label '{score}' is not a finite number"):
        glue.load_split("stsb", "dev", _dir_cfg(tmp_path))


def test_binary_garbage_is_named_as_not_text(tmp_path):
    folder = _sst2(tmp_path, SST2_HEADER + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=rf"task sst2: {re.escape(str(folder / 'train.tsv'))} is not a text file "
                                        r"\(a NUL byte at byte 15, line 2\)"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_latin1_file_names_line_and_byte_and_says_save_as_utf8(tmp_path):
    folder = _sst2(tmp_path, SST2_HEADER + b"good\t1\ncaf\xe9 cr\xe8me\t0\n")
    with pytest.raises(DataError, match=rf"task sst2: {re.escape(str(folder / 'train.tsv'))}, line 3: byte 25 "
                                        r"\(0xe9\) is not UTF-8 .*save it as UTF-8"):
        glue.check_data("sst2", _dir_cfg(tmp_path))


def test_utf8_bom_is_accepted_and_stripped(tmp_path):
    _sst2(tmp_path, b"\xef\xbb\xbf" + SST2_HEADER + "caf\u00e9\t1\nbad\t0\n".encode())
    glue.check_data("sst2", _dir_cfg(tmp_path))
    ds = glue.load_split("sst2", "train", _dir_cfg(tmp_path))
    assert ds["text_a"] == ["caf\u00e9", "bad"] and ds["label"] == [1, 0]  # the header was found despite the BOM


def test_crlf_line_ends_are_accepted(tmp_path):
    _sst2(tmp_path, b"sentence\tlabel\r\ngood film\t1\r\nbad film\t0\r\n\r\n")
    glue.check_data("sst2", _dir_cfg(tmp_path))
    ds = glue.load_split("sst2", "train", _dir_cfg(tmp_path))
    assert ds["text_a"] == ["good film", "bad film"] and ds["label"] == [1, 0]  # no \r left in text or label


def test_a_headerless_task_with_too_few_columns_is_named(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\tThe sailors rode the breeze.\n")
    with pytest.raises(DataError, match=r"CoLA/train.tsv, line 1: 3 tab-separated columns, but task cola reads "
                                        r"column 4"):
        glue.load_split("cola", "train", _dir_cfg(tmp_path))


def test_check_inputs_reads_every_split_before_work(tmp_path):
    """The run's up-front check (runner.prepare -> check_inputs) finds a bad line in a dev file."""
    _sst2(tmp_path, SST2_HEADER + b"good\t1\n", dev=SST2_HEADER + b"fine\t1\nawful\t-1\n")
    cfg = RunConfig(model="tiny-bert", tasks=["sst2"], data=_dir_cfg(tmp_path))
    with pytest.raises(DataError, match=r"SST-2/dev.tsv, line 3: label '-1'"):
        check_inputs(cfg, cfg.model)


# ---------------------------------------------------------------- LM texts: text:<file> tasks

def _lm_cfg(cache_dir, *overrides):
    return load_config(None, ["model=tiny-llama", "data.max_length=32", f"data.cache_dir={cache_dir}", *overrides])


def test_text_task_with_a_missing_file_names_it(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=rf"task text:{re.escape(str(tmp_path))}/nope.txt: no such file"):
        _lm_cfg(cache_dir, f"tasks=[text:{tmp_path}/nope.txt]")


@pytest.mark.parametrize("content, message", [
    (b"", " is empty"),
    (b"\n \n\t\n", r" is empty \(only whitespace\)"),
    (b"words\n" * 50 + b"\x00\x01\x02\xff" * 64, r" is not a text file \(a NUL byte at byte 300, line 51\)"),
    (b"words\n" * 50 + "na\u00efve\n".encode("latin-1"), r", line 51: byte 302 \(0xef\) is not UTF-8 .*save it as "
                                                       "UTF-8"),
])
def test_text_task_file_that_is_not_usable_text_is_named_before_work(tmp_path, cache_dir, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    cfg = _lm_cfg(cache_dir, f"tasks=[text:{path}]")
    with pytest.raises(DataError, match=rf"task text:{re.escape(str(path))}: {re.escape(str(path))}{message}"):
        check_inputs(cfg, cfg.model)


def test_lm_calibration_by_mrem_is_checked_before_work_like_rtn_and_gptq(cache_dir):
    """MREM's calibrate stage takes mrem.calib_samples windows of the calibration text, as RTN and GPTQ do: the
    check before work covers it (a text shorter than one window is the same check's error, tested in
    test_lm_task.py for rtn)."""
    cfg = _lm_cfg(cache_dir, "tasks=[wikitext2]", "mrem.quant=[w8a8]", "mrem.calib_samples=100000")
    warnings = lm_eval.check_lm_tasks(cfg, cfg.model)
    assert len(warnings) == 1 and "mrem.calib_samples=100000 windows of data.max_length=32 tokens" in warnings[0]


# ---------------------------------------------------------------- pre-training corpora (data.corpus)

@pytest.mark.parametrize("content, message", [
    (b"", " is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r" is not a text file \(a NUL byte at byte 8, line 3\)"),
    ("caf\u00e9\n".encode("latin-1"), r", line 1: byte 3 \(0xe9\) is not UTF-8"),
])
def test_corpus_that_is_not_usable_text_is_refused_when_planned(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    cfg = load_config(None, [f"data.corpus={path}"], cls=PretrainRunConfig)
    with pytest.raises(DataError, match=rf"data.corpus='{re.escape(str(path))}': {re.escape(str(path))}{message}"):
        pretrain.plan(cfg)
    result = CliRunner().invoke(app, ["pretrain", "--corpus", str(path)])
    assert result.exit_code == 2 and f"{path}{message[:9]}" in result.output  # one line, no traceback


def test_corpus_shorter_than_a_window_is_refused_when_planned(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a short corpus\n" * 8)  # 120 bytes: fewer tokens than a window of 128 + 2 whatever the BPE
    cfg = load_config(None, [f"data.corpus={path}"], cls=PretrainRunConfig)
    with pytest.raises(DataError, match=rf"data.corpus='{re.escape(str(path))}': the text has 10[0-9] bytes, fewer "
                                        r"than the 130 tokens one window of model.block_size=128 needs"):
        pretrain.plan(cfg)
    # its validation tenth, with an evaluation corpus given instead: that one is too short
    cfg = load_config(None, ["data.corpus=tinyshakespeare", f"data.eval_corpus={path}"], cls=PretrainRunConfig)
    with pytest.raises(DataError, match=r"data.eval_corpus: the text has 120 bytes, fewer than the 129 tokens"):
        pretrain.plan(cfg)


def test_tokenized_corpus_shorter_than_a_window_is_refused_before_training(tmp_path):
    """The exact check once the BPE tokenizer has run (lm_train.prepare calls it before any worker starts)."""
    np.save(tmp_path / "train.npy", np.arange(200, dtype=np.uint16))
    np.save(tmp_path / "val.npy", np.arange(100, dtype=np.uint16))
    data = LMData("my.txt", str(tmp_path), str(tmp_path / "train.npy"), str(tmp_path / "val.npy"), 300)
    check_windows(data, 99)  # 200 >= 99 + 2 and 100 >= 99 + 1
    with pytest.raises(DataError, match=r"data.corpus='my.txt': its val split has 100 tokens, fewer than the 101 "
                                        r"one window of model.block_size=100 needs"):
        check_windows(data, 100)


# ---------------------------------------------------------------- model folders (model=, a verb's checkpoint)

@pytest.fixture
def llama_folder(tmp_path):
    """A pre-trained causal LM saved by Hugging Face (no plmq metadata), as a user would give it."""
    folder = tmp_path / "llama"
    tiny_models.model("tiny-llama").save_pretrained(folder, safe_serialization=True)
    tiny_models.tokenizer("tiny-llama").save_pretrained(folder)
    return folder


def _glue_cfg(model: str) -> RunConfig:
    return RunConfig(model=model, tasks=["sst2"], data=DataConfig(max_length=32))


@pytest.mark.parametrize("name", ["/nonexistent/models/llama", "./my-model", "runs/sst2/finetune/model"])
def test_missing_local_folder_says_the_folder_does_not_exist(name):
    with pytest.raises(ConfigError, match=rf"model={re.escape(name)}: no such folder \(.*\); give a folder saved "
                                          "with save_pretrained"):
        check_inputs(_glue_cfg(name), name)


def test_unknown_hub_name_offline_keeps_its_clear_error():
    with pytest.raises(ConfigError, match=r"model='no-such-org/no-such-model': no model config found .* or a hub "
                                          "name with internet access"):
        check_inputs(_glue_cfg("no-such-org/no-such-model"), "no-such-org/no-such-model")


def test_folder_without_config_json_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"model={re.escape(str(tmp_path / 'm'))}: .* has no config.json"):
        check_inputs(_glue_cfg(str(tmp_path / "m")), str(tmp_path / "m"))


def test_folder_without_weights_is_named(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=rf"model={re.escape(str(llama_folder))}: the folder holds no model "
                                          r"weights \(\*.safetensors or \*.bin\)"):
        check_inputs(_glue_cfg(str(llama_folder)), str(llama_folder))


def test_truncated_safetensors_is_found_before_work(llama_folder):
    weights = llama_folder / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)  # the header is intact, the tensors' bytes are cut
    with pytest.raises(ConfigError, match=rf"model={re.escape(str(llama_folder))}: model.safetensors is truncated: "
                                          rf"it has {size // 2} bytes, its header describes {size}"):
        check_inputs(_glue_cfg(str(llama_folder)), str(llama_folder))


def test_random_bytes_as_safetensors_are_found_before_work(llama_folder):
    (llama_folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ConfigError, match=r"model.safetensors is not a safetensors file \(4096 bytes, no valid "
                                          "header\\)"):
        check_inputs(_glue_cfg(str(llama_folder)), str(llama_folder))


def test_missing_shard_of_a_sharded_model_is_named(llama_folder):
    (llama_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json lists model-00002-of-00002.safetensors, "
                                          r"which is missing \(1 of 2 shards missing\)"):
        check_inputs(_glue_cfg(str(llama_folder)), str(llama_folder))


def test_a_pretrained_causal_lm_folder_is_a_valid_model_for_glue_tasks(llama_folder):
    """model=<pre-trained decoder> on GLUE: finetune trains a classifier head on it (the normal path)."""
    cfg = load_config(None, [f"model={llama_folder}", "tasks=[sst2]", "data.max_length=32"])
    check_inputs(cfg, cfg.model)
    assert [s.name for s in plan(cfg)][:2] == ["finetune/sst2", "evaluate/sst2/fp"]


def test_a_truncated_checkpoint_given_to_a_verb_fails_with_one_line(tiny_teacher):
    weights = Path(tiny_teacher) / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 1)
    result = CliRunner().invoke(app, ["evaluate", tiny_teacher, "--task", "sst2"])
    assert result.exit_code == 2, result.output  # refused as bad input, not a traceback
    assert f"checkpoint={tiny_teacher}: model.safetensors is truncated" in result.output


# ---------------------------------------------------------------- no trained head for the task


def test_a_causal_lm_folder_without_plmq_metadata_is_refused_for_glue(llama_folder):
    for verb in (["evaluate"], ["rtn", "--quant", "w8a8"]):
        result = CliRunner().invoke(app, [verb[0], str(llama_folder), *verb[1:], "--task", "sst2"])
        assert result.exit_code == 2, result.output
        assert (f"{llama_folder} was not written by plmq (no plmq_meta.json): it is a LlamaForCausalLM with no "
                "classifier head for the GLUE task sst2") in result.output
        assert f"plmq run --model {llama_folder} --task sst2" in result.output


def test_a_classifier_folder_without_plmq_metadata_is_refused(tmp_path):
    folder = tmp_path / "clf"
    tiny_models.model("tiny-bert").save_pretrained(folder, safe_serialization=True)
    with pytest.raises(ConfigError, match="was not written by plmq .*: nothing records which task its "
                                          "BertForSequenceClassification head was trained for"):
        plan_kinds(_glue_cfg("tiny-bert"), ("evaluate",), str(folder))


def test_a_prequant_base_has_no_head_to_score(tiny_teacher):
    checkpoints.update_meta(tiny_teacher, task_agnostic=True)
    with pytest.raises(ConfigError, match="is a PreQuant base .*: its task head is left out, so it has no trained "
                                          "head for sst2; run plmq prequant-finetune --task sst2"):
        plan_kinds(_glue_cfg("tiny-bert"), ("rtn",), tiny_teacher)


def test_a_plmq_checkpoint_that_names_no_task_is_refused_for_glue(tmp_path):
    checkpoints.save(tiny_models.model("tiny-bert"), tiny_models.tokenizer("tiny-bert"), tmp_path / "fp", {}, "fp")
    with pytest.raises(ConfigError, match="plmq_meta.json names no task, so nothing says its classifier head was "
                                          "trained for sst2"):
        plan_kinds(_glue_cfg("tiny-bert"), ("evaluate",), str(tmp_path / "fp"))


def test_a_head_with_another_label_count_is_refused(tmp_path):
    three = models.load_classifier("tiny-bert", 3)
    checkpoints.save(three, tiny_models.tokenizer("tiny-bert"), tmp_path / "fp", {"task": "sst2"}, "fp")
    with pytest.raises(ConfigError, match="describes BertForSequenceClassification with 3 outputs, not the sequence "
                                          "classifier with 2 of sst2"):
        plan_kinds(_glue_cfg("tiny-bert"), ("evaluate",), str(tmp_path / "fp"))


def test_a_checkpoint_fine_tuned_on_the_task_is_accepted(tiny_teacher):
    stages = plan_kinds(_glue_cfg("tiny-bert"), ("evaluate",), tiny_teacher)
    assert [s.name for s in stages] == ["evaluate/sst2/checkpoint", "report"]


@pytest.mark.parametrize("content, message", [("{\"format\": \"fp\"", "is not valid JSON"),
                                              ("[1, 2]", "holds list, not a JSON object")])
def test_a_broken_plmq_meta_file_is_named(tiny_teacher, content, message):
    (Path(tiny_teacher) / checkpoints.META_FILE).write_text(content)
    result = CliRunner().invoke(app, ["evaluate", tiny_teacher, "--task", "sst2"])
    assert result.exit_code == 2, result.output
    assert f"{Path(tiny_teacher) / checkpoints.META_FILE} {message}" in result.output


# ---------------------------------------------------------------- the majority-class floor


def test_majority_floor_is_computed_on_the_dev_examples_the_metric_uses(tmp_path):
    """Train: mostly 1. Dev: four 1s first, then ten 0s. With data.eval_examples=4 the metric sees the four 1s
    only, so a model that learned nothing (always 1) scores 100 there; the whole split would say 4/14."""
    _sst2(tmp_path, SST2_HEADER + b"a\t1\nb\t1\nc\t1\nd\t0\n", dev=SST2_HEADER + b"e\t1\n" * 4 + b"f\t0\n" * 10)
    whole = _dir_cfg(tmp_path)
    assert majority_baseline("sst2", whole) == pytest.approx(4 / 14)
    capped = DataConfig(source="dir", dir=str(tmp_path), eval_examples=4)
    assert majority_baseline("sst2", capped) == 1.0
    assert majority_floor(["sst2"], capped) == {"sst2": ("accuracy", 100.0)}
    assert len(glue.examples("sst2", "dev", capped)) == 4  # what tokenized_split evaluates


def test_majority_floor_guesses_from_the_training_examples_the_run_uses(tmp_path):
    """Train: 20 ones, 21 zeros, so the whole split's majority is 0; the 3 rows data.train_examples keeps with
    seed 5 are [0, 1, 1], so a model trained on them that learned nothing predicts 1."""
    _sst2(tmp_path, SST2_HEADER + b"a\t1\n" * 20 + b"b\t0\n" * 21, dev=SST2_HEADER + b"e\t1\n" * 3 + b"f\t0\n")
    cfg = DataConfig(source="dir", dir=str(tmp_path), train_examples=3)
    assert glue.examples("sst2", "train", cfg, seed=5)["label"] == [0, 1, 1]
    assert majority_baseline("sst2", cfg, seed=5) == 0.75
    assert majority_baseline("sst2", _dir_cfg(tmp_path), seed=5) == 0.25  # all 41 rows: guess 0

