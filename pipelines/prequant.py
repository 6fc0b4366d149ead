"""Stages `prequant-quantize` and `prequant-finetune`: PreQuant (Gong et al., Findings of ACL 2023).

prequant-quantize (task-agnostic, once per model x QuantConfig x criterion x budget): every
Linear weight of the *pre-trained* model is quantized (quantizer: per-row or per-tensor,
min-max or MSE clipping; rounding: nearest or GPTQ on unlabelled text) except r input columns
per matrix chosen by an outlier criterion (quant.outliers.CRITERIA) and kept FP; r follows
from the budget. The result (packed low-bit weights + FP outlier columns + indices,
safetensors, manifest) is stored under `prequant.dir` keyed by those inputs and reused by
every task.

prequant-finetune (per task, Ray Train through finetune.run_loop): loads the stored model,
adds a fresh task head and trains only the method's parameters; the quantized weights are
frozen (no gradient, no optimizer state). Exports one low-bit model and evaluates it.

Methods (`prequant.methods`; one config runs them all):
  fp        full FP fine-tuning (stage finetune)       rtn     fine-tune FP, then RTN (stage rtn)
  prequant  FP outlier columns (prequant.criterion) + head [+ biases/LayerNorm: train_norms]
  random    the same with random columns (ablation)
  lora      LoRA (peft) on the plain low-bit base (no FP columns), ranks sized to the same budget
  bitfit    all biases + head on the plain low-bit base
Every method also trains `prequant.head_modules` (FP Linears that belong to the task head).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from ray.train.torch import prepare_data_loader, prepare_model

from pipelines import models
from pipelines.cluster import ensure_ray
from pipelines.config import ConfigError, DataConfig, EvaluateConfig, FinetuneConfig, PrequantConfig
from pipelines.data import check_task, tokenized_split
from pipelines.finetune import fit_to_dir, make_loader, make_optimizer, memory_stats, run_loop
from quant import QuantConfig, calibrate
from quant import outliers as ol

if TYPE_CHECKING:
    from pipelines.evaluate import EvalResult

PEFT_METHODS = ("prequant", "random", "lora", "bitfit")  # trained by prequant-finetune


@dataclass(frozen=True)
class ArtefactSpec:
    """Everything that decides a pre-quantized model; its hash is the storage key."""
    model: str
    quant: str                    # canonical QuantConfig, quantizer applied
    criterion: str | None         # None: no FP columns (the base of lora/bitfit)
    budget_pct: float | None
    train_norms: bool
    seed: int
    calib: tuple | None           # (corpus, samples, max_length) for criterion=activation and gptq
    head_modules: tuple = ()      # Linears kept FP: trained per task as part of the head
    gptq: bool = False            # GPTQ rounding (calib: its text) instead of round-to-nearest
    weights: str | None = None    # a local model folder's checkpoint_identity: new weights there, new key
    column_blocks: int | None = None  # FP columns only in the last N blocks

    @property
    def key(self) -> str:
        ident = asdict(self)
        for name in ("gptq", "weights", "column_blocks"):  # keys of models stored before these existed stay valid
            if not ident[name]:
                del ident[name]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def directory(self, root: str | Path) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model).strip("-")[-60:]
        short = QuantConfig.parse(self.quant).short_name()
        return Path(root).resolve() / slug / f"{short}-{self.criterion or 'plain'}-{self.key}"


def artefact_spec(model: str, quant: str, pcfg: PrequantConfig, method: str = "prequant") -> ArtefactSpec:
    """The stored model `method` starts from: outliers by the configured criterion, random
    columns, or (lora/bitfit) plain low-bit weights."""
    qcfg = str(ol.with_quantizer(quant, pcfg.quantizer))
    head = tuple(pcfg.head_modules)
    text = (pcfg.calib_corpus, pcfg.calib_samples, pcfg.calib_max_length)
    weights = models.checkpoint_identity(model) if Path(model).is_dir() else None  # names and presets: None
    if method in ("lora", "bitfit"):
        return ArtefactSpec(model, qcfg, None, None, False, pcfg.seed, text if pcfg.gptq else None, head, pcfg.gptq,
                            weights)
    criterion = "random" if method == "random" else pcfg.criterion
    calib = text if pcfg.gptq or ol.CRITERIA[criterion].needs_activations else None
    return ArtefactSpec(model, qcfg, criterion, pcfg.budget_pct, pcfg.train_norms, pcfg.seed, calib, head, pcfg.gptq,
                        weights, pcfg.column_blocks)


def head_module_param(patterns: list[str] | tuple) -> Callable[[str], bool]:
    """Whether a parameter name belongs to one of the `head_modules` Linears."""
    return lambda n: any(fnmatch.fnmatchcase(n.rsplit(".", 1)[0], p) for p in patterns)


def check_head_modules(model: torch.nn.Module, patterns: list[str] | tuple) -> None:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in linears):
            raise ConfigError(f"prequant.head_modules: {p!r} matches no Linear of the model; its Linears are "
                              f"named like {linears[0]!r} ... {linears[-1]!r}")


def artefact_root(pcfg: PrequantConfig, output_dir: str | Path) -> Path:
    return Path(pcfg.dir or Path(output_dir) / "prequant").resolve()


@dataclass
class QuantizeResult:
    directory: str
    key: str
    quant_config: str
    criterion: str | None
    reused: bool
    outlier_params: int
    body_params: int
    budget_params: int             # outlier columns + biases/LayerNorm when train_norms
    budget_pct_used: float
    packed_bytes: int
    wall_s: float


def calibration_sentences(corpus: str, n: int) -> list[str]:
    """The first `n` sentences (>= 5 words) of an unlabelled text corpus."""
    from pipelines.lm_data import corpus_path

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


def _input_stats(model, tokenizer, spec: ArtefactSpec, names: list[str]) -> dict:
    """Per Linear its input's max |x_j| (criterion=activation) and, for GPTQ, X^T X."""
    corpus, n, max_length = spec.calib
    # One sentence per batch: no padding tokens in the statistics.
    batches = (tokenizer(s, truncation=True, max_length=max_length, return_tensors="pt")
               for s in calibration_sentences(corpus, n))
    return ol.input_stats(model, names, batches, hessian=spec.gptq)


def _quantize_result(directory: Path, manifest: dict, reused: bool, wall_s: float) -> QuantizeResult:
    m = manifest
    return QuantizeResult(str(directory), m["key"], m["quant"], m["criterion"], reused, m["outlier_params"],
                          m["body_params"], m["budget_params"], m["budget_pct_used"], m["bytes"], wall_s)


def prequant_quantize(model: str, quant: str, pcfg: PrequantConfig, root: str | Path,
                      method: str = "prequant") -> QuantizeResult:
    """Quantize the pre-trained `model` for `method` once; later calls reuse the stored result."""
    pcfg.validate()
    spec = artefact_spec(model, quant, pcfg, method)
    directory = spec.directory(root)
    done = models.finished_meta(directory, spec.key, ol.MANIFEST_FILE, "key")
    if done:
        print(f"[prequant-quantize] {directory} is up to date; reusing it")
        return _quantize_result(directory, done, True, 0.0)
    start = time.time()
    clf = models.load_classifier(model, 2, seed=spec.seed)  # the head is dropped below: task-agnostic
    tokenizer = models.load_tokenizer(model)
    reserved = sum(p.numel() for _, p in ol.trainable_selection(clf, outliers=False, biases=True, norms=True,
                                                                head=False)) if spec.train_norms else 0
    check_head_modules(clf, spec.head_modules)
    ocfg = ol.OutlierConfig(spec.quant, spec.criterion, (spec.budget_pct or 0) / 100, reserved, spec.seed,
                            skip=list(spec.head_modules), column_blocks=spec.column_blocks)
    names = ol.targets(clf, ocfg)
    ol.column_targets(names, ocfg)  # a bad column_blocks fails before the statistics
    stats = _input_stats(clf, tokenizer, spec, names) if spec.calib else {}
    report = ol.prequantize(clf, ocfg, {n: s["absmax"] for n, s in stats.items()},
                            {n: s["hessian"] for n, s in stats.items()} if spec.gptq else None)
    used = report.outlier_params + reserved
    meta = {"key": spec.key, "spec": asdict(spec), "model": model, "quant": spec.quant, "criterion": spec.criterion,
            "gptq": spec.gptq,
            "budget_pct": spec.budget_pct, "train_norms": spec.train_norms, "outlier_params": report.outlier_params,
            "reserved_params": reserved, "body_params": report.body_params, "budget_params": used,
            "budget_pct_used": 100.0 * used / report.body_params if spec.criterion else 0.0}
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ol.save_outlier_model(clf, tmp, meta, drop=ol.is_head)
    clf.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    print(f"[prequant-quantize] {spec.quant}{' gptq' if spec.gptq else ''} {spec.criterion or 'plain'}: "
          f"{report.outlier_params} outlier params "
          f"({meta['budget_pct_used']:.3f}% with reserved) -> {directory}")
    return _quantize_result(directory, ol.read_manifest(directory), False, time.time() - start)


