"""Stage `evaluate`: GLUE dev metrics (scikit-learn/scipy), model bytes, throughput."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipelines import models
from pipelines.config import DataConfig, EvaluateConfig
from pipelines.data import GlueTask, check_task, load_split, tokenized_split
from pipelines.finetune import make_loader


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]          # in [0, 1]; per dev split for MNLI (prefixed)
    main_metric: str
    model_bytes: int
    examples: int
    examples_per_s: float
    extra: dict = field(default_factory=dict)

    @property
    def main(self) -> float:
        return self.metrics[self.main_metric]


def glue_metrics(task: GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official GLUE dev metrics; `preds` are class ids (scores for STS-B)."""
    if task.is_regression:
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0])}
    out = {"accuracy": float(accuracy_score(labels, preds))}
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, preds))
    if task.name == "cola":
        out["matthews_corr"] = float(matthews_corrcoef(labels, preds))
    return out


def main_metric_name(spec: GlueTask) -> str:
    """The metric a task is judged by (MNLI: on its matched dev split)."""
    return spec.main_metric if len(spec.dev_splits) == 1 else f"matched_{spec.main_metric}"


def majority_floor(tasks: list[str], data: DataConfig) -> dict[str, tuple[str, float]]:
    """Per classification task, (main metric, points) of always predicting the majority train label."""
    floors = {t: majority_baseline(t, data) for t in tasks}
    return {t: (main_metric_name(check_task(t)), round(100 * v, 2)) for t, v in floors.items() if v is not None}


def majority_baseline(task: str, data: DataConfig) -> float | None:
    """The main dev metric of always predicting the training set's most frequent label: what a model that
    learned nothing scores (RTE accuracy 52.71, MRPC F1 81.22). None for regression (a constant has no
    correlation)."""
    spec = check_task(task)
    if spec.is_regression:
        return None
    guess = np.bincount(np.asarray(load_split(task, "train", data)["label"], dtype=int)).argmax()
    labels = np.asarray(load_split(task, spec.dev_splits[0], data)["label"], dtype=int)
    return glue_metrics(spec, np.full_like(labels, guess), labels)[spec.main_metric]


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, labels and examples/s over a loader."""
    model.eval().to(device)
    preds, labels, n, start = [], [], 0, time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        y = batch.pop("labels")
        logits = model(**batch).logits
        preds.append((logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).float().cpu())
        labels.append(y.float().cpu())
        n += len(y)
    rate = n / max(time.perf_counter() - start, 1e-9)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), rate


def evaluate_model(model: torch.nn.Module, tokenizer, task: str, data: DataConfig, cfg: EvaluateConfig,
                   model_bytes: int | None = None, device: str | None = None) -> EvalResult:
    """Evaluate an in-memory model on every dev split of `task`."""
    spec = check_task(task)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics, total, rates, predicted = {}, 0, [], set()
    for split in spec.dev_splits:
        loader = make_loader(str(tokenized_split(task, split, tokenizer, data)), tokenizer,
                             cfg.batch_size, shuffle=False, seed=0)
        preds, labels, rate = predict(model, loader, device)
        labels = labels if spec.is_regression else labels.astype(int)
        preds = preds if spec.is_regression else preds.astype(int)
        prefix = "" if len(spec.dev_splits) == 1 else split.replace("dev_", "") + "_"
        metrics.update({prefix + k: v for k, v in glue_metrics(spec, preds, labels).items()})
        total, rates = total + len(labels), rates + [rate]
        if not spec.is_regression:
            predicted |= set(preds.tolist())
    extra = {} if spec.is_regression else {"predicted_classes": len(predicted)}
    if len(predicted) == 1:  # a fine-tune that learned nothing scores the majority class, silently
        print(f"[evaluate {task}] WARNING: the model predicts label {predicted.pop()} for all {total} dev examples: "
              "it learned nothing. Try another lr or seed (PEFT methods on small pair tasks such as RTE: "
              "prequant.train_norms=true).")
    return EvalResult(task=task, metrics=metrics, main_metric=main_metric_name(spec),
                      model_bytes=model_bytes if model_bytes is not None else models.param_bytes(model),
                      examples=total, examples_per_s=float(np.mean(rates)), extra=extra)


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_any(checkpoint: str | Path):
    """(model, tokenizer, bytes) of an FP checkpoint or a packed low-bit export (rtn, mrem, prequant)."""
    path = Path(checkpoint)
    if (path / "prequant.json").exists():
        from pipelines.prequant import load_prequant_checkpoint

        model, tokenizer, meta = load_prequant_checkpoint(path)
        return model, tokenizer, meta["bytes"]
    if (path / "quant_config.json").exists():
        from pipelines.rtn import load_packed_checkpoint
        from quant import model_bytes

        model, tokenizer = load_packed_checkpoint(path)
        return model, tokenizer, model_bytes(path)
    model, tokenizer, _ = models.load_checkpoint(path)
    return model, tokenizer, checkpoint_bytes(path)


def evaluate(checkpoint: str | Path, task: str, data: DataConfig, cfg: EvaluateConfig) -> EvalResult:
    """Evaluate a checkpoint folder: FP (`finetune`) or a packed export (`rtn`, `mrem`, `prequant`)."""
    model, tokenizer, nbytes = load_any(checkpoint)
    return evaluate_model(model, tokenizer, task, data, cfg, model_bytes=nbytes)
