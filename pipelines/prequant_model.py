"""PreQuant's model side, shared by the stages prequant-quantize and prequant-finetune.

prequant-quantize quantizes the *pre-trained* model once (`quantize_pretrained`): every Linear
weight is quantized except r input columns per matrix that an outlier criterion keeps FP
(quant.prequant); the task head is dropped, so every task starts from the same stored model.

prequant-finetune (Ray Train, `train_loop`) loads that model with a fresh task head and trains
only the method's parameters; the quantized weights are frozen (no gradient, no optimizer state).

Methods (`prequant.methods`):
  prequant  FP outlier columns (prequant.criterion) + head [+ biases/LayerNorm: train_norms]
  random    the same with random columns (ablation)
  lora      LoRA (peft) on the plain low-bit base (no FP columns), ranks sized to the same budget
  bitfit    all biases + head on the plain low-bit base
  (fp and rtn are the stages finetune/evaluate and rtn.)
Every method also trains `prequant.head_modules` (FP Linears that belong to the task head).
"""
from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from ray.train.torch import prepare_data_loader, prepare_model
from transformers import AutoConfig, PreTrainedModel

from pipelines import checkpoints, lora, models
from pipelines.config import ConfigError, FinetuneConfig, PrequantConfig
from pipelines.lm_data import corpus_path
from pipelines.training import make_loader, make_optimizer, memory_stats, run_loop
from quant import QuantConfig, calibrate, prequant
from quant.layers import is_conv1d

PEFT_METHODS = ("prequant", "random", "lora", "bitfit")  # trained by prequant-finetune


def artefact_criterion(method: str, pcfg: PrequantConfig) -> str | None:
    """The outlier criterion of the stored model `method` starts from (None: plain low-bit weights)."""
    if method in ("lora", "bitfit"):
        return None
    return "random" if method == "random" else pcfg.criterion


def method_label(method: str, pcfg: PrequantConfig) -> str:
    """prequant with a criterion other than the default says which (prequant-activation)."""
    return f"prequant-{pcfg.criterion}" if method == "prequant" and pcfg.criterion != "weight" else method


def quant_name(quant: str, pcfg: PrequantConfig) -> str:
    """The canonical QuantConfig with the configured weight quantizer applied."""
    return str(prequant.with_quantizer(quant, pcfg.quantizer))


def needs_calibration(criterion: str | None, pcfg: PrequantConfig) -> bool:
    """Whether quantizing reads calibration text (GPTQ, or a criterion on activations)."""
    return pcfg.gptq or (criterion is not None and prequant.CRITERIA[criterion].needs_activations)


def head_module_param(patterns: list[str] | tuple) -> Callable[[str], bool]:
    """Whether a parameter name belongs to one of the `head_modules` Linears."""
    return lambda n: any(fnmatch.fnmatchcase(n.rsplit(".", 1)[0], p) for p in patterns)


def check_head_modules(model: torch.nn.Module, patterns: list[str] | tuple) -> None:
    """Every pattern names a Linear (or GPT-2's Conv1D, a Linear stored [in, out])."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in linears):
            raise ConfigError(f"prequant.head_modules: {p!r} matches no Linear of the model; its Linears are "
                              f"named like {linears[0]!r} ... {linears[-1]!r}")


def calibration_sentences(corpus: str, n: int) -> list[str]:
    """The first `n` sentences (>= 5 words) of an unlabelled text corpus."""
    out = []
    for line in corpus_path(corpus).read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("="):  # WikiText headings
            continue
        for sentence in line.split(" . "):
            if len(sentence.split()) >= 5:
                out.append(sentence.strip())
                if len(out) == n:
                    return out
    return out


def input_statistics(model: torch.nn.Module, tokenizer, pcfg: PrequantConfig, names: list[str]) -> dict:
    """Per Linear its input's max |x_j| ("absmax") and, for GPTQ, X^T X ("hessian") on the calib_* text."""
    # One sentence per batch: no padding tokens in the statistics.
    batches = (tokenizer(s, truncation=True, max_length=pcfg.calib_max_length, return_tensors="pt")
               for s in calibration_sentences(pcfg.calib_corpus, pcfg.calib_samples))
    return prequant.input_stats(model, names, batches, hessian=pcfg.gptq)


def quantize_pretrained(model_name: str, quant: str, criterion: str | None,
                        pcfg: PrequantConfig) -> tuple[PreTrainedModel, object, dict]:
    """The pre-trained model quantized with FP outlier columns by `criterion` (None: plain low-bit):
    (model, tokenizer, meta). Bad head_modules fail before the calibration statistics."""
    clf = models.load_classifier(model_name, 2, seed=pcfg.seed)  # the head is not saved: task-agnostic
    tokenizer = models.load_tokenizer(model_name)
    train_norms = pcfg.train_norms and criterion is not None
    reserved = sum(p.numel() for _, p in prequant.trainable_selection(
        clf, outliers=False, biases=True, norms=True, head=False)) if train_norms else 0
    check_head_modules(clf, pcfg.head_modules)
    ocfg = prequant.OutlierConfig(quant_name(quant, pcfg), criterion, pcfg.budget_pct / 100, reserved, pcfg.seed,
                                  skip=list(pcfg.head_modules))
    stats = {}
    if needs_calibration(criterion, pcfg):
        stats = input_statistics(clf, tokenizer, pcfg, prequant.targets(clf, ocfg))
    report = prequant.prequantize(clf, ocfg, {n: s["absmax"] for n, s in stats.items()},
                                  {n: s["hessian"] for n, s in stats.items()} if pcfg.gptq else None)
    used = report.outlier_params + reserved
    meta = {"model": model_name, "quant": str(ocfg.quant), "criterion": criterion, "gptq": pcfg.gptq,
            "budget_pct": pcfg.budget_pct if criterion else None, "train_norms": train_norms,
            "head_modules": list(pcfg.head_modules), "outlier_params": report.outlier_params,
            "reserved_params": reserved, "body_params": report.body_params, "budget_params": used,
            "budget_pct_used": 100.0 * used / report.body_params if criterion else 0.0}
    return clf, tokenizer, meta


