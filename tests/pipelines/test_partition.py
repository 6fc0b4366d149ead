"""MREM partitioning of any transformer: K contiguous modules whose chain reproduces the full model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipelines import models
from pipelines.partition import (
    UnsupportedModel,
    layout,
    num_layers,
    part_forward,
    part_state,
    prune_to_part,
    split_layers,
)


def test_split_is_contiguous_and_uneven_splits_front_load():
    specs = split_layers(6, 4)
    assert [(s.start, s.end) for s in specs] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert specs[0].first and specs[-1].last and not specs[1].first and not specs[1].last
    assert [(s.start, s.end) for s in split_layers(6, 1)] == [(0, 6)]


def test_a_costly_head_moves_layers_to_the_earlier_modules():
    """The last module also runs the head: with a head worth 2 blocks, 6 layers split 4 + 2 (cost 4 and 4)."""
    assert [(s.start, s.end) for s in split_layers(6, 2, tail=2.0)] == [(0, 4), (4, 6)]
    assert [(s.start, s.end) for s in split_layers(7, 2, tail=0.0)] == [(0, 4), (4, 7)]
    assert [(s.start, s.end) for s in split_layers(8, 4, tail=100.0)] == [(0, 3), (3, 5), (5, 7), (7, 8)]
    for n, k, tail in [(6, 3, 0.5), (12, 4, 1.7), (32, 8, 2.5), (5, 5, 3.0)]:  # the slowest module is the fastest
        specs = split_layers(n, k, tail)                                     # any contiguous split can give
        cost = max(max(s.end - s.start for s in specs[:-1]), specs[-1].end - specs[-1].start + tail)
        assert specs[-1].end == n and all(s.end > s.start for s in specs)
        assert cost <= max(-(-(n - 1) // (k - 1)), 1 + tail) and cost >= (n + tail) / k


def test_the_layout_prices_the_head_in_blocks():
    lm, clf = layout(models.load_causal_lm("tiny-llama")), layout(models.load_classifier("tiny-bert", 2, seed=0))
    assert lm.tail > 10 and clf.tail < 0.25  # tiny-llama: a 32000-word head on 32-wide blocks; a pooler and 2 classes


@pytest.mark.parametrize("k", [0, 7])
def test_bad_module_count_is_rejected(k):
    with pytest.raises(ValueError, match=f"mrem.modules={k}"):
        split_layers(6, k)


def _batch(name: str):
    tok = models.load_tokenizer(name)
    return tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")


def _chain(model, batch, k):
    x, states = None, {}
    for spec in split_layers(num_layers(model), k):
        part = prune_to_part(copy.deepcopy(model), spec)
        x, outs = part_forward(part, spec, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), x)
        assert len(outs) == spec.end - spec.start
        owned = part_state(part, spec)
        assert not set(owned) & set(states)  # every tensor has one owner
        states.update(owned)
    return x, states


@pytest.mark.parametrize("name,pooling", [("tiny-bert", "cls"), ("tiny-gpt2", "cls"), ("tiny-bert", "mean")])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_chained_modules_equal_the_full_model(name, pooling, k):
    model = models.load_classifier(name, 2, seed=0, pooling=pooling).eval()
    batch = _batch(name)
    with torch.no_grad():
        ref = model(**batch).logits
        out, states = _chain(model, batch, k)
    assert torch.allclose(out, ref, atol=1e-6)
    assert set(states) == set(model.state_dict())


def test_pruned_module_keeps_only_its_parameters_under_full_names():
    model = models.load_classifier("tiny-bert", 2)
    first, last = split_layers(4, 2)
    keys0 = set(part_state(prune_to_part(copy.deepcopy(model), first), first))
    pruned1 = prune_to_part(copy.deepcopy(model), last)
    keys1 = set(part_state(pruned1, last))
    assert any(k.startswith("bert.embeddings.") for k in keys0) and not any("layer.2." in k for k in keys0)
    assert any(k.startswith("classifier.") for k in keys1) and not any("embeddings" in k for k in keys1)
    assert keys0 | keys1 == set(model.state_dict()) and not keys0 & keys1
    # the later module runs the embeddings' position tables (masks, shapes) but does not train them
    trainable = {n for n, p in pruned1.named_parameters() if p.requires_grad}
    assert trainable and trainable <= keys1


def test_layout_finds_blocks_prefix_and_suffix():
    lay = layout(models.load_causal_lm("tiny-llama"))
    assert (lay.blocks, lay.count) == ("model.layers", 4)
    assert "model.embed_tokens" in lay.prefix and set(lay.suffix) == {"model.norm", "lm_head"}


def test_a_model_without_a_block_stack_fails_naming_what_was_missing():
    with pytest.raises(UnsupportedModel, match="no stack of transformer blocks"):
        layout(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_calibration_streamed_module_by_module_equals_the_whole_model(tiny_teacher, tiny_data, tmp_path):
    """`calibration.record` holds one module at a time; its boundaries are the whole model's."""
    import numpy as np

    from pipelines import calibration, checkpoints

    meta = calibration.record(tiny_teacher, "sst2", tiny_data, 3, 20, tmp_path / "c", batch_size=8, shard_size=8)
    assert meta["layers"] == [[0, 2], [2, 3], [3, 4]] and meta["layout"]["blocks"] == "bert.encoder.layer"
    shard = {b: np.concatenate([calibration.read_shard(d)["hidden" if b else "input_ids"]
                                for d in sorted((tmp_path / "c" / f"b{b}").iterdir())]) for b in range(3)}
    tokens = {k: np.concatenate([calibration.read_shard(d)[k] for d in sorted((tmp_path / "c" / "b0").iterdir())])
              for k in ("input_ids", "attention_mask", "token_type_ids")}
    model = checkpoints.load(tiny_teacher).model
    ids, mask, tt = (torch.from_numpy(tokens[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    with torch.no_grad():
        _, outs = part_forward(model, split_layers(4, 1)[0], ids, mask, tt)
    assert np.allclose(shard[1], outs[1].numpy(), atol=1e-6) and np.allclose(shard[2], outs[2].numpy(), atol=1e-6)
