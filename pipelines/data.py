"""GLUE tasks: schemas, readers for three sources, and a tokenized Arrow cache.

Sources: `bundled` (the repo's data/glue, offline default), `dir` (a user's
glue_data/-style folder) and `hub` (`datasets.load_dataset("nyu-mll/glue")`).
Every source yields a `datasets.Dataset` with columns text_a, text_b, label.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import datasets

from pipelines.config import DataConfig
from pipelines.errors import ConfigError, DataError
from pipelines.tasks import GlueTask, check_task
from pipelines.textfile import read_utf8

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_GLUE = REPO_ROOT / "data" / "glue"
csv.field_size_limit(sys.maxsize)


def glue_task(name: str) -> GlueTask:
    """The GLUE task `name`; a language-modelling task has no GLUE splits (see pipelines.lm_eval)."""
    task = check_task(name)
    if task.kind != "glue":
        raise ConfigError(f"task {name!r} is a language-modelling task: it has no GLUE splits")
    return task


def _parse_label(task: GlueTask, raw: str, where: str) -> float | int:
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # float() also takes "nan" and "inf": no score to learn or compare
            raise DataError(f"{where}: label {raw!r} is not a finite number ({task.name} is regression)")
        return value
    if raw not in task.labels:
        raise DataError(f"{where}: label {raw!r} is not one of {list(task.labels)} for task {task.name}")
    return task.labels.index(raw)


def _column_index(task: GlueTask, header: list[str] | None, col: str | int, path: Path) -> int:
    if isinstance(col, int):
        return col
    if col not in header:
        raise DataError(f"{path}: header has no column {col!r} needed by task {task.name}; header is {header}")
    return header.index(col)


def _rows(task: GlueTask, path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) of a task TSV read as strict UTF-8 (textfile.read_utf8: a BOM such as
    MRPC's is dropped, CRLF line ends are accepted); blank lines at the end are ignored."""
    text = read_utf8(path, f"task {task.name}")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = [(reader.line_num, row) for row in reader]
    while rows and not rows[-1][1]:
        rows.pop()
    header = rows.pop(0)[1] if task.header and rows else None
    if not rows:
        what = "a header line but no examples" if header else "no examples"
        raise DataError(f"task {task.name}: {path} has {what}; it should hold one tab-separated example per line "
                        f"after the header{'' if task.header else ' (this task has no header)'}")
    return header, rows


def read_tsv(task: GlueTask, path: Path) -> dict[str, list]:
    """Read one GLUE TSV into columns; strict about encoding, shape and labels (errors name file and line)."""
    if not path.is_file():
        raise DataError(f"task {task.name}: split file {path} is missing")
    header, rows = _rows(task, path)
    width = len(header) if header else len(rows[0][1])
    idx = [_column_index(task, header, c, path) for c in task.text_cols]
    label_idx = _column_index(task, header, task.label_col, path)
    if max(*idx, label_idx) >= width:
        raise DataError(f"task {task.name}, {path}, line {rows[0][0]}: {width} tab-separated columns, but task "
                        f"{task.name} reads column {max(*idx, label_idx) + 1}")
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    for lineno, row in rows:
        where = f"task {task.name}, {path}, line {lineno}"
        if len(row) != width:
            raise DataError(f"{where}: expected {width} tab-separated columns, found {len(row)}")
        out["text_a"].append(row[idx[0]])
        out["text_b"].append(row[idx[1]] if len(idx) > 1 else None)
        out["label"].append(_parse_label(task, row[label_idx], where))
    return out


def _hub_split(task: GlueTask, split: str) -> datasets.Dataset:
    hub_split = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
                 "dev_mismatched": "validation_mismatched"}[split]
    raw = datasets.load_dataset("nyu-mll/glue", task.name, split=hub_split)
    fields = task.hub_fields
    return datasets.Dataset.from_dict({
        "text_a": raw[fields[0]],
        "text_b": raw[fields[1]] if len(fields) > 1 else [None] * len(raw),
        "label": raw["label"],
    })


def _task_folder(task: GlueTask, cfg: DataConfig) -> Path:
    """The folder of a task's TSVs (local sources), or a DataError saying where it should be."""
    if cfg.source == "bundled":
        folder = BUNDLED_GLUE / task.folder
        if not folder.is_dir():
            raise DataError(f"task {task.name} is not bundled (bundled: SST-2, RTE, MRPC, WNLI, QNLI dev); "
                            f"set data.source=dir with data.dir=<your glue_data folder>, or data.source=hub")
        return folder
    root = Path(cfg.dir)
    if not root.is_dir():
        raise DataError(f"data.dir={cfg.dir}: no such folder; set data.dir to a glue_data/-style folder that holds "
                        f"{task.folder}/train.tsv and {task.folder}/{task.dev_splits[0]}.tsv")
    if not (root / task.folder).is_dir():
        raise DataError(f"task {task.name}: data.dir={cfg.dir} has no folder {task.folder}/; put the GLUE TSVs of "
                        f"{task.name} (train.tsv, {', '.join(s + '.tsv' for s in task.dev_splits)}) there or change "
                        "data.dir")
    return root / task.folder


