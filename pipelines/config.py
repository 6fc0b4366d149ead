"""Typed run configuration: YAML -> dataclasses, with `key=value` overrides.

Every stage has one config dataclass; `RunConfig` groups them. Unknown keys and
values of the wrong type are rejected with the dotted key in the message, so a
typo in a YAML file fails before any work starts.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config_dict import apply_overrides, from_dict
from pipelines.errors import ConfigError
from pipelines.tasks import check_task
from quant import QuantConfig
from quant.prequant import CRITERIA, WEIGHT_QUANTIZERS

POOLINGS = ("cls", "mean")  # finetune.pooling: what a classifier's head reads (pipelines.models.set_pooling)


def gpu_flag(value: str | bool) -> str:
    """`use_gpu` as auto/true/false; YAML and --set give booleans for true/false."""
    return ("true" if value else "false") if isinstance(value, bool) else value


@dataclass
class DataConfig:
    source: str = "bundled"          # bundled | dir | hub
    dir: str | None = None           # glue_data/-style folder when source == "dir"
    max_length: int = 128            # GLUE: tokens per example; LM tasks: the context (tokens per window)
    train_examples: int | None = None  # first N (shuffled with seed) training rows; None = all
    eval_examples: int | None = None   # first N dev rows (LM tasks: evaluation windows); None = all
    cache_dir: str | None = None       # tokenized Arrow cache; default ~/.cache/plmq

    def validate(self) -> None:
        if self.source not in ("bundled", "dir", "hub"):
            raise ConfigError(f"data.source={self.source!r}: use one of bundled, dir, hub")
        if self.source == "dir" and not self.dir:
            raise ConfigError("data.dir must be set when data.source is 'dir'")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length}: must be >= 8")
        for name in ("train_examples", "eval_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{name}={value}: must be positive or null")


@dataclass
class FinetuneConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 42
    num_workers: int = 1             # Ray Train data-parallel workers
    use_gpu: str | bool = "auto"     # auto | true | false (YAML booleans accepted)
    cpus_per_worker: int = 1
    log_every: int = 20
    # What the classifier head reads: cls ([CLS] token, HF default) | mean (masked mean of the last
    # hidden states through the pooler; BERT family). all-MiniLM-L6-v2 was trained to mean-pool.
    pooling: str = "cls"

    def __post_init__(self) -> None:
        self.use_gpu = gpu_flag(self.use_gpu)

    def validate(self) -> None:
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"finetune.epochs={self.epochs}: must be a finite number > 0, e.g. 3")
        for name in ("batch_size", "num_workers", "cpus_per_worker", "log_every"):
            at_least_one("finetune", name, getattr(self, name))
        if not 0 < self.lr < 1:
            raise ConfigError(f"finetune.lr={self.lr}: expected a small positive number such as 5e-5")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(f"finetune.weight_decay={self.weight_decay}: expected a value in [0, 1), e.g. 0.01")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"finetune.warmup_ratio={self.warmup_ratio}: the share of steps that warm up, "
                              "in [0, 1), e.g. 0.1")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"finetune.use_gpu={self.use_gpu!r}: use auto, true or false")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"finetune.pooling={self.pooling!r}: use {' or '.join(POOLINGS)}")


@dataclass
class EvaluateConfig:
    batch_size: int = 128            # GLUE: examples per forward pass; LM: windows (fewer if logits are large)

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"evaluate.batch_size={self.batch_size}: must be >= 1")


def at_least_one(section: str, name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{section}.{name}={value}: must be >= 1")


def parse_quant_list(section: str, values: list[str], need_weights: str | None = None) -> list:
    """Parse a section's QuantConfig strings; errors name `section.quant[i]`."""
    parsed = []
    for i, q in enumerate(values):
        try:
            cfg = QuantConfig.parse(q)
        except ValueError as err:
            raise ConfigError(f"{section}.quant[{i}]={q!r}: {err}") from None
        if need_weights and cfg.weight is None:
            raise ConfigError(f"{section}.quant[{i}]={q!r}: {need_weights}")
        parsed.append(cfg)
    return parsed


