"""Language-modelling corpora for pre-training: split, BPE tokenizer, token ids, batches.

A corpus is a bundled name (CORPORA), a path to a UTF-8 text file, or several of them joined
by `+` (their texts concatenated, separated by a newline). Its last `val_fraction` of characters
(cut at a line break) is the validation split, unless an evaluation corpus is given: then the
whole corpus is the training text and the whole evaluation corpus the validation text. A
byte-level BPE tokenizer (`tokenizers.ByteLevelBPETokenizer`) is trained on the training text
only. Tokenizer and token ids (uint16/uint32 .npy) are cached on disk, keyed by the content
hashes of the training and validation texts and the vocabulary size, so workers and re-runs
load them instead of retraining; one folder per key, written atomically under a file lock.

Batches are random windows (nanoGPT style) drawn from a generator seeded by
(seed, step, rank): the data position of a run is its step, which makes resuming exact.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from transformers import PreTrainedTokenizerFast

from pipelines.errors import DataError
from pipelines.io import atomic_dir
from pipelines.textfile import read_utf8

ROOT = Path(__file__).resolve().parent.parent
CORPORA = {
    "tinyshakespeare": ROOT / "data/lm/tinyshakespeare/input.txt",
    "wikitext2": ROOT / "data/lm/wikitext-2-raw/wiki.valid.raw",  # WikiText-2 valid (train not bundled)
    "wikitext2-test": ROOT / "data/lm/wikitext-2-raw/wiki.test.raw",
}
SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class LMData:
    """Where a tokenized corpus lives on disk (plain paths: sent to Ray workers)."""
    corpus: str
    tokenizer_dir: str
    train_ids: str
    val_ids: str
    vocab_size: int

    def load(self, split: str) -> np.ndarray:
        return np.load(self.train_ids if split == "train" else self.val_ids, mmap_mode="r")


def corpus_path(corpus: str, key: str = "data.corpus") -> Path:
    """A bundled corpus name or a text file path (`key` names the setting in errors)."""
    if corpus in CORPORA:
        return CORPORA[corpus]
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(f"{key}={corpus!r} is neither a bundled corpus ({', '.join(CORPORA)}) "
                         "nor an existing text file")
    return path


def corpus_parts(spec: str, key: str = "data.corpus") -> list[Path]:
    """The files of a corpus spec: one corpus, or several joined by `+`."""
    names = [part.strip() for part in spec.split("+")]
    if not all(names):
        raise ValueError(f"{key}={spec!r}: empty corpus name; join corpora with +, e.g. tinyshakespeare+wikitext2")
    return [corpus_path(name, key) for name in names]


def read_corpus(spec: str, key: str = "data.corpus") -> str:
    """The text of a corpus spec: its corpora's texts joined by a newline (each UTF-8 and not empty: a DataError
    naming `key` and the file otherwise)."""
    return "\n".join(read_utf8(path, f"{key}={spec!r}") for path in corpus_parts(spec, key))


def corpus_label(spec: str) -> str:
    """A short name for folders and stage names: each corpus' name (a file's stem), joined by +."""
    return "+".join(part.strip() if part.strip() in CORPORA else Path(part.strip()).stem for part in spec.split("+"))


def _check_disjoint(corpus: str, eval_corpus: str | None, key: str) -> None:
    """Every corpus file exists, and the evaluation text is not part of the training text."""
    train = {p.resolve() for p in corpus_parts(corpus, key)}
    if eval_corpus is not None:
        shared = sorted(str(p) for p in corpus_parts(eval_corpus, "data.eval_corpus") if p.resolve() in train)
        if shared:
            raise ValueError(f"data.eval_corpus={eval_corpus!r}: {shared[0]} is also in {key}={corpus!r}; "
                             "evaluate on text the model does not train on")


def check_corpora(corpus: str, eval_corpus: str | None = None, key: str = "data.corpus",
                  block_size: int | None = None, val_fraction: float = 0.1) -> None:
    """Before any work: every corpus is a non-empty UTF-8 text file, the evaluation text is not part of the
    training text and, given `block_size`, the training and validation texts can hold a window of it
    (byte-level BPE makes at most one token per byte, so a text with fewer bytes is too short whatever the
    tokenizer learns; `check_windows` checks the exact token counts once tokenized)."""
    _check_disjoint(corpus, eval_corpus, key)
    text = read_corpus(corpus, key)
    if eval_corpus is None:
        train_text, val_text = split_text(text, val_fraction)
        val_key = f"the last data.val_fraction={val_fraction} of {key}"
    else:
        train_text, val_text, val_key = text, read_corpus(eval_corpus, "data.eval_corpus"), "data.eval_corpus"
    if block_size is not None:
        parts = ((f"{key}={corpus!r}", train_text, block_size + 2), (val_key, val_text, block_size + 1))
        for what, part, need in parts:
            if len(part.encode()) < need:
                raise DataError(f"{what}: the text has {len(part.encode())} bytes, fewer than the {need} tokens one "
                                f"window of model.block_size={block_size} needs; use a longer corpus or lower "
                                "model.block_size")


def check_windows(data: LMData, block_size: int) -> None:
    """Once tokenized: the training tokens hold a window of `block_size` + 1 targets (get_batch) and the
    validation tokens one window (eval_windows); a DataError naming the corpus otherwise."""
    for split, need in (("train", block_size + 2), ("val", block_size + 1)):
        have = len(data.load(split))
        if have < need:
            raise DataError(f"data.corpus={data.corpus!r}: its {split} split has {have} tokens, fewer than the "
                            f"{need} one window of model.block_size={block_size} needs; use a longer corpus or "
                            "lower model.block_size")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the last `val_fraction` of the text, starting at a line."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"data.val_fraction={val_fraction}: expected a value in (0, 0.5)")
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut)
    cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PLMQ_CACHE", Path.home() / ".cache" / "plmq")) / "lm"


def _cache_key(train: str, val: str, vocab_size: int) -> str:
    """Everything that decides the tokens: the training text (the tokenizer), the validation text, the vocabulary."""
    digest = hashlib.sha256(f"{len(train)}:".encode() + train.encode() + val.encode()).hexdigest()[:12]
    return f"{digest}-v{vocab_size}"


def _train_tokenizer(train_text: str, vocab_size: int, out: Path) -> None:
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_text.splitlines(keepends=True), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[SPECIAL], show_progress=False)
    out.mkdir(parents=True)
    tok.save_model(str(out))
    tok.save(str(out / "tokenizer.json"))


def load_tokenizer(tokenizer_dir: str | Path):
    """The `tokenizers.Tokenizer` saved by prepare_corpus."""
    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))


def hf_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerFast:
    """The same tokenizer as a `transformers` tokenizer (what a saved checkpoint carries)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
                                   bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL)


