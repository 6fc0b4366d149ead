"""Language-modelling tasks (`pipelines.tasks.LMTask`): their texts, token streams, perplexity and
calibration windows.

A text is tokenized by the model's own tokenizer as one stream (GPTQ's convention: the whole text in one call,
with the special tokens the tokenizer adds) and cached as a .npy file keyed by a hash of the text and of the
tokenizer, under `data.cache_dir` (default ~/.cache/plmq/tokenized). Perplexity is scored over the evaluation
stream cut into non-overlapping windows of `data.max_length` tokens, the model's context (GPTQ, OmniQuant);
calibration takes windows of the same length at random offsets of the calibration stream (GPTQ).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from pipelines import models
from pipelines.config import DataConfig, EvaluateConfig, RunConfig
from pipelines.data import default_cache_dir
from pipelines.errors import ConfigError, DataError
from pipelines.lm_data import CORPORA, split_text
from pipelines.tasks import LMTask, TextSource, check_task
from pipelines.textfile import read_utf8

EVAL_FRACTION = 0.1              # tinyshakespeare and text:<file>: the last 10% of the text is evaluated
LOGITS_BUDGET = 2**28            # logits `perplexity` holds at once (floats): caps the windows per forward pass
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def lm_task(name: str) -> LMTask:
    """The language-modelling task `name`; a GLUE name is an error."""
    spec = check_task(name)
    if spec.kind != "lm":
        raise ConfigError(f"task {name!r} is a GLUE task, not a language-modelling task")
    return spec


def _offline_flag() -> str | None:
    return next((f for f in OFFLINE_FLAGS if os.environ.get(f, "").lower() in ("1", "true", "yes", "on")), None)


def _hub_text(task: str, src: TextSource) -> str:
    """One split of a hub dataset: its `text` column, rows joined by blank lines (GPTQ's WikiText-2)."""
    flag = _offline_flag()
    if flag:
        raise DataError(f"task {task} reads the Hugging Face dataset {src.ref!r}, but {flag} is set (offline): "
                        "unset it on a machine with internet access, or use wikitext2, tinyshakespeare or text:<file>")
    try:
        rows = datasets.load_dataset(src.ref, src.config, split=src.split)
    except Exception as err:  # no network, unknown dataset or config, no such split: the task cannot be read
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"task {task}: cannot load split {src.split!r} of the Hugging Face dataset {src.ref!r}"
                        f"{f' (config {src.config!r})' if src.config else ''}: {cause}") from None
    if "text" not in rows.column_names:
        raise DataError(f"task {task}: dataset {src.ref!r} has no 'text' column (columns: "
                        f"{', '.join(rows.column_names)})")
    return "\n\n".join(rows["text"])


def read_text(task: str, src: TextSource) -> str:
    """The text of `src`: all of it, or its head (first 90%) or tail (last 10%), cut at a line."""
    if src.kind == "hub":
        text = _hub_text(task, src)
    else:
        path = CORPORA[src.ref] if src.kind == "corpus" else Path(src.ref)
        text = read_utf8(path, f"task {task}")  # missing, empty, binary or not UTF-8: a DataError naming the file
    if src.part == "all":
        return text
    head, tail = split_text(text, EVAL_FRACTION)
    return head if src.part == "head" else tail