@dataclass
class RtnConfig:
    quant: list[str] = field(default_factory=list)  # QuantConfig strings, e.g. [w8a8, w4a8]; empty = skip
    calib_samples: int = 512         # GLUE: training examples; LM tasks: random windows of data.max_length tokens
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.calib_samples <= 0 or self.batch_size <= 0:
            raise ConfigError("rtn.calib_samples and rtn.batch_size must be >= 1")
        parse_quant_list("rtn", self.quant)


@dataclass
class ExportConfig:
    """Stage `export`: each quantized model (rtn, gptq, mrem) also written in formats other runtimes load, and
    evaluated and timed there."""
    formats: list[str] = field(default_factory=list)  # onnx, compressed-tensors; empty = skip
    act_type: str = "uint8"          # ONNX input codes: uint8 (zero point 128; ONNX Runtime on x86) or int8 (TensorRT)
    runtime: str = "onnxruntime"     # what runs model.onnx: onnxruntime or openvino
    latency_batch: int = 32          # examples per timed forward
    latency_tokens: int = 64         # tokens per example in the timed forward
    latency_runs: int = 10           # timed forwards (the median is reported)

    def validate(self) -> None:
        known = ("onnx", "compressed-tensors")
        bad = [f for f in self.formats if f not in known]
        if bad:
            raise ConfigError(f"export.formats: unknown format(s) {bad}; use onnx and/or compressed-tensors")
        if self.act_type not in ("uint8", "int8"):
            raise ConfigError(f"export.act_type={self.act_type!r}: use uint8 (ONNX Runtime) or int8 (TensorRT)")
        if self.runtime not in ("onnxruntime", "openvino"):
            raise ConfigError(f"export.runtime={self.runtime!r}: use onnxruntime or openvino")
        for name in ("latency_batch", "latency_tokens", "latency_runs"):
            at_least_one("export", name, getattr(self, name))


@dataclass
class GptqConfig:
    """GPTQ post-training quantization (stage `gptq`): the RTN grids, rounded block by block on calibration
    inputs so that each layer's output error shrinks (pipelines/gptq_model.py)."""
    quant: list[str] = field(default_factory=list)  # QuantConfig strings, e.g. [w4g128, w4a8]; empty = skip
    calib_samples: int = 128         # GLUE: training examples; LM tasks: random windows of data.max_length tokens
    batch_size: int = 8
    damp: float = 0.01               # added to the Hessian's diagonal, as a fraction of its mean
    block_size: int = 128            # columns rounded between two lazy batched updates
    seed: int = 0

    def validate(self) -> None:
        for name, example in (("calib_samples", 128), ("batch_size", 8), ("block_size", 128)):
            if getattr(self, name) < 1:
                raise ConfigError(f"gptq.{name}={getattr(self, name)}: must be >= 1, e.g. {example}")
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptq.damp={self.damp}: the Hessian damping as a fraction of its mean diagonal, "
                              "in (0, 1), e.g. 0.01")
        for i, cfg in enumerate(parse_quant_list("gptq", self.quant, "GPTQ rounds weights: quantize them (e.g. "
                                                 "w4g128)")):
            if cfg.weight.scheme != "uniform":
                raise ConfigError(f"gptq.quant[{i}]={self.quant[i]!r}: GPTQ rounds onto uniform grids, not "
                                  f"{cfg.weight.scheme} weights; use 3..8 bits or w2g<N> (e.g. w2g64)")


