"""Config of quantized pre-training (`plmq pretrain`, `plmq pretrain-sweep`): a GPT-2 or Llama LM
trained from scratch under a quantization recipe (quant/qtrain.py).

    cfg = load_config("configs/pretrain.yaml", overrides, cls=PretrainRunConfig)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import gpu_flag
from pipelines.errors import ConfigError
from quant.qtrain import KINDS, Recipe

__all__ = ["ARCHS", "PRESETS", "DataSection", "ModelSection", "PretrainRunConfig", "QuantSection", "SweepSection",
           "TrainSection", "with_recipe"]


ARCHS = ("gpt2", "llama")
PRESETS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}  # pipelines.models.TINY_PRESETS -> their architecture


@dataclass
class ModelSection:
    arch: str = "gpt2"               # gpt2 | llama (RMSNorm, RoPE, SwiGLU MLP, no biases); a preset sets it
    preset: str | None = None        # tiny-gpt2 | tiny-llama (pipelines.models); None = built from the fields below
    n_layer: int = 4
    n_embd: int = 256                # hidden size
    n_head: int = 4
    n_kv_head: int | None = None     # llama: key/value heads (grouped-query attention); None = n_head
    intermediate_size: int | None = None  # MLP width; None = 4 * n_embd (gpt2), 8/3 * n_embd rounded up to 64 (llama)
    tie_embeddings: bool = True      # llama: lm_head shares the token embedding matrix (gpt2 always does)
    block_size: int = 128            # context length (llama: max_position_embeddings)
    dropout: float = 0.0             # gpt2: residual, embedding and attention dropout; llama: attention dropout only

    def __post_init__(self) -> None:
        if self.preset in PRESETS and self.arch == "gpt2":
            self.arch = PRESETS[self.preset]

    @property
    def ffn_size(self) -> int:
        """The MLP's hidden width: intermediate_size, or the architecture's default rule."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.arch == "llama":
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd


@dataclass
class DataSection:
    corpus: str = "tinyshakespeare"  # tinyshakespeare | wikitext2 | wikitext2-test | a text file; several joined by +
    eval_corpus: str | None = None   # the validation text (a corpus as above); None = the last val_fraction of corpus
    vocab_size: int = 4096           # byte-level BPE trained on the training text
    val_fraction: float = 0.1        # the last 10% of the text is the validation split (unless eval_corpus is set)
    eval_windows: int = 64           # validation windows of block_size tokens
    cache_dir: str | None = None     # tokenizer + token ids; default ~/.cache/plmq/lm


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 16             # sequences per worker per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1        # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1             # Ray Train data-parallel workers
    use_gpu: str | bool = "auto"     # auto | true | false (YAML booleans accepted)
    cpus_per_worker: int = 1
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        self.use_gpu = gpu_flag(self.use_gpu)


QUIET_TRAIN = ("log_every", "eval_every", "checkpoint_every", "use_gpu", "cpus_per_worker")  # no effect on results


@dataclass
class QuantSection:
    """`recipe` is a short name (quant/qtrain.py); a per-kind mapping updates (or switches on) that kind."""
    recipe: str = "fp"
    include_head: bool = True        # quantize lm_head too
    weight: dict[str, Any] | None = None
    act: dict[str, Any] | None = None
    grad_output: dict[str, Any] | None = None
    grad_input: dict[str, Any] | None = None
    grad_weight: dict[str, Any] | None = None
    opt_m: dict[str, Any] | None = None
    opt_v: dict[str, Any] | None = None

    def build(self) -> Recipe:
        try:
            recipe = Recipe.parse(self.recipe)
        except ValueError as err:
            raise ConfigError(f"quant.recipe={self.recipe!r}: {err}") from None
        try:
            return recipe.with_overrides({k: getattr(self, k) for k in KINDS})
        except ValueError as err:
            raise ConfigError(f"quant.{err}") from None


@dataclass
class SweepSection:
    recipes: list[str] = field(default_factory=list)  # recipe names (with ':' overrides); the quant section is not used
    corpora: list[str] = field(default_factory=list)  # empty = [data.corpus]
    seeds: list[int] = field(default_factory=list)    # empty = [train.seed]; several: mean/std over seeds


