"""quant.prequant's packed export: save_prequantized / to_skeleton / load_prequantized."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quant import QuantConfig, calibrate
from quant import prequant as pq

CONFIGS = ["w4", "w3", "w2", "w1", "w4g16", "w4a8", "w4:weight.symmetric=false",
           "w8:weight.init=mse,weight.granularity=tensor"]


@pytest.mark.parametrize("quant", CONFIGS)
def test_export_round_trip_is_bit_exact(tmp_path, token_ids, quant, model_factory):
    model = model_factory["bert"]()
    pq.prequantize(model, pq.OutlierConfig(quant, "weight", budget=0.05))
    if QuantConfig.parse(quant).act is not None:
        with calibrate(model):
            model(input_ids=token_ids)
    with torch.no_grad():
        ref = model(input_ids=token_ids).logits
    size = pq.save_prequantized(model, tmp_path, {"note": "test"})
    assert pq.read_manifest(tmp_path)["note"] == "test" and not (tmp_path / "model.safetensors").exists()
    fresh = model_factory["bert"](seed=7)
    pq.to_skeleton(fresh, tmp_path)
    pq.load_prequantized(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, ref)
    fp_linear_bytes = sum(4 * m.weight.numel() for _, m in pq.outlier_modules(model))
    assert size < (tmp_path / pq.WEIGHTS_FILE).stat().st_size + 1 and size > 0
    packed = sum(v.numel() for k, v in load_file(str(tmp_path / pq.WEIGHTS_FILE)).items()
                 if k.endswith(".weight.packed"))
    assert packed * 8 <= fp_linear_bytes * 8 / 4  # at most 8 bits of storage per weight vs 32


def test_3bit_codes_are_packed_densely_and_other_formats_are_refused(tmp_path, token_ids, model_factory):
    model = model_factory["bert"]()
    pq.prequantize(model, pq.OutlierConfig("w3", "weight", budget=0.05))
    pq.save_prequantized(model, tmp_path)
    manifest = pq.read_manifest(tmp_path)
    tensors = load_file(str(tmp_path / pq.WEIGHTS_FILE))
    for name, info in manifest["modules"].items():  # 3 bits per code, not 4
        out_f, in_f = info["shape"]
        assert tensors[f"{name}.weight.packed"].numel() == -(-out_f * in_f * 3 // 8)
    (tmp_path / pq.MANIFEST_FILE).write_text(json.dumps(manifest | {"format": "plmq-prequant-v1"}))
    with pytest.raises(ValueError, match="unknown format 'plmq-prequant-v1'.*reads plmq-prequant-v2"):
        pq.load_prequantized(model_factory["bert"](seed=7), tmp_path)


def test_gpt2_conv1d_layers_are_converted_in_linear_layout(tmp_path, token_ids, model_factory):
    model = model_factory["gpt2"]()
    with torch.no_grad():
        fp = model(input_ids=token_ids).logits
    report = pq.prequantize(model, pq.OutlierConfig("w8", "weight", budget=0.05))
    assert "transformer.h.0.attn.c_attn" in report.modules and "lm_head" not in report.modules
    with torch.no_grad():
        q = model(input_ids=token_ids).logits
    assert 0 < (q - fp).abs().max() < 0.05 * fp.abs().max()
    pq.save_prequantized(model, tmp_path)
    fresh = model_factory["gpt2"](seed=3)
    pq.to_skeleton(fresh, tmp_path)
    pq.load_prequantized(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, q)


def test_a_modified_frozen_weight_is_caught_at_export(tmp_path, model_factory):
    model = model_factory["bert"]()
    pq.prequantize(model, pq.OutlierConfig("w4", "weight", budget=0.05))
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 1] += 1e-3
    with pytest.raises(ValueError, match="no longer on its quantization grid"):
        pq.save_prequantized(model, tmp_path)


def test_peft_lora_wraps_outlier_linear_and_the_export_keeps_the_adapters(tmp_path, token_ids, model_factory):
    from peft import LoraConfig, inject_adapter_in_model

    def build(seed):
        model = model_factory["bert"](seed)
        pq.prequantize(model, pq.OutlierConfig("w4", None))  # plain low-bit base: no FP columns
        return model

    model = build(0)
    targets = [n for n, _ in pq.outlier_modules(model)]
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    inject_adapter_in_model(lora, model)
    names = pq.mark_trainable(model, outliers=False, extra=lambda n: "lora_" in n)
    assert names and all("lora_" in n or n.startswith("classifier.") for n in names)
    model(input_ids=token_ids).logits.sum().backward()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # as if trained
    with torch.no_grad():
        ref = model(input_ids=token_ids).logits
    pq.save_prequantized(model, tmp_path)
    fresh = model_factory["bert"](seed=5)
    pq.to_skeleton(fresh, tmp_path)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets), fresh)
    pq.load_prequantized(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, ref)
