"""Scoring a model on any task: GLUE dev metrics (scikit-learn/scipy) and the majority-class floor, or the
perplexity of a language-modelling task (`pipelines.lm_eval`); the report row; calibration batches; the checks
of a run's inputs before any work; and the round-to-nearest conversion the stages that quantize share (rtn,
mrem's baseline). Code that differs between the task kinds branches here, on `check_task(task).kind`."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipelines import checkpoints, lm_eval, models
from pipelines.config import DataConfig, EvaluateConfig, RunConfig
from pipelines.data import check_data, examples, glue_task, tokenized_split
from pipelines.errors import ConfigError
from pipelines.part_loader import weight_files
from pipelines.partition import UnsupportedModel, find_blocks
from pipelines.tasks import GlueTask, check_task
from pipelines.training import make_loader
from quant import QuantConfig, calibrate, find_targets, quantize_model

FP_BITS = 32


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]          # GLUE: in [0, 1], per dev split for MNLI (prefixed); LM: ppl, nll
    main_metric: str
    model_bytes: int
    examples: int
    examples_per_s: float
    extra: dict = field(default_factory=dict)
    device: str = "cpu"                # where the model ran (cuda when this process sees a GPU)

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


def majority_floor(tasks: list[str], data: DataConfig, seed: int = 42) -> dict[str, tuple[str, float]]:
    """Per classification task, (main metric, points) of always predicting the majority train label
    (language-modelling tasks have none)."""
    floors = {t: majority_baseline(t, data, seed) for t in tasks if check_task(t).kind == "glue"}
    return {t: (main_metric_name(check_task(t)), round(100 * v, 2)) for t, v in floors.items() if v is not None}


def majority_baseline(task: str, data: DataConfig, seed: int = 42) -> float | None:
    """The main dev metric of always predicting the most frequent label of the training examples the run uses:
    what a model that learned nothing scores, on the same dev examples as the models' metric (the first
    data.eval_examples, see data.examples; the whole split would be another number). None for regression (a
    constant has no correlation)."""
    spec = glue_task(task)
    if spec.is_regression:
        return None
    guess = np.bincount(np.asarray(examples(task, "train", data, seed)["label"], dtype=int)).argmax()
    labels = np.asarray(examples(task, spec.dev_splits[0], data)["label"], dtype=int)
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
    """Evaluate an in-memory model on every dev split of a GLUE `task`, or its perplexity on an LM task's text."""
    spec = check_task(task)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.kind == "lm":
        return evaluate_lm(model, tokenizer, task, data, cfg, model_bytes, device)
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
        extra["warning"] = (f"the model predicts label {predicted.pop()} for all {total} dev examples: "
                            "it learned nothing. Try another lr or seed (PEFT methods on small pair tasks such "
                            "as RTE: prequant.train_norms=true).")
        print(f"[evaluate {task}] WARNING: {extra['warning']}")
    return EvalResult(task=task, metrics=metrics, main_metric=main_metric_name(spec),
                      model_bytes=model_bytes if model_bytes is not None else models.param_bytes(model),
                      examples=total, examples_per_s=float(np.mean(rates)), extra=extra, device=device)


def evaluate_lm(model: torch.nn.Module, tokenizer, task: str, data: DataConfig, cfg: EvaluateConfig,
                model_bytes: int | None = None, device: str = "cpu") -> EvalResult:
    """Perplexity on an LM task's evaluation text (lm_eval.perplexity); its examples are the windows."""
    p = lm_eval.perplexity(model, tokenizer, task, data, cfg, device)
    extra = {"context": p.context, "windows": p.windows, "tokens": p.tokens, "text_tokens": p.text_tokens,
             "tokens_per_s": p.tokens / max(p.seconds, 1e-9)}
    return EvalResult(task=task, metrics={"ppl": p.ppl, "nll": p.nll}, main_metric="ppl",
                      model_bytes=model_bytes if model_bytes is not None else models.param_bytes(model),
                      examples=p.windows, examples_per_s=p.windows / max(p.seconds, 1e-9), extra=extra,
                      device=device)


def eval_metrics(result: EvalResult) -> dict[str, float]:
    """What a stage logs of an evaluation (its MLflow metrics)."""
    return {**{f"eval_{k}": v for k, v in result.metrics.items()}, "model_bytes": result.model_bytes,
            "eval_examples_per_s": result.examples_per_s}


def weight_bits(quant: str | None) -> float:
    """Bits per weight of a QuantConfig (ternary: log2 3), 32 for FP."""
    if quant is None:
        return FP_BITS
    w = QuantConfig.parse(quant).weight
    return FP_BITS if w is None else (1.58 if w.scheme == "ternary" else w.bits)


def report_row(task: str, method: str, result: EvalResult, wall_s: float, quant: str | None,
               trainable_pct: float, resources: dict) -> dict:
    """A stage's line of the comparison report: the main metric in points (GLUE) or as is (perplexity);
    cpu_s/gpu_s: wall time times the CPUs/GPUs it reserved."""
    scale = 1 if check_task(task).kind == "lm" else 100
    return {"task": task, "method": method, "metric": result.main_metric, "value": round(scale * result.main, 2),
            "model_MB": round(result.model_bytes / 2**20, 2), "examples_per_s": round(result.examples_per_s, 1),
            "wall_s": round(wall_s, 1), "metrics": result.metrics, "bits": weight_bits(quant),
            "trainable_pct": round(trainable_pct, 3), "cpu_s": round(wall_s * resources.get("cpus", 0), 1),
            "gpu_s": round(wall_s * resources.get("gpus", 0), 1)}