@dataclass
class PretrainRunConfig:
    output_dir: str = "runs/pretrain"
    experiment: str | None = None    # MLflow experiment; default plmq-pretrain
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    quant: QuantSection = field(default_factory=QuantSection)
    sweep: SweepSection = field(default_factory=SweepSection)

    @property
    def experiment_name(self) -> str:
        return self.experiment or "plmq-pretrain"

    def validate(self) -> None:
        _check_model(self.model)
        _check_train(self.train)
        d = self.data
        if not 257 <= d.vocab_size <= 2**20:
            raise ConfigError(f"data.vocab_size={d.vocab_size}: expected 257..1048576")
        if not 0 < d.val_fraction < 0.5 or d.eval_windows < 1:
            raise ConfigError("data.val_fraction must be in (0, 0.5) and data.eval_windows >= 1")
        self.quant.build()
        _check_sweep(self.sweep)


def _check_model(m: ModelSection) -> None:
    if m.arch not in ARCHS:
        raise ConfigError(f"model.arch={m.arch!r}: use one of {', '.join(ARCHS)}")
    if m.preset is not None:
        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset={m.preset!r}: use {', '.join(PRESETS)} or null")
        if m.arch != PRESETS[m.preset]:
            raise ConfigError(f"model.arch={m.arch} but model.preset={m.preset} is a {PRESETS[m.preset]} model: "
                              f"drop one of them")
    else:
        _check_widths(m)
    if m.block_size < 8 or (m.preset and m.block_size > 128):
        raise ConfigError(f"model.block_size={m.block_size}: expected 8..{128 if m.preset else 'n_positions'}")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout={m.dropout}: expected a value in [0, 1)")


def _check_widths(m: ModelSection) -> None:
    """The sizes of a model built from the fields (no preset)."""
    if m.n_layer < 1 or m.n_head < 1 or m.n_embd < 8 or m.n_embd % m.n_head:
        raise ConfigError(f"model: n_layer >= 1 and n_embd divisible by n_head required "
                          f"(n_layer={m.n_layer}, n_embd={m.n_embd}, n_head={m.n_head})")
    if m.intermediate_size is not None and m.intermediate_size < 1:
        raise ConfigError(f"model.intermediate_size={m.intermediate_size}: must be >= 1 (or null for the default)")
    if m.arch == "gpt2":
        if m.n_kv_head is not None or not m.tie_embeddings:
            raise ConfigError("model.n_kv_head and model.tie_embeddings=false need model.arch=llama "
                              "(GPT-2 has one key/value head per query head and always ties lm_head)")
        return
    if m.n_kv_head is not None and (m.n_kv_head < 1 or m.n_head % m.n_kv_head):
        divisors = ", ".join(str(d) for d in range(1, m.n_head + 1) if m.n_head % d == 0)
        raise ConfigError(f"model.n_kv_head={m.n_kv_head}: must divide model.n_head={m.n_head} "
                          f"(one of {divisors}; null for n_head)")
    if (m.n_embd // m.n_head) % 2:
        raise ConfigError(f"model: llama's head size n_embd / n_head = {m.n_embd // m.n_head} must be even (RoPE)")


def _check_train(t: TrainSection) -> None:
    for name in ("steps", "batch_size", "num_workers", "cpus_per_worker", "log_every", "eval_every",
                 "checkpoint_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if not 0 < t.lr < 1 or t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train: lr={t.lr} must be in (0, 1), warmup_steps >= 0, min_lr_ratio in [0, 1]")
    if t.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"train.use_gpu={t.use_gpu!r}: use auto, true or false")


def _check_sweep(s: SweepSection) -> None:
    for i, name in enumerate(s.recipes):
        try:
            Recipe.parse(name)
        except ValueError as err:
            raise ConfigError(f"sweep.recipes[{i}]={name!r}: {err}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in s.seeds) or len(set(s.seeds)) != len(s.seeds):
        raise ConfigError(f"sweep.seeds={s.seeds!r}: expected distinct integers, e.g. [0, 1, 2]")


def with_recipe(cfg: PretrainRunConfig, recipe: str, corpus: str | None = None,
                seed: int | None = None) -> PretrainRunConfig:
    """A copy of cfg that trains `recipe` (a complete recipe name) on `corpus` with `seed`."""
    return dataclasses.replace(cfg, quant=QuantSection(recipe=recipe, include_head=cfg.quant.include_head),
                               data=dataclasses.replace(cfg.data, corpus=corpus or cfg.data.corpus),
                               train=dataclasses.replace(cfg.train, seed=cfg.train.seed if seed is None else seed))
