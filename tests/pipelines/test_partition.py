"""MREM partitioning: K contiguous modules whose chain reproduces the full model."""
from __future__ import annotations

import copy

import pytest
import torch

from pipelines import models
from pipelines.partition import num_layers, part_forward, prune_to_part, split_layers


def test_split_is_contiguous_and_uneven_splits_front_load():
    specs = split_layers(6, 4)
    assert [(s.start, s.end) for s in specs] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert specs[0].first and specs[-1].last and not specs[1].first and not specs[1].last
    assert [(s.start, s.end) for s in split_layers(6, 1)] == [(0, 6)]


@pytest.mark.parametrize("k", [0, 7])
def test_bad_module_count_is_rejected(k):
    with pytest.raises(ValueError, match=f"mrem.modules={k}"):
        split_layers(6, k)


@pytest.mark.parametrize("name,pooling", [("tiny-bert", "cls"), ("tiny-gpt2", "cls"), ("tiny-bert", "mean")])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_chained_modules_equal_the_full_model(name, pooling, k):
    tok = models.load_tokenizer(name)
    model = models.load_classifier(name, 2, seed=0, pooling=pooling).eval()
    batch = tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).logits
        x = batch["input_ids"]
        for spec in split_layers(num_layers(model), k):
            part = prune_to_part(copy.deepcopy(model), spec)
            x, outs = part_forward(part, spec, x, batch["attention_mask"], batch.get("token_type_ids"))
            assert len(outs) == spec.end - spec.start
    assert torch.allclose(x, ref, atol=1e-6)


def test_pruned_module_keeps_only_its_parameters_under_full_names():
    model = models.load_classifier("tiny-bert", 2)
    first, last = split_layers(4, 2)
    keys0 = set(prune_to_part(copy.deepcopy(model), first).state_dict())
    keys1 = set(prune_to_part(copy.deepcopy(model), last).state_dict())
    assert any(k.startswith("bert.embeddings.") for k in keys0) and not any("layer.2." in k for k in keys0)
    assert any(k.startswith("classifier.") for k in keys1) and not any("embeddings" in k for k in keys1)
    assert keys0 | keys1 == set(model.state_dict()) and not keys0 & keys1