def _encode(tokenizer, text: str, vocab_size: int) -> np.ndarray:
    # Line by line: byte-level BPE never merges across lines, and batches of lines are fast.
    ids = [i for enc in tokenizer.encode_batch(text.splitlines(keepends=True)) for i in enc.ids]
    return np.asarray(ids, dtype=np.uint16 if vocab_size <= 2**16 else np.uint32)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time on this machine (parallel stages preparing the same corpus)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(folder: Path, train: str, val: str, vocab_size: int, meta: dict) -> None:
    """Tokenizer, token ids and meta.json of one corpus, written as one folder."""
    with atomic_dir(folder) as tmp:
        _train_tokenizer(train, vocab_size, tmp / "tokenizer")
        tok = load_tokenizer(tmp / "tokenizer")
        np.save(tmp / "train.npy", _encode(tok, train, vocab_size))
        np.save(tmp / "val.npy", _encode(tok, val, vocab_size))
        meta = {**meta, "vocab_size": vocab_size, "train_chars": len(train), "val_chars": len(val)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def prepare_corpus(corpus: str, vocab_size: int = 4096, val_fraction: float = 0.1,
                   cache_dir: str | Path | None = None, eval_corpus: str | None = None) -> LMData:
    """Split (or read the evaluation corpus), train (or reuse) the tokenizer on the training text,
    tokenize both texts; returns cached paths."""
    if vocab_size < 257 or vocab_size > 2**20:
        raise ValueError(f"data.vocab_size={vocab_size}: expected 257..1048576 (byte-level BPE needs 256 bytes)")
    _check_disjoint(corpus, eval_corpus, "data.corpus")
    text = read_corpus(corpus)
    if eval_corpus is None:
        train, val = split_text(text, val_fraction)
        meta = {"corpus": corpus, "val_fraction": val_fraction}
    else:
        train, val = text, read_corpus(eval_corpus, "data.eval_corpus")
        meta = {"corpus": corpus, "eval_corpus": eval_corpus}
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    label = corpus_label(corpus) + (f"-eval-{corpus_label(eval_corpus)}" if eval_corpus else "")
    folder = root / f"{label}-{_cache_key(train, val, vocab_size)}"
    if not (folder / "meta.json").exists():
        with _locked(root / f".{folder.name}.lock"):
            if not (folder / "meta.json").exists():  # another process may have built it meanwhile
                _build(folder, train, val, vocab_size, meta)
    tok_dir = folder / "tokenizer"
    actual_vocab = load_tokenizer(tok_dir).get_vocab_size()
    return LMData(corpus, str(tok_dir), str(folder / "train.npy"), str(folder / "val.npy"), actual_vocab)


def get_batch(ids: np.ndarray, batch_size: int, block_size: int, seed: int, step: int,
              rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [batch, block]: random windows fixed by (seed, step, rank)."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than block_size + 2 = {block_size + 2}")
    rng = np.random.default_rng([seed, step, rank])
    starts = rng.integers(0, len(ids) - block_size - 1, size=batch_size)
    win = np.stack([np.asarray(ids[s:s + block_size + 1], dtype=np.int64) for s in starts])
    win = torch.from_numpy(win)
    return win[:, :-1], win[:, 1:]


def eval_windows(ids: np.ndarray, block_size: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows [n, block + 1] from the start of the split (fixed, so every
    run is scored on the same tokens)."""
    n = min((len(ids) - 1) // block_size, max_windows)
    if n < 1:
        raise ValueError(f"the validation split has {len(ids)} tokens, fewer than block_size + 1")
    win = [np.asarray(ids[i * block_size:i * block_size + block_size + 1], dtype=np.int64) for i in range(n)]
    return torch.from_numpy(np.stack(win))