@dataclass
class E2eConfig:
    """Stage `mrem-e2e`, after each MREM stage: the assembled model's quantizer steps (weights and inputs) trained
    end to end, the weights held as their integer codes (quant.step_tuning); Ray Train, data-parallel."""
    enabled: bool = False
    loss: str = "kl"                 # kl: the FP model's outputs (no labels) | task: labels (GLUE), next token (LM)
    samples: int = 2048              # training examples (GLUE) or text windows (LM) per epoch
    epochs: float = 1.0
    batch_size: int = 16             # examples per step over all workers
    lr: float = 5e-5                 # Adam on the steps, linear warm-up and decay
    warmup_ratio: float = 0.1
    workers: int | None = None       # data-parallel workers (mrem's per-actor resources); null: mrem.modules
    log_every: int = 20
    seed: int = 0

    def validate(self) -> None:
        if self.loss not in ("kl", "task"):
            raise ConfigError(f"mrem.e2e.loss={self.loss!r}: use kl (the FP model's outputs) or task (labels)")
        for name in ("samples", "batch_size", "log_every"):
            at_least_one("mrem.e2e", name, getattr(self, name))
        if self.workers is not None:
            at_least_one("mrem.e2e", "workers", self.workers)
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"mrem.e2e.epochs={self.epochs}: must be a finite number > 0, e.g. 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"mrem.e2e.lr={self.lr}: expected a small positive number such as 5e-5")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"mrem.e2e.warmup_ratio={self.warmup_ratio}: the share of steps that warm up, in [0, 1)")


@dataclass
class MremConfig:
    quant: list[str] = field(default_factory=list)  # QuantConfig strings; empty = skip the stage
    mode: str = "parallel"           # parallel (MREM-P) | sequential (MREM-S) | rem (one module)
    modules: int | None = None       # K; default min(available workers, layers)
    steps: int | None = None         # per module, at most; null: max_passes over the calibration set (in MREM-P
                                     # stretched until a module trained patience x check_every steps on its
                                     # predecessor's final outputs)
    converge: bool = True            # stop each module once its held-out reconstruction loss stops improving
    max_passes: float = 8.0          # the budget when steps is null: passes over the calibration rows it trains on
    min_passes: float = 1.5          # converge: no module stops before (teacher forcing fades out over them)
    check_every: int = 50            # converge: steps between held-out checks
    patience: int = 2                # converge: checks without a `tolerance` improvement that make a plateau
    tolerance: float = 0.01          # converge: relative improvement of the held-out loss that counts
    lr_decay: float = 0.1            # converge: learning rates' factor after the first plateau (they hold until
                                     # then); the second plateau stops the module
    holdout_samples: int = 128       # converge: calibration samples held out of training for the stop test (at most
                                     # a quarter of them)
    batch_size: int = 16
    lr: float = 1e-5                 # weights
    lr_quant: float = 1e-3           # LSQ step sizes
    teacher_forcing_steps: int | None = None  # T0; default: min_passes' steps (converge), else steps // 2
    # Dropout in the student makes it chase a noisy copy of the deterministic teacher and, in
    # MREM-P, pushes noised outputs to the successor; off unless asked for (regularisation).
    student_dropout: bool = False
    calib_samples: int = 4096
    calib_batch_size: int = 64
    shard_size: int = 512
    cache_dir: str | None = None     # where calibrate keeps its shards (a folder per stage key); default: the run
    checkpoint_every: int = 100
    queue_size: int = 8
    log_every: int = 25
    eval_samples: int = 256
    use_gpu: str | bool = "auto"     # auto | true | false (YAML booleans accepted)
    cpus_per_actor: int = 1
    gpus_per_actor: float = 1.0      # on GPUs: a share of one (0.5: two actors per GPU) or whole GPUs
    placement_timeout_s: float = 900.0  # waiting for actor resources (an autoscaler adding nodes)
    max_restarts: int = 2
    seed: int = 0
    e2e: E2eConfig = field(default_factory=E2eConfig)

    def __post_init__(self) -> None:
        self.use_gpu = gpu_flag(self.use_gpu)

    def validate(self) -> None:
        if self.mode not in ("parallel", "sequential", "rem"):
            raise ConfigError(f"mrem.mode={self.mode!r}: use parallel, sequential or rem")
        for name in ("batch_size", "calib_samples", "calib_batch_size", "shard_size", "check_every", "patience",
                     "checkpoint_every", "queue_size", "cpus_per_actor", "log_every", "eval_samples"):
            at_least_one("mrem", name, getattr(self, name))
        if self.steps is not None:
            at_least_one("mrem", "steps", self.steps)
        if not (math.isfinite(self.max_passes) and self.max_passes > 0 and 0 <= self.min_passes <= self.max_passes):
            raise ConfigError(f"mrem.max_passes={self.max_passes}, mrem.min_passes={self.min_passes}: need "
                              "0 <= min_passes <= max_passes, e.g. 1.5 and 8")
        if not (0 <= self.tolerance < 1 and 0 < self.lr_decay <= 1):
            raise ConfigError(f"mrem.tolerance={self.tolerance}, mrem.lr_decay={self.lr_decay}: need a tolerance in "
                              "[0, 1) such as 0.01 and a decay in (0, 1] such as 0.1")
        at_least_one("mrem", "holdout_samples", self.holdout_samples)
        self.e2e.validate()
        for name in ("lr", "lr_quant"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"mrem.{name}={getattr(self, name)}: expected a small positive number such as 1e-4")
        if self.teacher_forcing_steps is not None and self.teacher_forcing_steps < 0:
            raise ConfigError(f"mrem.teacher_forcing_steps={self.teacher_forcing_steps}: must be >= 0 or null")
        if self.max_restarts < 0 or not self.placement_timeout_s > 0:
            raise ConfigError("mrem.max_restarts must be >= 0 and mrem.placement_timeout_s > 0")
        if self.modules is not None and self.modules < 1:
            raise ConfigError(f"mrem.modules={self.modules}: must be >= 1 or null")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"mrem.use_gpu={self.use_gpu!r}: use auto, true or false")
        g = self.gpus_per_actor
        if not (math.isfinite(g) and (0 < g <= 1 and round(g, 4) == g or g >= 1 and g == int(g))):
            raise ConfigError(f"mrem.gpus_per_actor={g}: a share of one GPU in (0, 1] with at most 4 decimals, or a "
                              "whole number of GPUs; e.g. 0.5 puts two module actors on one GPU")
        parse_quant_list("mrem", self.quant, "MREM needs quantized weights")


