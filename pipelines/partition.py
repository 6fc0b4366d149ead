"""Split a fine-tuned model into K modules of consecutive transformer layers (MREM).

Embeddings go with the first module, the pooler/classifier head with the last.
A module is the *same* model object with the other parts pruned away, so its
state_dict keys are the full model's keys and assembling the trained modules
back into one model is a plain `load_state_dict` of their union.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from pipelines.models import MeanPooler


@dataclass(frozen=True)
class PartSpec:
    index: int
    start: int      # first transformer layer (inclusive)
    end: int        # last transformer layer (exclusive)
    num_parts: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_parts - 1


def split_layers(num_layers: int, k: int) -> list[PartSpec]:
    """K contiguous layer ranges; uneven splits give the earlier modules one layer more."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"mrem.modules={k}: must be between 1 and the model's {num_layers} layers")
    base, extra = divmod(num_layers, k)
    specs, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        specs.append(PartSpec(i, start, end, k))
        start = end
    return specs


class _Family:
    """Where the pieces of one model family live (BERT or GPT-2 classifiers)."""

    def __init__(self, model: nn.Module):
        self.model = model
        if hasattr(model, "bert"):
            self.kind, self.body = "bert", model.bert
            self.layers = model.bert.encoder.layer
        elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
            self.kind, self.body = "gpt2", model.transformer
            self.layers = model.transformer.h
        else:
            raise ValueError(f"{type(model).__name__}: MREM supports BERT- and GPT-2-family classifiers")

    def num_layers(self) -> int:
        return len(self.layers)


def num_layers(model: nn.Module) -> int:
    return _Family(model).num_layers()


class _Dropped(nn.Module):
    """Placeholder for a layer owned by another module (keeps layer indices and key names)."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("this layer belongs to another MREM module")


def prune_to_part(model: nn.Module, spec: PartSpec) -> nn.Module:
    """Keep only the layers (and embeddings/head) of `spec`, in place; returns the model."""
    fam = _Family(model)
    for i in range(fam.num_layers()):
        if not spec.start <= i < spec.end:
            fam.layers[i] = _Dropped()
    if not spec.first:
        for name in ("embeddings", "wte", "wpe"):
            if hasattr(fam.body, name):
                setattr(fam.body, name, _Dropped())
    if not spec.last:
        for owner, name in ((fam.body, "pooler"), (fam.body, "ln_f"), (model, "classifier"), (model, "score")):
            if getattr(owner, name, None) is not None:
                setattr(owner, name, _Dropped())
    return model


def _bert_embed(body, x: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    return body.embeddings(input_ids=x, token_type_ids=token_type_ids)


def _gpt2_embed(body, x: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    pos = torch.arange(x.shape[1], device=x.device)[None]
    return body.drop(body.wte(x) + body.wpe(pos))


def _layer_mask(fam: _Family, h: torch.Tensor, attention_mask: torch.Tensor):
    make = create_bidirectional_mask if fam.kind == "bert" else create_causal_mask
    kwargs = {} if fam.kind == "bert" else {"past_key_values": None}
    return make(config=fam.model.config, inputs_embeds=h, attention_mask=attention_mask, **kwargs)


def _head(fam: _Family, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    model = fam.model
    if fam.kind == "bert":
        pooler = fam.body.pooler
        if isinstance(pooler, MeanPooler):  # not called through the body: no hook hands it the mask
            pooled = pooler(h, attention_mask)
        else:
            pooled = pooler(h) if pooler is not None else h[:, 0]
        return model.classifier(model.dropout(pooled))
    h = fam.body.ln_f(h)
    last = attention_mask.sum(1) - 1  # right padding: the last real token classifies
    return model.score(h[torch.arange(h.shape[0], device=h.device), last])


def part_forward(model: nn.Module, spec: PartSpec, x: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run module `spec` of `model`: x is token ids (first module) or hidden states.

    Returns (output, per-layer outputs): the output is the hidden state handed
    to the next module, or the logits for the last module.
    """
    fam = _Family(model)
    if spec.first:
        x = (_bert_embed if fam.kind == "bert" else _gpt2_embed)(fam.body, x, token_type_ids)
    mask = _layer_mask(fam, x, attention_mask)
    outs = []
    for i in range(spec.start, spec.end):
        x = fam.layers[i](x, attention_mask=mask)
        x = x[0] if isinstance(x, tuple) else x
        outs.append(x)
    if spec.last:
        return _head(fam, x, attention_mask), outs
    return x, outs