def require_artefact(model: str, quant: str, pcfg: PrequantConfig, root: str | Path, method: str) -> Path:
    """The stored model `method` needs, or a FileNotFoundError that says how to make it."""
    spec = artefact_spec(model, quant, pcfg, method)
    directory = spec.directory(root)
    if not models.finished_meta(directory, spec.key, ol.MANIFEST_FILE, "key"):
        raise FileNotFoundError(
            f"no pre-quantized model for model={model} quant={spec.quant} criterion={spec.criterion or 'plain'} "
            f"budget={spec.budget_pct}% (expected {directory}); run `plmq prequant-quantize` with the same "
            "config first")
    return directory

# ---------------------------------------------------------------- the model per method


def lora_ranks(manifest: dict, budget_pct: float) -> dict[str, int]:
    """LoRA rank per quantized Linear so that the adapters hold the budget's parameters."""
    shapes = {n: info["shape"] for n, info in manifest["modules"].items()}
    target = int(budget_pct / 100 * manifest["body_params"])
    return ol.allocate({n: o + i for n, (o, i) in shapes.items()}, {n: min(o, i) for n, (o, i) in shapes.items()},
                       target)


def apply_lora(model: torch.nn.Module, ranks: dict[str, int], scaling: float) -> None:
    """peft LoRA adapters (alpha = scaling * r) on the named layers, injected in place."""
    from peft import LoraConfig, inject_adapter_in_model

    ranks = {n: r for n, r in ranks.items() if r > 0}
    base = max(set(ranks.values()), key=list(ranks.values()).count)
    cfg = LoraConfig(r=base, lora_alpha=scaling * base, target_modules=list(ranks), lora_dropout=0.0,
                     rank_pattern={re.escape(n): r for n, r in ranks.items()},
                     alpha_pattern={re.escape(n): scaling * r for n, r in ranks.items()})
    inject_adapter_in_model(cfg, model)


def set_trainable(model: torch.nn.Module, method: str, train_norms: bool, head_modules: list[str] | tuple = ()
                  ) -> list[str]:
    head = head_module_param(head_modules)
    if method == "lora":
        return ol.mark_trainable(model, outliers=False, extra=lambda n: "lora_" in n or head(n))
    if method == "bitfit":
        return ol.mark_trainable(model, outliers=False, biases=True, extra=head)
    return ol.mark_trainable(model, outliers=True, biases=train_norms, norms=train_norms, extra=head)


def _skeleton(directory: Path, pooling: str | None = None, **hf_kwargs) -> torch.nn.Module:
    from transformers import AutoConfig

    return models.classifier_from_config(AutoConfig.from_pretrained(str(directory), **hf_kwargs), pooling)


def build_model(artefact: str | Path, num_labels: int, method: str, pcfg: PrequantConfig, seed: int,
                pad_token_id: int | None, pooling: str = "cls") -> torch.nn.Module:
    """The stored low-bit model with a fresh task head (reading the sequence by `pooling`), set up for `method`."""
    torch.manual_seed(seed)  # the head's initialisation
    model = _skeleton(Path(artefact), pooling, **models._label_kwargs(num_labels, pad_token_id))
    manifest = ol.to_skeleton(model, artefact)
    if method == "lora":
        apply_lora(model, lora_ranks(manifest, pcfg.budget_pct), pcfg.lora_scaling)
    ol.load_weights(model, artefact, allow_missing=lambda k: ol.is_head(k) or "lora_" in k)
    set_trainable(model, method, pcfg.train_norms, pcfg.head_modules)
    if pcfg.body_dropout is not None:
        set_body_dropout(model, pcfg.body_dropout)
    return model