@dataclass
class PrequantConfig:
    """PreQuant: quantize the pre-trained model once (prequant-quantize), fine-tune a few FP weights per task."""
    METHODS: typing.ClassVar[tuple[str, ...]] = ("fp", "rtn", "prequant", "random", "lora", "bitfit")
    quant: list[str] = field(default_factory=list)  # weight-quantized QuantConfigs, e.g. [w4, w3]; empty = skip
    # row | row-mse | group-mse | group-mse-asym | minmax | mse | config (quant.prequant.WEIGHT_QUANTIZERS)
    quantizer: str = "row"
    # GPTQ rounding onto the quantizer's grid (quant/gptq.py): each column's rounding error goes to
    # the columns not yet rounded and to the FP outlier columns, weighted by the input Hessian on
    # the calib_* text; every method's base (lora/bitfit too). False: round to nearest.
    gptq: bool = False
    criterion: str = "weight"        # outlier column score: weight | activation | random (quant.prequant.CRITERIA)
    budget_pct: float = 0.5          # trainable outlier columns (+ biases/LayerNorm), % of the model's parameters
    train_norms: bool = False        # also train biases and LayerNorm (counted in the budget)
    # Body Linears that belong to the task head (fnmatch patterns on module names): kept FP and
    # trained per task by every method, like the classifier; counted in trainable %, not in the
    # budget. E.g. ['*pooler*'] for sentence-embedding checkpoints whose [CLS] pooler was never
    # trained for classification.
    head_modules: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["prequant"])  # any of METHODS
    lr: float = 2e-3                 # learning rate of prequant/random/lora/bitfit (the head's too)
    lora_scaling: float = 2.0        # LoRA alpha / r
    calib_corpus: str = "wikitext2"  # unlabelled text for criterion=activation and gptq: bundled corpus or a file
    calib_samples: int = 256         # sentences
    calib_max_length: int = 128
    dir: str | None = None           # pre-quantized models, shared by all tasks; default <output_dir>/prequant
    seed: int = 42                   # random criterion; body of the random tiny presets

    def validate(self) -> None:
        if not 0 < self.budget_pct < 100:
            raise ConfigError(f"prequant.budget_pct={self.budget_pct}: must be in (0, 100), a % of the parameters")
        if self.quantizer not in WEIGHT_QUANTIZERS:
            raise ConfigError(f"prequant.quantizer={self.quantizer!r}: use one of {', '.join(WEIGHT_QUANTIZERS)}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"prequant.criterion={self.criterion!r}: use one of {', '.join(CRITERIA)}")
        for m in self.methods:
            if m not in self.METHODS:
                raise ConfigError(f"prequant.methods: {m!r} is not one of {', '.join(self.METHODS)}")
        if not 0 < self.lr < 1 or self.lora_scaling <= 0:
            raise ConfigError("prequant.lr must be in (0, 1) and prequant.lora_scaling > 0")
        if not all(isinstance(p, str) and p for p in self.head_modules):
            raise ConfigError(f"prequant.head_modules={self.head_modules!r}: expected module-name patterns, "
                              "e.g. ['*pooler*']")
        if self.calib_samples <= 0 or self.calib_max_length < 8:
            raise ConfigError("prequant.calib_samples must be >= 1 and prequant.calib_max_length >= 8")
        for i, cfg in enumerate(parse_quant_list("prequant", self.quant, "PreQuant needs quantized weights (e.g. w4)")):
            q = self.quant[i]
            if cfg.embedding is not None or cfg.output is not None:
                raise ConfigError(f"prequant.quant[{i}]={q!r}: PreQuant quantizes Linear weights and inputs "
                                  "only; drop the -e/-o part")
            if self.gptq and cfg.weight.scheme != "uniform":
                raise ConfigError(f"prequant.quant[{i}]={q!r}: GPTQ rounds onto uniform grids, not "
                                  f"{cfg.weight.scheme} weights; use 3..8 bits or w2g<N>, or prequant.gptq=false")


@dataclass
class ClusterConfig:
    """Where the run's stages may be placed. The node types of an autoscaler config count as
    capacity before their nodes exist: GPU `auto` picks GPUs when any type has one, and a
    request no node type can hold fails before any work."""
    autoscaler_config: str | None = None   # e.g. cluster.yaml (available_node_types)

    def validate(self) -> None:
        if self.autoscaler_config and not Path(self.autoscaler_config).is_file():
            raise ConfigError(f"cluster.autoscaler_config={self.autoscaler_config!r}: no such file")


@dataclass
class RunConfig:
    model: str = "minilm-l6"
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    output_dir: str = "runs/default"
    experiment: str | None = None    # MLflow experiment; default plmq-<model>
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    rtn: RtnConfig = field(default_factory=RtnConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    mrem: MremConfig = field(default_factory=MremConfig)
    prequant: PrequantConfig = field(default_factory=PrequantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        """Also rewrites each task name as `check_task` spells it (text:<file> with an absolute path, so stages
        read the same file wherever they run). GLUE and language-modelling tasks may share a run; MREM and
        PreQuant runs on GLUE tasks only."""
        if not self.tasks:
            raise ConfigError("tasks must list at least one task: a GLUE task such as sst2, or a language-modelling "
                              "task such as wikitext2")
        specs = [check_task(task) for task in self.tasks]
        self.tasks = [spec.name for spec in specs]
        lm = ", ".join(spec.name for spec in specs if spec.kind == "lm")
        if lm and self.prequant.quant:
            raise ConfigError(f"prequant.quant={self.prequant.quant}: PreQuant runs on GLUE tasks only, not on "
                              f"the language-modelling task(s) {lm}; set prequant.quant=[] or run those tasks in "
                              "another config")
        for section in (self.data, self.finetune, self.evaluate, self.rtn, self.gptq, self.mrem, self.prequant,
                        self.export, self.cluster):
            section.validate()

    @property
    def experiment_name(self) -> str:
        """Default: by model and tasks, e.g. plmq-minilm-l6-sst2."""
        slugs = "-".join(check_task(task).slug for task in self.tasks)
        return self.experiment or f"plmq-{Path(self.model).name}-{slugs}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = RunConfig) -> Any:
    """Read a YAML config (or defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg
