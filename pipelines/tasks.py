"""The GLUE tasks plmq knows: columns, labels, dev splits and the metric each is judged by."""
from __future__ import annotations

from dataclasses import dataclass

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


def check_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[name]