def check_data(task_name: str, cfg: DataConfig) -> None:
    """Fail before any work when a task's split files are missing or unreadable (local sources only): every
    split is read as the stages will read it, so a bad encoding, column count or label names file and line."""
    task = glue_task(task_name)
    if cfg.source == "hub":
        return
    folder = _task_folder(task, cfg)
    for split in ("train", *task.dev_splits):
        if not (folder / f"{split}.tsv").is_file():
            raise DataError(f"task {task.name}: split file {folder / f'{split}.tsv'} is missing; "
                            f"put the GLUE TSVs of {task.name} there or change data.source/data.dir")
    for split in ("train", *task.dev_splits):
        read_tsv(task, folder / f"{split}.tsv")


def load_split(task_name: str, split: str, cfg: DataConfig) -> datasets.Dataset:
    """One split ("train", "dev", "dev_matched", ...) of a task as text_a/text_b/label."""
    task = glue_task(task_name)
    if split != "train" and split not in task.dev_splits:
        raise DataError(f"task {task.name} has no split {split!r}; splits: train, {', '.join(task.dev_splits)}")
    if cfg.source == "hub":
        return _hub_split(task, split)
    return datasets.Dataset.from_dict(read_tsv(task, _task_folder(task, cfg) / f"{split}.tsv"))


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "plmq" / "tokenized"


def _fingerprint(tokenizer, task: str, split: str, cfg: DataConfig, seed: int) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [task, split, cfg.source, str(cfg.dir), str(cfg.max_length), str(seed),
             str(cfg.train_examples if split == "train" else cfg.eval_examples),
             type(tokenizer).__name__, hashlib.sha256(vocab.encode()).hexdigest()]
    if cfg.source != "hub":
        root = BUNDLED_GLUE if cfg.source == "bundled" else Path(cfg.dir)
        f = root / glue_task(task).folder / f"{split}.tsv"
        parts.append(f"{f.stat().st_size}-{f.stat().st_mtime_ns}" if f.exists() else "missing")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _subset(ds: datasets.Dataset, n: int | None, shuffle: bool, seed: int) -> datasets.Dataset:
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.select(range(min(n, len(ds)))) if n else ds


def examples(task_name: str, split: str, cfg: DataConfig, seed: int = 42) -> datasets.Dataset:
    """The examples of a split a run uses, as `tokenized_split` takes them: data.train_examples shuffled
    training rows (by `seed`), or the first data.eval_examples rows of a dev split."""
    n = cfg.train_examples if split == "train" else cfg.eval_examples
    return _subset(load_split(task_name, split, cfg), n, shuffle=split == "train", seed=seed)


def tokenized_split(task_name: str, split: str, tokenizer, cfg: DataConfig, seed: int = 42) -> Path:
    """Tokenize a split once and cache it as Arrow; returns the cache folder.

    The key covers task, split, source file, tokenizer vocabulary, max length and
    subset size, so changing any of them re-tokenizes and nothing else does.
    """
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    path = cache / f"{task_name}-{split}-{_fingerprint(tokenizer, task_name, split, cfg, seed)}"
    if (path / "dataset_info.json").exists():
        return path
    ds = examples(task_name, split, cfg, seed)
    has_pair = ds[0]["text_b"] is not None if len(ds) else False

    def encode(batch):
        pair = (batch["text_a"], batch["text_b"]) if has_pair else (batch["text_a"],)
        return tokenizer(*pair, truncation=True, max_length=cfg.max_length)

    ds = ds.map(encode, batched=True, remove_columns=["text_a", "text_b"], desc=f"tokenize {task_name}/{split}")
    # Per-process temporary folder: stages running at once may tokenize the same split.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed run
    ds.save_to_disk(str(tmp))
    try:
        tmp.replace(path)  # atomic: a half-written cache is never taken as complete
    except OSError:  # another process finished the same split first: keep its copy
        if not (path / "dataset_info.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tokenized(path: str | Path) -> datasets.Dataset:
    return datasets.load_from_disk(str(path))
