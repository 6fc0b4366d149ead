"""Every model family through the same code: partition and assembly, MREM against RTN, export and load.

Tiny random models built offline from each family's config class (pipelines.models.TINY_PRESETS):
encoders with a classification head, decoders as causal LMs.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES
from tiny_models import batch as _batch
from tiny_models import logits as _logits
from tiny_models import model as _model
from tiny_models import tokenizer as _tokenizer

from pipelines import checkpoints
from pipelines import reconstruction as rc
from pipelines.evaluation import quantize_rtn
from pipelines.part_loader import load_part, probe_layout, resident_bytes
from pipelines.partition import layout, part_forward, part_state, prune_to_part, split_layers
from quant import QuantConfig


@pytest.mark.parametrize("name", FAMILIES)
def test_partition_then_assemble_reproduces_the_model(name):
    model, batch = _model(name), _batch(name)
    ref = _logits(model, batch)
    for k in (2, 3):
        x, states = None, {}
        for spec in split_layers(layout(model).count, k):
            part = prune_to_part(copy.deepcopy(model), spec)
            with torch.no_grad():
                x, _ = part_forward(part, spec, batch["input_ids"], batch["attention_mask"],
                                    batch.get("token_type_ids"), x)
            states.update(part_state(part, spec))
        assert torch.allclose(x, ref, atol=1e-5), f"{name}, K={k}: chained modules differ from the model"
        assembled = copy.deepcopy(model)
        assembled.load_state_dict(states)
        assert torch.equal(_logits(assembled, batch), ref)




@pytest.mark.parametrize("name", FAMILIES)
def test_mrem_lowers_the_module_error_below_rtn(name):
    """RTN's error is the student's at step 0 (calibrated ranges); 40 MREM steps must lower it."""
    model = _model(name)
    before, spec, _ = split_layers(layout(model).count, 3)  # the middle module: blocks only
    batches = []
    for seed in range(4):
        b = _batch(name, seed=seed)
        ids, mask, tt = b["input_ids"], b["attention_mask"], b.get("token_type_ids")
        with torch.no_grad():
            hidden, _ = part_forward(model, before, ids, mask, tt)
        batches.append((ids, mask, tt, hidden))
    torch.manual_seed(0)
    student, teacher = rc.student_and_teacher(copy.deepcopy(model), spec, "w3a8")
    rc.init_ranges(student, spec, batches)
    rtn_error = rc.module_error(student, teacher, spec, batches)
    opt = rc.optimizer(student, 1e-4, 1e-4)
    for step in range(40):
        loss, _ = rc.reconstruction_loss(student, teacher, spec, batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mrem_error = rc.module_error(student, teacher, spec, batches)
    assert 0 < mrem_error < 0.8 * rtn_error, f"{name}: MREM {mrem_error:.3g} vs RTN {rtn_error:.3g}"


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("quant", ["w4a8", "w4g16"])
def test_packed_export_loads_back_to_the_same_outputs(name, quant, tmp_path):
    model, batch = _model(name), _batch(name)
    tok = _tokenizer(name)
    checkpoints.save(model, tok, tmp_path / "fp", {"task": "t"})
    fp = checkpoints.load(tmp_path / "fp")
    assert type(fp.model) is type(model) and torch.equal(_logits(fp.model, batch), _logits(model, batch))
    quantize_rtn(fp.model, QuantConfig.parse(quant), [_batch(name, seed=s) for s in range(2)])
    checkpoints.save(fp.model, tok, tmp_path / "q", {"task": "t", "quant": quant}, fmt="packed")
    loaded = checkpoints.load(tmp_path / "q")
    assert type(loaded.model) is type(model)
    assert torch.equal(_logits(loaded.model, batch), _logits(fp.model, batch))


@pytest.mark.parametrize("name", FAMILIES)
def test_modules_loaded_from_safetensors_hold_only_their_share(name, tmp_path):
    model, batch = _model(name), _batch(name)
    checkpoints.save(model, _tokenizer(name), tmp_path / "fp", {"task": "t"})
    lay = probe_layout(tmp_path / "fp")
    assert lay == layout(model)
    x, sizes = None, []
    with torch.no_grad():
        for spec in split_layers(lay.count, 3):
            part = load_part(tmp_path / "fp", spec, lay)
            x, _ = part_forward(part, spec, batch["input_ids"], batch["attention_mask"],
                                batch.get("token_type_ids"), x)
            sizes.append(resident_bytes(part))
    assert torch.equal(x, _logits(model, batch))
    assert sizes[1] < 0.05 * resident_bytes(model)  # the middle module: its blocks, no embeddings or head
    assert max(sizes) < resident_bytes(model)


def test_models_mrem_cannot_split_fail_before_work_with_the_reason(tmp_path):
    from transformers import T5Config, T5ForSequenceClassification

    from pipelines.errors import ConfigError
    from pipelines.evaluation import check_splittable

    T5ForSequenceClassification(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                         vocab_size=100)).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match="several stacks of blocks .*encoder-decoder"):
        check_splittable(str(tmp_path / "t5"))
    model, tok = _model("tiny-llama"), _tokenizer("tiny-llama")
    checkpoints.save(model, tok, tmp_path / "fp", {"task": "wikitext2"})
    check_splittable(str(tmp_path / "fp"))
    quantize_rtn(model, QuantConfig.parse("w8a8"), [_batch("tiny-llama")])
    checkpoints.save(model, tok, tmp_path / "packed", {"task": "wikitext2"}, fmt="packed")
    with pytest.raises(ConfigError, match="'packed' checkpoint; MREM starts from an FP model"):
        check_splittable(str(tmp_path / "packed"))
    (tmp_path / "fp" / "model.safetensors").rename(tmp_path / "fp" / "weights.bin")
    with pytest.raises(ConfigError, match="holds no safetensors weights"):
        check_splittable(str(tmp_path / "fp"))