def set_trainable(model: torch.nn.Module, method: str, train_norms: bool, head_modules: list[str] | tuple = ()
                  ) -> list[str]:
    """Freeze all but `method`'s parameters (and the task head, head_modules included); the trainable names."""
    head = head_module_param(head_modules)
    if method == "lora":
        return prequant.mark_trainable(model, outliers=False, extra=lambda n: "lora_" in n or head(n))
    if method == "bitfit":
        return prequant.mark_trainable(model, outliers=False, biases=True, extra=head)
    return prequant.mark_trainable(model, outliers=True, biases=train_norms, norms=train_norms, extra=head)


def artefact_lora(artefact: str | Path, pcfg: PrequantConfig) -> dict:
    """The LoRA adapters of the stored model's Linears within the budget: {"ranks", "scaling"}."""
    ranks = lora.lora_ranks(prequant.read_manifest(artefact)["modules"],
                            checkpoints.read_meta(artefact)["body_params"], pcfg.budget_pct)
    return {"ranks": ranks, "scaling": pcfg.lora_scaling}


def build_model(artefact: str | Path, num_labels: int, method: str, pcfg: PrequantConfig, seed: int,
                pad_token_id: int | None, pooling: str = "cls") -> torch.nn.Module:
    """The stored low-bit model with a fresh task head (reading the sequence by `pooling`), set up for `method`."""
    torch.manual_seed(seed)  # the head's initialisation
    hf = AutoConfig.from_pretrained(str(artefact), **models.label_kwargs(num_labels, pad_token_id))
    model = models.classifier_from_config(hf, pooling)
    prequant.to_skeleton(model, artefact)
    if method == "lora":
        adapters = artefact_lora(artefact, pcfg)
        lora.apply_lora(model, adapters["ranks"], adapters["scaling"])
    prequant.load_prequantized(model, artefact, allow_missing=lambda k: prequant.is_head(k, model) or "lora_" in k)
    set_trainable(model, method, pcfg.train_norms, checkpoints.read_meta(artefact)["head_modules"])
    return model


def train_stats(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Trainable parameters (% of the model's, adapters and FP columns not counted in the
    denominator: they add to or replace existing weights), optimizer state, peak memory."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".outlier") and "lora_" not in n)
    return {"trainable_params": n_trainable, "model_params": base, "trainable_pct": 100.0 * n_trainable / base,
            "trainable_names": trainable, "optimizer_state_names": sorted(names[id(p)] for p in optimizer.state),
            **memory_stats(optimizer)}


def calibrate_inputs(model: torch.nn.Module, loader, batches: int) -> None:
    """Input ranges of the quantized layers (QuantConfigs with aN) on this task's data, fixed
    before training: the stored model is task-agnostic, activation ranges are not."""
    with calibrate(model):
        for _, batch in zip(range(batches), loader):
            model(**{k: v for k, v in batch.items() if k != "labels"})


def setup(cfg: dict, ft: FinetuneConfig) -> tuple:
    """pipelines.training.run_loop's setup hook: the method's model, loader and optimizer on a worker."""
    pcfg = PrequantConfig(**cfg["prequant"])
    tokenizer = models.load_tokenizer(cfg["model"])
    model = build_model(cfg["artefact"], cfg["num_labels"], cfg["method"], pcfg, ft.seed, tokenizer.pad_token_id,
                        ft.pooling)
    if QuantConfig.parse(cfg["quant"]).act is not None:
        calib_loader = make_loader(cfg["train_path"], tokenizer, ft.batch_size, False, ft.seed)
        calibrate_inputs(model, calib_loader, cfg["act_calib_batches"])
    loader = prepare_data_loader(make_loader(cfg["train_path"], tokenizer, ft.batch_size, True, ft.seed))
    model = prepare_model(model)
    total = max(1, math.ceil(ft.epochs * len(loader)))
    optimizer, scheduler = make_optimizer(model, ft, total)
    return tokenizer, model, loader, optimizer, scheduler, total


def export(cfg: dict, model, tokenizer, directory: str, meta: dict, optimizer) -> None:
    """run_loop's save hook: packed low-bit weights + FP outlier columns (+ LoRA adapters in meta["lora"])."""
    meta = {**meta, "method": cfg["method"], "quant": cfg["quant"], "artefact": cfg["artefact"],
            **train_stats(model, optimizer)}
    if cfg["method"] == "lora":
        meta["lora"] = artefact_lora(cfg["artefact"], PrequantConfig(**cfg["prequant"]))
    checkpoints.write(model, tokenizer, directory, meta, fmt="prequant")


def train_loop(cfg: dict) -> None:
    """Runs on each Ray Train worker: the shared loop with the method's model and export."""
    run_loop(cfg, setup, functools.partial(export, cfg))