def calibration_batches(task: str, tokenizer, data: DataConfig, n: int, batch_size: int, seed: int = 0):
    """Model-input batches: the first `n` shuffled training examples of a GLUE `task`, or `n` random windows of
    data.max_length tokens of an LM task's calibration text (lm_eval.calibration_batches)."""
    if check_task(task).kind == "lm":
        yield from lm_eval.calibration_batches(task, tokenizer, data, n, batch_size, seed)
        return
    calib = dataclasses.replace(data, train_examples=n)
    loader = make_loader(str(tokenized_split(task, "train", tokenizer, calib, seed=seed)), tokenizer,
                         batch_size, shuffle=False, seed=seed)
    for batch in loader:
        batch.pop("labels")
        yield batch


@torch.no_grad()
def quantize_rtn(model: torch.nn.Module, qcfg: QuantConfig, batches) -> int:
    """Convert in place to round-to-nearest fake quantization and calibrate activation ranges on
    `batches`; returns the number of layers converted."""
    report = quantize_model(model, qcfg)
    model.eval()
    with calibrate(model):
        for batch in batches:
            model(**batch)
    return len(report.converted)


def task_fragment(task: str) -> dict:
    """What a stage key holds of its task beyond the name: an LM task's texts (lm_eval.text_identity)."""
    return {"text": lm_eval.text_identity(task)} if check_task(task).kind == "lm" else {}


def check_inputs(cfg: RunConfig, model: str) -> None:
    """Before any work, for a run that starts from `model` (cfg.model, or a checkpoint given to a verb): the model
    folder and its weight files, GLUE split files, the context against the model's positions, LM texts and their
    token counts, and that grouped QuantConfigs fit the model's layers."""
    models.check_model(model, "model" if model == cfg.model else "checkpoint")
    for task in cfg.tasks:
        if check_task(task).kind == "glue":
            check_data(task, cfg.data)
    models.check_max_length(model, cfg.data.max_length)
    lm_eval.check_lm_tasks(cfg, model)
    check_group_sizes(model, "rtn", cfg.rtn.quant)
    check_group_sizes(model, "gptq", cfg.gptq.quant)
    check_group_sizes(model, "mrem", cfg.mrem.quant)
    if cfg.mrem.quant:
        check_splittable(model)


def check_splittable(model: str) -> None:
    """Before any work: MREM finds `model`'s stack of blocks (a skeleton built on the meta device from its
    config), and a given checkpoint folder holds FP safetensors weights its module actors can read."""
    config = models.model_config(model)
    with torch.device("meta"):
        skeleton = models.from_config(config.__class__.from_dict(config.to_dict()))
    try:
        find_blocks(skeleton)
    except UnsupportedModel as err:
        raise ConfigError(f"mrem.quant: model {model}: {err}; set mrem.quant=[] for this model") from None
    if Path(model).is_dir() and (Path(model) / checkpoints.META_FILE).is_file():
        fmt = checkpoints.read_meta(model)["format"]
        if fmt != "fp":
            raise ConfigError(f"mrem: {model} is a {fmt!r} checkpoint; MREM starts from an FP model (e.g. "
                              "<output_dir>/<task>/finetune/model)")
        try:
            weight_files(Path(model))
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None


def _input_width(layer: torch.nn.Module) -> int:
    """The size of the dim weight groups run along: a Linear's inputs (Conv1D stores [in, out]), an
    embedding's width."""
    if isinstance(layer, torch.nn.Embedding):
        return layer.embedding_dim
    return layer.in_features if isinstance(layer, torch.nn.Linear) else layer.weight.shape[0]


def check_group_sizes(model: str, section: str, quants: list[str]) -> None:
    """Before any work: each weight group size in `quants` divides the input width of every layer it quantizes
    in `model` (built on the meta device from its config: no weights are read)."""
    grouped = [(i, q, QuantConfig.parse(q)) for i, q in enumerate(quants)]
    grouped = [g for g in grouped if any(s is not None and s.granularity == "group"
                                         for s in (g[2].weight, g[2].embedding))]
    if not grouped:
        return
    config = models.model_config(model)
    with torch.device("meta"):
        skeleton = models.from_config(config.__class__.from_dict(config.to_dict()))
    for i, q, qcfg in grouped:
        layers = {name: skeleton.get_submodule(name) for name in find_targets(skeleton, qcfg)[0]}
        widths = sorted({_input_width(m) for m in layers.values()})
        for name, layer in layers.items():
            spec = qcfg.embedding if isinstance(layer, torch.nn.Embedding) else qcfg.weight
            if spec is not None and spec.granularity == "group" and _input_width(layer) % spec.group_size:
                raise ConfigError(f"{section}.quant[{i}]={q!r}: groups of {spec.group_size} weights do not divide "
                                  f"the input width {_input_width(layer)} of {name}; the layers it quantizes in "
                                  f"{model} have input widths {widths}: use a group size that divides "
                                  f"{math.gcd(*widths)} (e.g. g{math.gcd(*widths)})")
