"""Tiny random models of every family (pipelines.models.TINY_PRESETS) and token batches for them, shared by the
family tests: encoders with a classification head, decoders as causal LMs."""
from __future__ import annotations

import functools

import torch

from pipelines import models

ENCODERS = ["tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-electra", "tiny-deberta-v2"]
DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-opt"]
FAMILIES = ENCODERS + DECODERS


@functools.cache
def tokenizer(name: str):
    return models.load_tokenizer(name)


def model(name: str) -> torch.nn.Module:
    """An encoder family's classifier (2 labels) or a decoder family's causal LM, initialised with seed 0."""
    if name in ENCODERS:
        return models.load_classifier(name, 2, seed=0).eval()
    torch.manual_seed(0)
    return models.load_causal_lm(name).eval()


def batch(name: str, seed: int = 0, n: int = 8, length: int = 16, padded: bool = True,
          pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids from the middle of the vocabulary; when `padded`, the second half of the rows right-padded
    (with `pad_id`, default the tokenizer's pad token)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[n // 2:, length * 3 // 4:] = 0
    pad = tokenizer(name).pad_token_id if pad_id is None else pad_id
    out = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if "token_type_ids" in tokenizer(name).model_input_names:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def logits(m: torch.nn.Module, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**b).logits
