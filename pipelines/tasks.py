"""The tasks plmq knows, of two kinds: GLUE classification (columns, labels, dev splits, the metric each is
judged by) and language modelling (where the calibration and evaluation texts come from; judged by perplexity).
`check_task` looks a name up among both; `kind` ("glue" / "lm") is what code branches on."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipelines.errors import ConfigError


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str                      # folder name in glue_data/
    text_cols: tuple[str, ...]       # TSV columns (names, or indices for headerless files)
    label_col: str | int
    labels: tuple[str, ...] | None   # None = regression
    hub_fields: tuple[str, ...]      # field names in nyu-mll/glue
    dev_splits: tuple[str, ...] = ("dev",)
    header: bool = True
    main_metric: str = "accuracy"
    kind: ClassVar[str] = "glue"

    @property
    def slug(self) -> str:
        """The task's folder name in a run directory."""
        return self.name

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", (3,), 1, ("0", "1"), ("sentence",), header=False,
             main_metric="matthews_corr"),
    GlueTask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("sentence",)),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"),
             ("sentence1", "sentence2"), main_metric="f1"),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None,
             ("sentence1", "sentence2"), main_metric="pearson"),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"),
             ("question1", "question2"), main_metric="f1"),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
             dev_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label",
             ("entailment", "not_entailment"), ("question", "sentence")),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label",
             ("entailment", "not_entailment"), ("sentence1", "sentence2")),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"),
             ("sentence1", "sentence2")),
]}


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from: a bundled corpus (`pipelines.lm_data.CORPORA`), a UTF-8 file, or one split of a
    Hugging Face dataset (its `text` column, rows joined by blank lines); `part` keeps all of it, or its head
    (first 90%) or tail (last 10%), cut at a line."""
    kind: str                     # corpus | file | hub
    ref: str                      # corpus name, file path or dataset name
    part: str = "all"             # all | head | tail
    config: str | None = None     # hub: the dataset's config
    split: str | None = None      # hub: the split


@dataclass(frozen=True)
class LMTask:
    """A causal-language-modelling task: calibrate on `calibration` text, score perplexity on `evaluation` text."""
    name: str
    calibration: TextSource
    evaluation: TextSource
    main_metric: str = "ppl"      # lower is better
    kind: ClassVar[str] = "lm"

    @property
    def slug(self) -> str:
        """The task's folder name in a run directory (a user's file or dataset name made path-safe)."""
        if self.calibration.kind == "corpus":
            return self.name
        if self.calibration.kind == "file":
            digest = hashlib.sha256(self.calibration.ref.encode()).hexdigest()[:8]
            return f"text-{Path(self.calibration.ref).stem}-{digest}"
        return "hub-" + re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.removeprefix("hub:"))


def _split_source(kind: str, ref: str) -> tuple[TextSource, TextSource]:
    return TextSource(kind, ref, "head"), TextSource(kind, ref, "tail")


LM_TASKS: dict[str, LMTask] = {
    "wikitext2": LMTask("wikitext2", TextSource("corpus", "wikitext2"), TextSource("corpus", "wikitext2-test")),
    "tinyshakespeare": LMTask("tinyshakespeare", *_split_source("corpus", "tinyshakespeare")),
}
LM_PREFIXES = ("text:<file>", "hub:<dataset>[:<config>]")


def _text_task(path: str) -> LMTask:
    file = Path(os.path.expanduser(path))  # os.path leaves an unknown ~user as it is
    if not path or not file.is_file():
        raise ConfigError(f"task text:{path}: no such file; give a UTF-8 text file, e.g. text:data/my_corpus.txt")
    file = file.resolve()
    return LMTask(f"text:{file}", *_split_source("file", str(file)))


def _hub_task(spec: str) -> LMTask:
    dataset, _, config = spec.partition(":")
    if not dataset:
        raise ConfigError("task hub:: name a Hugging Face dataset, e.g. hub:wikitext:wikitext-2-raw-v1")
    return LMTask(f"hub:{spec}", TextSource("hub", dataset, config=config or None, split="train"),
                  TextSource("hub", dataset, config=config or None, split="test"))


def check_task(name: str) -> GlueTask | LMTask:
    """The task named `name`: a GLUE task, a bundled LM task, `text:<file>` or `hub:<dataset>[:<config>]`."""
    if name in GLUE_TASKS:
        return GLUE_TASKS[name]
    if name in LM_TASKS:
        return LM_TASKS[name]
    if name.startswith("text:"):
        return _text_task(name.removeprefix("text:"))
    if name.startswith("hub:"):
        return _hub_task(name.removeprefix("hub:"))
    raise ConfigError(f"unknown task {name!r}; GLUE tasks: {', '.join(GLUE_TASKS)}; language-modelling tasks: "
                      f"{', '.join([*LM_TASKS, *LM_PREFIXES])}")
