"""quant.deploy.compressed_tensors: plmq models written with compressed-tensors load in transformers with
plmq's codes, scales and logits.

plmq's int8 activation grid is compressed-tensors' ([-128, 127]), so the loaded model does the same float
operations as plmq's fake quantization: logits agree to SAME_GRID_TOL, also for inputs outside the
calibrated range.
"""

import json

import pytest
import torch
import transformers

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from quant import QuantLinear, calibrate, quant_modules, quantize_model  # noqa: E402
from quant.deploy.compressed_tensors import save_compressed_tensors  # noqa: E402

SAME_GRID_TOL = 1e-5  # same arithmetic, only float reassociation could differ
SUPPORTED = "w8a8, w4a8, w2a8, w4g128a16 or w8a16"
BERT_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, num_labels=2)
LLAMA_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, max_position_embeddings=64)


def make(kind: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT_KW)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_KW, **overrides})).eval()


def auto_class(kind: str):
    return transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM


def ids(seed: int, shape=(3, 24)) -> torch.Tensor:
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def quantized(kind: str, config: str, **overrides) -> transformers.PreTrainedModel:
    """RTN as pipelines.evaluation.quantize_rtn: convert, calibrate on a random batch (not the test batch)."""
    model = make(kind, **overrides)
    quantize_model(model, config)
    with calibrate(model):
        model(input_ids=ids(1, (2, 16)))
    return model


def stored_codes(directory, bits: int) -> dict[str, torch.Tensor]:
    """Integer codes per layer from model.safetensors: int8 `weight`, or `weight_packed` unpacked with
    compressed-tensors' own function."""
    t = load_file(str(directory / "model.safetensors"))
    out = {k.removesuffix(".weight_packed"): unpack_from_int32(v, bits, t[k.replace("_packed", "_shape")])
           for k, v in t.items() if k.endswith(".weight_packed")}
    out.update({k.removesuffix(".weight"): v for k, v in t.items() if k.endswith(".weight") and v.dtype == torch.int8})
    return out


CASES = [  # kind, config, format of the linears' config group
    ("bert", "w8a8", "int-quantized"),
    ("bert", "w4a8", "pack-quantized"),
    ("bert", "w2a8", "pack-quantized"),
    ("bert", "w4g16a16", "pack-quantized"),  # group 128 does not divide the tiny width 32
    ("bert", "w8a16", "pack-quantized"),
    ("bert", "w8a8-e8", "int-quantized"),
    ("llama", "w8a8", "int-quantized"),
    ("llama", "w4a8", "pack-quantized"),
    ("llama", "w2a8", "pack-quantized"),
    ("llama", "w4g16a16", "pack-quantized"),
    ("llama", "w4a8-e8", "pack-quantized"),
]


@pytest.mark.parametrize(("kind", "config", "fmt"), CASES)
def test_export_loads_in_transformers_with_plmq_codes_scales_and_logits(kind, config, fmt, tmp_path):
    model = quantized(kind, config)
    x = ids(2)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    save_compressed_tensors(model, tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    groups = {g["format"]: g for g in qc["config_groups"].values()}
    assert fmt in groups and qc["format"] == ("mixed-precision" if "-e8" in config else fmt)
    assert groups[fmt]["targets"] == ["Linear"]
    assert ("-e8" in config) == (groups.get("naive-quantized", {}).get("weights", {}).get("num_bits") == 8)
    loaded = auto_class(kind).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=SAME_GRID_TOL, rtol=0)

    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    mods = dict(quant_modules(model))
    bits = next(m.weight_q.spec.bits for m in mods.values() if isinstance(m, QuantLinear))
    codes = stored_codes(tmp_path / "out", bits)
    assert sorted(codes) == sorted(mods)
    for name, m in mods.items():
        q, params = m.weight_q.codes(m.linear_weight())
        assert torch.equal(codes[name], q.to(torch.int8)), name  # bit for bit
        scale = tensors[f"{name}.weight_scale"]
        assert torch.equal(scale, params["step"].reshape(scale.shape)), name
        if getattr(m, "act_q", None) is not None:
            assert torch.equal(tensors[f"{name}.input_scale"], m.act_q.step.reshape(1)), name


def test_inputs_outside_the_calibrated_range_clamp_alike(tmp_path):
    """Inputs below the calibrated range reach code -128 in both plmq and compressed-tensors."""
    model = make("llama")
    quantize_model(model, "w8a8")
    with calibrate(model):
        model(input_ids=ids(1, (1, 4)))  # a tiny calibration batch: the test batch exceeds its range
    x = ids(2)
    save_compressed_tensors(model, tmp_path / "out")
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=x).logits
        expected = model(input_ids=x).logits
    assert (got - expected).abs().max().item() <= SAME_GRID_TOL


@pytest.mark.parametrize(("kind", "config", "layer", "why"), [
    ("bert", "w1a8", "bert.encoder.layer.0.attention.self.query", "binary"),
    ("bert", "w3a8", "bert.encoder.layer.0.attention.self.query", "3-bit"),
    ("bert", "w4a8:weight.symmetric=false", "bert.encoder.layer.0.attention.self.query", "asymmetric"),
    ("bert", "w8a8:act.granularity=token", "bert.encoder.layer.0.attention.self.query", "int8 per-tensor"),
    ("bert", "w8a8-o8", "bert.encoder.layer.0.attention.self.query", "output"),
    ("gpt2", "w8a8", "transformer.h.0.attn.c_attn", "Conv1D"),
    ("llama-tied", "w8a8-e8", "model.embed_tokens", "tied"),
])
def test_unsupported_configs_raise_before_writing(kind, config, layer, why, tmp_path, tiny_gpt2):
    if kind == "gpt2":
        model = tiny_gpt2
        quantize_model(model, config)
    else:
        model = quantized("bert", config) if kind == "bert" else quantized("llama", config, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=SUPPORTED) as err:
        save_compressed_tensors(model, tmp_path / "out")
    assert layer in str(err.value) and why in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary sibling


def test_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path, monkeypatch):
    model = quantized("bert", "w8a8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed_tensors(model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    monkeypatch.undo()
    save_compressed_tensors(model, out)  # replaces the old folder
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