def text_identity(task: str) -> dict:
    """What decides a task's texts, for stage keys: bundled corpora by name, a user's file by path, size and
    modification time (as `models.checkpoint_identity`), a hub dataset by name, config and split."""
    def one(src: TextSource) -> dict:
        if src.kind == "file" and Path(src.ref).is_file():
            st = Path(src.ref).stat()
            return {"file": src.ref, "part": src.part, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {src.kind: src.ref, "part": src.part, "config": src.config, "split": src.split}
    spec = lm_task(task)
    return {"calibration": one(spec.calibration), "evaluation": one(spec.evaluation)}


def tokenizer_identity(tokenizer) -> str:
    """A hash of how `tokenizer` maps text to ids: a fast tokenizer's full pipeline (normalizer, pre-tokenizer,
    model, post-processor; not its padding or truncation), else its class and vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        blob = json.dumps(spec, sort_keys=True)
    else:
        blob = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_ids(task: str, src: TextSource, tokenizer, data: DataConfig) -> np.ndarray:
    """The token ids of `src` as one stream; tokenized once per text and tokenizer, then read from the cache."""
    text = read_text(task, src)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    label = f"{src.ref if src.kind == 'corpus' else lm_task(task).slug}-{src.split or src.part}"
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    path = cache / "lm" / f"{label}-{digest}-{tokenizer_identity(tokenizer)}.npy"
    if path.is_file():
        return np.load(path)
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # stages running at once may write the same file
    with open(tmp, "wb") as f:
        np.save(f, ids)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return ids


def eval_windows(ids: np.ndarray, context: int, max_windows: int | None = None) -> torch.Tensor:
    """The stream cut into non-overlapping windows [n, context] from its start; the incomplete last window
    is dropped, and `max_windows` (when set) keeps the first ones."""
    n = len(ids) // context
    n = min(n, max_windows) if max_windows else n
    return torch.from_numpy(np.asarray(ids[:n * context], dtype=np.int64).reshape(n, context))


def check_eval_text(task: str, tokens: int, context: int) -> None:
    """The evaluation text must hold one window of `context` tokens."""
    if tokens < context:
        raise ConfigError(f"task {task}: the evaluation text has {tokens} tokens, fewer than one window of "
                          f"data.max_length={context}: lower data.max_length or use a longer text")


def check_calibration_text(task: str, tokens: int, context: int, n: int,
                           setting: str = "rtn.calib_samples") -> str | None:
    """The calibration text must hold one window of `context` tokens plus one; returns a warning when `n`
    windows need more tokens than it has (the random windows then overlap)."""
    if tokens < context + 1:
        raise ConfigError(f"task {task}: the calibration text has {tokens} tokens, fewer than one window of "
                          f"data.max_length={context} plus one: lower data.max_length or use a longer text")
    if n * context > tokens:
        return (f"task {task}: {setting}={n} windows of data.max_length={context} tokens need {n * context} "
                f"tokens, but the calibration text has {tokens}: the random windows overlap (lower {setting} "
                "for distinct text)")
    return None


def calibration_windows(task: str, tokenizer, data: DataConfig, n: int, seed: int = 0) -> torch.Tensor:
    """`n` windows [n, data.max_length] (LongTensor) of the task's calibration text, GPTQ style: each starts at
    an offset in [0, tokens - L - 1] drawn from a generator seeded by `seed`; windows overlap when n * L
    exceeds the text."""
    ids = token_ids(task, lm_task(task).calibration, tokenizer, data)
    context = data.max_length
    check_calibration_text(task, len(ids), context, n)
    starts = np.random.default_rng(seed).integers(0, len(ids) - context, size=n)
    return torch.from_numpy(np.stack([np.asarray(ids[s:s + context], dtype=np.int64) for s in starts]))


def calibration_batches(task: str, tokenizer, data: DataConfig, n: int, batch_size: int,
                        seed: int = 0) -> Iterator[dict]:
    """`calibration_windows` as model inputs {"input_ids", "attention_mask"} of [batch_size, L] (the last
    batch smaller)."""
    for x in calibration_windows(task, tokenizer, data, n, seed).split(batch_size):
        yield {"input_ids": x, "attention_mask": torch.ones_like(x)}


@dataclass
class Perplexity:
    ppl: float                   # exp(nll)
    nll: float                   # mean negative log-likelihood per predicted token, in nats
    windows: int
    context: int                 # tokens per window (data.max_length)
    tokens: int                  # predicted tokens: windows * (context - 1)
    text_tokens: int             # tokens of the whole evaluation text
    seconds: float


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, task: str, data: DataConfig, cfg: EvaluateConfig,
               device: str = "cpu") -> Perplexity:
    """Perplexity of `model` on the task's evaluation text in non-overlapping windows of data.max_length tokens
    (the first data.eval_examples windows when set): inside each window the model predicts tokens 2..L from
    those before them; the mean NLL over all predicted tokens, exponentiated. `cfg.batch_size` windows per
    forward pass, fewer when their logits would exceed LOGITS_BUDGET floats."""
    ids = token_ids(task, lm_task(task).evaluation, tokenizer, data)
    context = data.max_length
    check_eval_text(task, len(ids), context)
    windows = eval_windows(ids, context, data.eval_examples)
    model.eval().to(device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    per_pass = max(1, min(cfg.batch_size, LOGITS_BUDGET // (context * vocab)))
    total, count, start = 0.0, 0, time.perf_counter()
    for x in windows.split(per_pass):
        x = x.to(device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        total, count = total + nll.double().sum().item(), count + nll.numel()
    mean = total / count
    return Perplexity(math.exp(mean), mean, len(windows), context, count, len(ids), time.perf_counter() - start)


def is_causal_lm(config) -> bool:
    """Whether a model config describes a next-token predictor: the architecture a saved model names, else its
    type has a causal-LM head and no masked-LM one (encoders such as BERT have both)."""
    if getattr(config, "architectures", None):
        return models.head_of(config) == "causal-lm"
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_lm_tasks(cfg: RunConfig, model: str) -> list[str]:
    """Before any work, for each LM task of `cfg`: `model` is a causal LM, its texts can be read and are
    tokenized (cached for the stages), the evaluation text holds a window of data.max_length tokens and, when
    RTN, GPTQ or MREM calibrates, the calibration text one token more. Returns (and prints) the warnings."""
    tasks = [t for t in cfg.tasks if check_task(t).kind == "lm"]
    if not tasks:
        return []
    config = models.model_config(model)
    if not is_causal_lm(config):
        raise ConfigError(f"model={model!r} ({config.model_type}) is not a causal language model, so it cannot be "
                          f"scored on {', '.join(tasks)}: set model to a decoder such as tiny-llama, tiny-gpt2, or "
                          "a causal-LM folder or hub name")
    tokenizer = models.load_tokenizer(model)
    warnings = []
    for task in tasks:
        spec = check_task(task)
        check_eval_text(task, len(token_ids(task, spec.evaluation, tokenizer, cfg.data)), cfg.data.max_length)
        calibrating = [(s, c.calib_samples) for s, c in (("rtn", cfg.rtn), ("gptq", cfg.gptq), ("mrem", cfg.mrem))
                       if c.quant]
        if not calibrating:
            continue
        calib = len(token_ids(task, spec.calibration, tokenizer, cfg.data))
        for section, n in calibrating:
            warning = check_calibration_text(task, calib, cfg.data.max_length, n, f"{section}.calib_samples")
            if warning:
                print(f"[plmq] WARNING: {warning}")
                warnings.append(warning)
    return warnings