def set_body_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout probability `p` in every Dropout of the body (`model.base_model`: not the task head's,
    e.g. BERT's classifier dropout)."""
    for m in model.base_model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def load_prequant_checkpoint(directory: str | Path):
    """A fine-tuned export back as (model, tokenizer, manifest), same outputs as before export."""
    from transformers import AutoTokenizer

    manifest = ol.read_manifest(directory)
    model = _skeleton(Path(directory))
    ol.to_skeleton(model, directory)
    if manifest.get("lora"):
        apply_lora(model, manifest["lora"]["ranks"], manifest["lora"]["scaling"])
    ol.load_weights(model, directory)
    return model.eval(), AutoTokenizer.from_pretrained(str(directory)), manifest

# ---------------------------------------------------------------- Ray Train worker


def train_stats(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Trainable parameters (% of the model's, adapters and FP columns not counted in the
    denominator: they add to or replace existing weights), optimizer state, peak memory."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".outlier") and "lora_" not in n)
    scaled = sum(int((m.outlier_lr < 1).sum()) for _, m in ol.outlier_modules(model))  # scale_outlier_lr
    return {"trainable_params": n_trainable, "model_params": base, "trainable_pct": 100.0 * n_trainable / base,
            "trainable_names": trainable, "optimizer_state_names": sorted(names[id(p)] for p in optimizer.state),
            "scaled_outlier_columns": scaled, **memory_stats(optimizer)}


def unlabelled(loader, batches: int):
    """The first `batches` of `loader` without their labels."""
    for _, batch in zip(range(batches), loader):
        yield {k: v for k, v in batch.items() if k != "labels"}


def calibrate_inputs(model: torch.nn.Module, loader, batches: int) -> None:
    """Input ranges of the quantized layers (QuantConfigs with aN) on this task's data, fixed
    before training: the stored model is task-agnostic, activation ranges are not."""
    with calibrate(model):
        for batch in unlabelled(loader, batches):
            model(**batch)


def _setup(cfg: dict, ft: FinetuneConfig):
    pcfg = PrequantConfig(**cfg["prequant"])
    tokenizer = models.load_tokenizer(cfg["model"])
    model = build_model(cfg["artefact"], cfg["num_labels"], cfg["method"], pcfg, ft.seed, tokenizer.pad_token_id,
                        ft.pooling)
    calib_loader = make_loader(cfg["train_path"], tokenizer, ft.batch_size, False, ft.seed)
    if QuantConfig.parse(cfg["quant"]).act is not None:
        calibrate_inputs(model, calib_loader, cfg["act_calib_batches"])
    if pcfg.scale_outlier_lr:
        factors = ol.set_outlier_lr(model, unlabelled(calib_loader, cfg["act_calib_batches"])).values()
        print(f"[prequant-finetune] scale_outlier_lr: {sum(int((f < 1).sum()) for f in factors)} of "
              f"{sum(f.numel() for f in factors)} FP columns take smaller steps")
    loader = prepare_data_loader(make_loader(cfg["train_path"], tokenizer, ft.batch_size, True, ft.seed))
    model = prepare_model(model)
    total = max(1, math.ceil(ft.epochs * len(loader)))
    head = head_module_param(pcfg.head_modules)
    optimizer, scheduler = make_optimizer(model, ft, total,
                                          lambda n: pcfg.head_lr if ol.is_head(n) or head(n) else None)
    ol.scale_outlier_steps(optimizer, model)  # a no-op unless set_outlier_lr set factors below 1
    return tokenizer, model, loader, optimizer, scheduler, total


def export_finetuned(cfg: dict, model, tokenizer, directory: str, meta: dict, optimizer) -> None:
    """The export: packed low-bit weights + FP outlier columns (+ adapters), HF config, tokenizer."""
    pcfg = PrequantConfig(**cfg["prequant"])
    meta = {**meta, "method": cfg["method"], "quant": cfg["quant"], "artefact": cfg["artefact"],
            "artefact_key": cfg["artefact_key"], **train_stats(model, optimizer)}
    if cfg["method"] == "lora":
        meta["lora"] = {"ranks": lora_ranks(ol.read_manifest(cfg["artefact"]), pcfg.budget_pct),
                        "scaling": pcfg.lora_scaling}
    meta["bytes"] = ol.save_outlier_model(model, directory, meta)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (Path(directory) / models.META_FILE).write_text(json.dumps(meta, indent=2))


def train_loop(cfg: dict) -> None:
    """Runs on each Ray Train worker: finetune's loop with the method's model and export."""
    run_loop(cfg, _setup, functools.partial(export_finetuned, cfg))

# ---------------------------------------------------------------- the stage


@dataclass
class PrequantResult:
    task: str
    method: str
    quant_config: str
    checkpoint: str
    artefact: str
    packed_bytes: int
    trainable_params: int
    trainable_pct: float
    optimizer_state_bytes: int
    peak_rss_mb: float
    steps: int
    train_s: float
    eval: EvalResult
    wall_s: float


def finetune_key(task: str, artefact_key: str, method: str, data: DataConfig, ft: FinetuneConfig,
                 pcfg: PrequantConfig) -> str:
    ident = {"task": task, "artefact": artefact_key, "method": method, "data": asdict(data),
             "finetune": ft.key_fields(),
             "prequant": {"train_norms": pcfg.train_norms, "budget_pct": pcfg.budget_pct,
                          "lora_scaling": pcfg.lora_scaling}}
    for name in ("head_lr", "scale_outlier_lr", "body_dropout"):  # keys of runs from before these existed stay valid
        value = getattr(pcfg, name)
        if value is not None and value is not False:  # body_dropout 0.0 == False, yet it is set
            ident["prequant"][name] = value
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def prequant_finetune(task: str, model: str, quant: str, method: str, data: DataConfig, ft: FinetuneConfig,
                      pcfg: PrequantConfig, eval_cfg: EvaluateConfig, root: str | Path, output_dir: str | Path,
                      run_id: str | None = None, tracking_uri: str | None = None,
                      force: bool = False) -> PrequantResult:
    """Fine-tune `method`'s parameters of the stored low-bit model on `task`; export, evaluate.
    force: retrain even when an identical result is stored (its folder is removed first)."""
    from pipelines.evaluate import evaluate_model  # scipy/sklearn: not needed on the workers

    spec = check_task(task)
    for section in (data, ft, pcfg, eval_cfg):
        section.validate()
    if method not in PEFT_METHODS:
        raise ConfigError(f"method {method!r}: prequant-finetune trains one of {', '.join(PEFT_METHODS)}")
    models.check_pooling(model, ft.pooling)
    artefact = require_artefact(model, quant, pcfg, root, method)  # before any work
    start = time.time()
    akey = ol.read_manifest(artefact)["key"]
    ft = dataclasses.replace(ft, lr=pcfg.lr)
    key = finetune_key(task, akey, method, data, ft, pcfg)
    qname = str(ol.with_quantizer(quant, pcfg.quantizer))
    # One folder per fine-tune key: another lr or recipe (an lr search) never replaces an earlier result.
    out = Path(output_dir).resolve() / f"{method}-{QuantConfig.parse(qname).short_name()}-{akey[:8]}-{key[:8]}"
    if force:
        shutil.rmtree(out, ignore_errors=True)
    done = models.finished_meta(out / "model", key)  # run_loop writes config_key
    if done:
        print(f"[prequant-finetune {task}] {out / 'model'} is up to date (key {key}); skipping")
        train_s = done.get("train_s", 0.0)  # the reused result's own training time
    else:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        ensure_ray()
        train_path = tokenized_split(task, "train", models.load_tokenizer(model), data, seed=ft.seed)
        loop_cfg = {"key": key, "finetune": asdict(ft), "prequant": asdict(pcfg), "model": model, "task": task,
                    "num_labels": spec.num_labels, "train_path": str(train_path), "cpus_per_worker": ft.cpus_per_worker,
                    "run_id": run_id, "tracking_uri": tracking_uri, "label": f"prequant-{method}",
                    "method": method, "quant": qname, "artefact": str(artefact), "artefact_key": akey,
                    "act_calib_batches": max(1, 512 // ft.batch_size)}
        t0 = time.time()
        fit_to_dir(train_loop, loop_cfg, ft, out, f"prequant-{method}-{task}-{key}")
        train_s = time.time() - t0
        models.add_meta(out / "model", train_s=round(train_s, 1))
    qmodel, tokenizer, manifest = load_prequant_checkpoint(out / "model")
    result = evaluate_model(qmodel, tokenizer, task, data, eval_cfg, model_bytes=manifest["bytes"])
    return PrequantResult(task, method, qname, str(out / "model"), str(artefact), manifest["bytes"],
                          manifest["trainable_params"], manifest["trainable_pct"], manifest["optimizer_state_bytes"],
                          manifest["peak_rss_mb"], manifest["steps"], train_s, result, time.time() - start)

# ---------------------------------------------------------------- driver: MLflow runs, all methods


def run_prequant_quantize_stage(cfg, quant: str, method: str = "prequant") -> QuantizeResult:
    """`prequant-quantize` as a nested MLflow run (reuses a stored model when there is one)."""
    import mlflow

    from pipelines import tracking

    spec = artefact_spec(cfg.model, quant, cfg.prequant, method)
    with tracking.stage_run(f"prequant-quantize/{spec.quant}/{spec.criterion or 'plain'}",
                            {"quant": spec.quant, "method": method, "prequant": asdict(cfg.prequant)}):
        r = prequant_quantize(cfg.model, quant, cfg.prequant, artefact_root(cfg.prequant, cfg.output_dir), method)
        mlflow.log_metrics({"outlier_params": r.outlier_params, "budget_params": r.budget_params,
                            "budget_pct_used": r.budget_pct_used, "packed_bytes": r.packed_bytes,
                            "reused": float(r.reused), "wall_s": r.wall_s})
        mlflow.log_dict(asdict(r), "prequant_quantize_result.json")
    return r


def method_label(method: str, pcfg: PrequantConfig) -> str:
    """prequant with a criterion other than the default says which (prequant-activation)."""
    return f"prequant-{pcfg.criterion}" if method == "prequant" and pcfg.criterion != "weight" else method


def run_prequant_finetune_stage(cfg, task: str, quant: str, method: str, force: bool = False) -> PrequantResult:
    """`prequant-finetune` of one method as a nested MLflow run: losses, trainable count and %."""
    import mlflow

    from pipelines import tracking
    from pipelines.run import log_eval

    with tracking.stage_run(f"prequant-finetune/{task}/{method_label(method, cfg.prequant)}-{quant}",
                            {"task": task, "quant": quant, "method": method, "prequant": asdict(cfg.prequant),
                             "finetune": asdict(cfg.finetune)}) as run_id:
        r = prequant_finetune(task, cfg.model, quant, method, cfg.data, cfg.finetune, cfg.prequant, cfg.evaluate,
                              artefact_root(cfg.prequant, cfg.output_dir), Path(cfg.output_dir) / task / "prequant",
                              run_id=run_id, tracking_uri=tracking.tracking_uri(), force=force)
        log_eval(r.eval)
        mlflow.log_metrics({"trainable_params": r.trainable_params, "trainable_pct": r.trainable_pct,
                            "optimizer_state_bytes": r.optimizer_state_bytes, "peak_rss_mb": r.peak_rss_mb,
                            "packed_bytes": r.packed_bytes, "steps": r.steps, "train_s": r.train_s,
                            "wall_s": r.wall_s})
        mlflow.log_dict(asdict(r), "prequant_result.json")
    return r


def check_artefacts(cfg) -> None:
    """Fail before any work when a method's stored model is missing."""
    root = artefact_root(cfg.prequant, cfg.output_dir)
    for quant in cfg.prequant.quant:
        for method in (m for m in cfg.prequant.methods if m in PEFT_METHODS):
            require_artefact(cfg.model, quant, cfg.prequant, root, method)


def run_prequant_task(cfg, task: str, quantize: bool = True) -> list[dict]:
    """Every method of `prequant.methods` x `prequant.quant` on one task; returns table rows.
    quantize=False: the stored models must exist already (prequant-finetune)."""
    from pipelines.run import run_evaluate_stage, run_finetune_stage, run_rtn_stage, table_row

    methods, out, rows = cfg.prequant.methods, Path(cfg.output_dir).resolve(), []
    if not quantize:
        check_artefacts(cfg)
    if "fp" in methods or "rtn" in methods:
        ft = run_finetune_stage(cfg, task, out)
        if "fp" in methods:
            result, eval_s = run_evaluate_stage(cfg, task, ft.checkpoint, "fp")
            rows.append({**table_row(task, "fp", result, ft.wall_s + eval_s), "trainable_pct": 100.0})
        for quant in cfg.prequant.quant if "rtn" in methods else []:
            r = run_rtn_stage(cfg, task, ft.checkpoint, str(ol.with_quantizer(quant, cfg.prequant.quantizer)), out)
            rows.append({**table_row(task, f"rtn-{r.quant_config}", r.eval, r.wall_s), "trainable_pct": 100.0})
    for quant in cfg.prequant.quant:
        for method in (m for m in methods if m in PEFT_METHODS):
            if quantize:
                run_prequant_quantize_stage(cfg, quant, method)
            r = run_prequant_finetune_stage(cfg, task, quant, method)
            rows.append({**table_row(task, f"{method_label(method, cfg.prequant)}-{r.quant_config}", r.eval, r.wall_s),
                         "trainable_pct": round(r.trainable_pct, 3)})
    return rows
