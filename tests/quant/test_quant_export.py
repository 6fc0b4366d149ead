import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from quant import calibrate, load_quantized, model_bytes, pack, packed_numel, quantize_model, save_quantized, unpack


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16), as_shape=st.booleans())
def test_pack_unpack_round_trip_is_bit_exact(bits, n, seed, as_shape):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int16)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(n, bits)
    shape = (n,) if as_shape else n
    assert torch.equal(unpack(packed, bits, shape).to(torch.int16), q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_dense(bits):
    q = torch.full((2, 12), 2**bits - 1)
    assert pack(q, bits).numel() == 24 * bits // 8  # 3-bit: 9 bytes, not the 12 of 4-bit storage
    assert torch.equal(unpack(pack(q, bits), bits, (2, 12)).long(), q)  # max code survives
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).item() == 0b10001101  # little-endian bits
    assert pack(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]  # codes straddle bytes


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="expected"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 10)


CONFIGS = ["w8a8", "w4a8", "w2a8", "w1a8", "w4g16a16", "w4a8-e8",
           "w4g16a8-e8-o8:weight.symmetric=false,act.init=mse,act.symmetric=false",
           "w4a8:weight.learnable=true,act.learnable=true,act.init=percentile",
           "w3a8:act.granularity=token,act.symmetric=false,weight.init=mse"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_saved_then_loaded_logits_are_identical(model_factory, kind, config, token_ids, tmp_path):
    model = model_factory[kind]()
    report = quantize_model(model, config)
    with calibrate(model):
        model(input_ids=token_ids[:2])
    with torch.no_grad():
        expected = model(input_ids=token_ids).logits
    size = save_quantized(model, tmp_path)
    assert size == model_bytes(tmp_path) == (tmp_path / "model.safetensors").stat().st_size
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    assert sorted(meta["modules"]) == sorted(report.converted)
    assert meta["config_name"] == report.config
    skeleton = model_factory[kind](seed=7)  # different random weights: all must come from the file
    loaded = load_quantized(skeleton, tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=token_ids).logits
    assert torch.equal(got, expected)


def test_checkpoint_holds_packed_weights_and_scales(model_factory, tmp_path, token_ids):
    model = model_factory["gpt2"]()
    quantize_model(model, "w2a8-e8")
    with calibrate(model):
        model(input_ids=token_ids)
    save_quantized(model, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn"
    assert t[f"{name}.weight.packed"].dtype == torch.uint8
    assert t[f"{name}.weight.packed"].numel() == 96 * 32 // 4  # ternary: 4 codes per byte
    assert t[f"{name}.weight.step"].shape == (96, 1) and f"{name}.weight.threshold" in t  # TWN alpha, delta
    assert t["transformer.wte.weight.packed"].numel() == 100 * 32  # 8-bit embeddings
    assert f"{name}.weight" not in t and f"{name}.act_q.step" in t
    assert "lm_head.weight" in t  # FP head tied to the quantized wte is kept in FP


def test_tied_fp_weights_stored_once(model_factory, tmp_path):
    model = model_factory["gpt2"]()
    quantize_model(model, "w8a16")
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))


@pytest.mark.filterwarnings("ignore:saving .* uncalibrated")  # sizes don't depend on calibration
def test_4bit_file_is_under_a_fifth_of_fp32(model_factory, tmp_path):
    # hidden 256 / intermediate 1024: the linears hold ~95% of the parameters
    model = model_factory["bert-wide"]()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fp32.safetensors"))
    fp32 = (tmp_path / "fp32.safetensors").stat().st_size
    quantize_model(model, "w4a8")
    packed = save_quantized(model, tmp_path / "w4a8")
    assert packed < fp32 / 5, (packed, fp32)  # measured: ~0.16
    assert packed > fp32 / 8 * 0.9  # but not smaller than 4 bits/weight can be


@pytest.mark.filterwarnings("ignore:saving .* uncalibrated")
def test_3bit_file_is_smaller_than_4bit(model_factory, tmp_path):
    sizes = {}
    for config in ("w4a8", "w3a8"):
        model = model_factory["bert-wide"]()
        quantize_model(model, config)
        sizes[config] = save_quantized(model, tmp_path / config)
    packed_4bit = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2) / 2
    assert sizes["w4a8"] - sizes["w3a8"] > 0.2 * packed_4bit  # a quarter of the 4-bit codes' bytes, less rounding


@pytest.mark.filterwarnings("ignore:saving .* uncalibrated")
def test_load_refuses_another_format(model_factory, tmp_path):
    model = model_factory["bert"]()
    quantize_model(model, "w3a8")
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    (tmp_path / "quant_config.json").write_text(json.dumps(meta | {"format": "plmq-packed-v1"}))
    with pytest.raises(ValueError, match="unknown format 'plmq-packed-v1'.*reads plmq-packed-v2"):
        load_quantized(model_factory["bert"](seed=7), tmp_path)


@pytest.mark.filterwarnings("ignore:saving .* uncalibrated")
def test_load_rejects_mismatched_architecture(model_factory, tmp_path):
    model = model_factory["bert"]()
    quantize_model(model, "w8a8")
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="does not match the model"):
        load_quantized(model_factory["gpt2"](), tmp_path)


def test_saving_uncalibrated_activations_warns(model_factory, tmp_path):
    model = model_factory["bert"]()
    quantize_model(model, "w8a8")
    with pytest.warns(UserWarning, match="uncalibrated activation quantizers"):
        save_quantized(model, tmp_path)
