"""GLUE data: bundled row counts, a user's glue_data folder, clear errors, the tokenized cache."""
from __future__ import annotations

import socket

import pytest

from pipelines import data as glue
from pipelines.config import ConfigError, DataConfig
from pipelines.models import load_tokenizer

BUNDLED_ROWS = [("sst2", "train", 67349), ("sst2", "dev", 872), ("rte", "train", 2490), ("rte", "dev", 277),
                ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("wnli", "train", 635), ("wnli", "dev", 71),
                ("qnli", "dev", 5463)]


@pytest.mark.parametrize("task,split,rows", BUNDLED_ROWS)
def test_bundled_tasks_have_known_row_counts(task, split, rows):
    ds = glue.load_split(task, split, DataConfig())
    assert len(ds) == rows
    spec = glue.check_task(task)
    assert set(ds["label"]) == set(range(spec.num_labels))
    assert all(isinstance(t, str) and t for t in ds["text_a"][:50])


def test_mrpc_bom_is_stripped_and_pairs_are_read():
    ds = glue.load_split("mrpc", "dev", DataConfig())
    assert ds[0]["text_b"] and ds[0]["text_a"] != ds[0]["text_b"]
    # label counts from data/SOURCES.md: dev 0: 129 / 1: 279
    assert sum(ds["label"]) == 279


def test_rte_labels_follow_glue_order():
    ds = glue.load_split("rte", "dev", DataConfig())
    assert ds["label"].count(0) == 146  # entailment, as in data/SOURCES.md


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_dir_source_reads_cola_stsb_and_mnli(tmp_path):
    _write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more we study.\n")
    _write(tmp_path / "STS-B" / "dev.tsv",
           "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
           "0\tmain\tf\t2012\t1\tnone\tnone\tA plane takes off.\tAn air plane is taking off.\t5.000\n")
    header = "\t".join(["index", "promptID", "pairID", "genre", "s1bp", "s2bp", "s1p", "s2p",
                        "sentence1", "sentence2", "label1", "gold_label"])
    _write(tmp_path / "MNLI" / "dev_mismatched.tsv",
           header + "\n" + "\t".join(["0", "1", "2", "g", "", "", "", "", "Premise.", "Hypothesis.",
                                      "neutral", "neutral"]) + "\n")
    cfg = DataConfig(source="dir", dir=str(tmp_path))
    cola = glue.load_split("cola", "train", cfg)
    assert cola["label"] == [1, 0] and cola["text_a"][1] == "The more we study." and cola["text_b"] == [None, None]
    stsb = glue.load_split("stsb", "dev", cfg)
    assert stsb["label"] == [5.0] and stsb["text_b"] == ["An air plane is taking off."]
    mnli = glue.load_split("mnli", "dev_mismatched", cfg)
    assert mnli["label"] == [1] and mnli["text_a"] == ["Premise."]


def test_unknown_task_is_rejected_with_the_known_list():
    with pytest.raises(ConfigError, match="unknown task 'sst3'.*sst2"):
        glue.load_split("sst3", "train", DataConfig())


def test_missing_split_file_names_task_and_path(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(glue.DataError, match=r"task rte: split file .*RTE/train.tsv is missing"):
        glue.load_split("rte", "train", DataConfig(source="dir", dir=str(tmp_path)))


def test_task_not_bundled_says_how_to_bring_it():
    with pytest.raises(glue.DataError, match="data.source=dir"):
        glue.load_split("cola", "train", DataConfig())


def test_wrong_column_count_names_file_and_line(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\textra\n")
    with pytest.raises(glue.DataError,
                       match=r"task sst2, .*train.tsv, line 3: expected 2 tab-separated columns, found 3"):
        glue.load_split("sst2", "train", DataConfig(source="dir", dir=str(tmp_path)))


def test_label_outside_label_set_names_line(tmp_path):
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood film\t1\nbad film\t7\n")
    with pytest.raises(glue.DataError, match=r"line 3: label '7' is not one of \['0', '1'\]"):
        glue.load_split("sst2", "dev", DataConfig(source="dir", dir=str(tmp_path)))


def test_missing_header_column_is_named(tmp_path):
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(glue.DataError, match="no column 'sentence2'"):
        glue.load_split("rte", "dev", DataConfig(source="dir", dir=str(tmp_path)))


def test_tokenized_split_is_cached(cache_dir, monkeypatch):
    tok = load_tokenizer("tiny-bert")
    cfg = DataConfig(max_length=16, train_examples=64, cache_dir=cache_dir)
    first = glue.tokenized_split("rte", "train", tok, cfg)
    ds = glue.load_tokenized(first)
    assert len(ds) == 64 and max(len(x) for x in ds["input_ids"]) <= 16

    def fail(*a, **k):
        raise AssertionError("re-read the TSV although the tokenized cache exists")

    monkeypatch.setattr(glue, "load_split", fail)
    assert glue.tokenized_split("rte", "train", tok, cfg) == first
    # a different max length is a different cache entry, so it must tokenize again
    with pytest.raises(AssertionError, match="re-read"):
        glue.tokenized_split("rte", "train", tok, DataConfig(max_length=32, train_examples=64, cache_dir=cache_dir))


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.network
@pytest.mark.skipif(not _hub_reachable(), reason="Hugging Face hub not reachable (offline machine)")
def test_hub_source_loads_glue(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    ds = glue.load_split("rte", "dev", DataConfig(source="hub"))
    assert len(ds) == 277
