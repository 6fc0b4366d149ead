"""GLUE metrics against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.evaluation import glue_metrics
from pipelines.tasks import GLUE_TASKS

PREDS = np.array([1, 1, 0, 0, 1, 0])
LABELS = np.array([1, 0, 0, 1, 1, 0])
# confusion: TP=2 (idx 0,4), FP=1 (idx 1), FN=1 (idx 3), TN=2 (idx 2,5)


def test_accuracy_sst2():
    assert glue_metrics(GLUE_TASKS["sst2"], PREDS, LABELS) == {"accuracy": pytest.approx(4 / 6)}


def test_f1_mrpc_and_qqp():
    for task in ("mrpc", "qqp"):
        m = glue_metrics(GLUE_TASKS[task], PREDS, LABELS)
        # precision 2/3, recall 2/3 -> F1 2/3
        assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)


def test_matthews_cola():
    m = glue_metrics(GLUE_TASKS["cola"], PREDS, LABELS)
    expected = (2 * 2 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (2 + 1) * (2 + 1))  # (TP*TN-FP*FN)/sqrt(...)
    assert m["matthews_corr"] == pytest.approx(expected)


def test_pearson_spearman_stsb():
    preds = np.array([1.0, 2.0, 3.0, 4.0])
    labels = np.array([1.0, 2.0, 4.0, 3.0])
    m = glue_metrics(GLUE_TASKS["stsb"], preds, labels)
    # Spearman: rank differences d = [0,0,1,1] -> 1 - 6*2/(4*15) = 0.8
    assert m["spearman"] == pytest.approx(0.8)
    # Pearson: centred x=[-1.5,-.5,.5,1.5], y=[-1.5,-.5,1.5,.5]; sum xy=4, sum x^2=sum y^2=5 -> 0.8
    assert m["pearson"] == pytest.approx(0.8)


def test_majority_baseline_on_bundled_tasks():
    from pipelines.config import DataConfig
    from pipelines.evaluation import majority_baseline

    assert majority_baseline("rte", DataConfig()) == pytest.approx(146 / 277)  # always "entailment"
    # MRPC always "paraphrase": precision 279/408, recall 1 (dev counts in data/SOURCES.md)
    assert majority_baseline("mrpc", DataConfig()) == pytest.approx(2 * 279 / (279 + 408))


def test_majority_baseline_takes_the_train_label_not_the_dev_one(tmp_path):
    from pipelines.config import DataConfig
    from pipelines.evaluation import majority_baseline

    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na\t1\nb\t1\nc\t0\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nd\t0\ne\t0\nf\t1\n")
    assert majority_baseline("sst2", DataConfig(source="dir", dir=str(tmp_path))) == pytest.approx(1 / 3)
    assert majority_baseline("stsb", DataConfig(source="dir", dir=str(tmp_path))) is None  # regression


def test_a_model_that_predicts_one_class_is_flagged(tiny_data, mlflow_uri, capsys):
    """A fine-tune that learned nothing scores the majority class; evaluation says so, in the log and MLflow."""
    from types import SimpleNamespace

    import mlflow
    import torch

    from pipelines import models
    from pipelines.config import EvaluateConfig
    from pipelines.evaluation import eval_metrics, evaluate_model
    from pipelines.tracking import log_stage

    class ByToken(torch.nn.Module):  # label 1 when the first word's token id is odd: both labels occur
        def __init__(self, always: int | None = None):
            super().__init__()
            self.always = always

        def forward(self, input_ids, **_):
            label = (input_ids[:, 1] % 2).float() if self.always is None else \
                torch.full((len(input_ids),), float(self.always))
            return SimpleNamespace(logits=torch.stack([torch.full_like(label, 0.5), label], -1))

    tok = models.load_tokenizer("tiny-bert")
    result = evaluate_model(ByToken(), tok, "sst2", tiny_data, EvaluateConfig())
    assert result.extra == {"predicted_classes": 2} and "WARNING" not in capsys.readouterr().out
    result = evaluate_model(ByToken(always=1), tok, "sst2", tiny_data, EvaluateConfig())
    assert result.extra["predicted_classes"] == 1
    assert "predicts label 1 for all 200 dev examples" in capsys.readouterr().out
    mlflow.set_experiment("one-class")  # an earlier test's experiment id is not in this test's store
    with mlflow.start_run() as run:
        log_stage(eval_metrics(result), {"eval": {"extra": result.extra}})
    assert "learned nothing" in mlflow.get_run(run.info.run_id).data.tags["warning"]
