"""Stage `rtn`: converts, calibrates, exports packed, evaluates the export; driver logs it."""
from __future__ import annotations

import pytest
import torch

from pipelines import models
from pipelines.config import ConfigError, DataConfig, EvaluateConfig, RtnConfig, load_config
from quant import QuantConfig
from pipelines.rtn import calibration_batches, load_packed_checkpoint, quantize_rtn, rtn


@pytest.fixture
def tiny_checkpoint(tmp_path):
    tok = models.load_tokenizer("tiny-bert")
    model = models.load_classifier("tiny-bert", 2, seed=3)
    return models.save_checkpoint(model, tok, tmp_path / "fp", {"task": "sst2", "base_model": "tiny-bert"})


@pytest.mark.parametrize("quant", ["w8a8", "w4a8-e8", "w2a8"])
def test_rtn_exports_a_smaller_model_with_the_same_outputs(tiny_checkpoint, separable_glue, cache_dir, tmp_path,
                                                           quant):
    data = DataConfig(source="dir", dir=str(separable_glue), max_length=16, cache_dir=cache_dir)
    result = rtn(tiny_checkpoint, "sst2", quant, data, RtnConfig(calib_samples=64), EvaluateConfig(),
                 tmp_path / "rtn")
    assert result.packed_bytes < result.fp_bytes
    assert result.converted > 0 and 0.0 <= result.eval.metrics["accuracy"] <= 1.0
    assert result.eval.model_bytes == result.packed_bytes

    # the packed export gives exactly the logits of the in-memory fake-quant model
    model, tok, _ = models.load_checkpoint(tiny_checkpoint)
    quantize_rtn(model, QuantConfig.parse(quant),
                 calibration_batches("sst2", tok, data, 64, 32))
    loaded, _ = load_packed_checkpoint(result.checkpoint)
    batch = tok(["a good film", "the awful plot and dull acting"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded.eval()(**batch).logits)


def test_rtn_low_bits_move_outputs_more_than_high_bits(tiny_checkpoint, separable_glue, cache_dir):
    data = DataConfig(source="dir", dir=str(separable_glue), max_length=16, cache_dir=cache_dir)
    fp, tok, _ = models.load_checkpoint(tiny_checkpoint)
    batch = tok(["a good film", "the awful plot and dull acting"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = fp.eval()(**batch).logits
        errors = {}
        for quant in ("w8a8", "w2a8"):
            model, _, _ = models.load_checkpoint(tiny_checkpoint)
            quantize_rtn(model, QuantConfig.parse(quant),
                         calibration_batches("sst2", tok, data, 64, 32))
            errors[quant] = (model.eval()(**batch).logits - ref).norm().item()
    assert 0 < errors["w8a8"] < errors["w2a8"]


def test_bad_quant_config_fails_before_work():
    with pytest.raises(ConfigError, match=r"rtn.quant\[0\]='w17a8'"):
        load_config(None, ["rtn.quant=[w17a8]"])


def test_evaluate_loads_a_packed_export_not_random_weights(tiny_checkpoint, separable_glue, cache_dir, tmp_path):
    from pipelines.evaluate import evaluate, load_any

    data = DataConfig(source="dir", dir=str(separable_glue), max_length=16, cache_dir=cache_dir)
    result = rtn(tiny_checkpoint, "sst2", "w4a8", data, RtnConfig(calib_samples=64), EvaluateConfig(), tmp_path / "r")
    again = evaluate(result.checkpoint, "sst2", data, EvaluateConfig())
    assert again.metrics == result.eval.metrics and again.model_bytes == result.packed_bytes
    model, _, _ = load_any(result.checkpoint)
    assert any(type(m).__name__ == "QuantLinear" for m in model.modules())


def test_packed_export_keeps_mean_pooling(separable_glue, cache_dir, tmp_path):
    tok = models.load_tokenizer("tiny-bert")
    fp = models.save_checkpoint(models.load_classifier("tiny-bert", 2, seed=3, pooling="mean"), tok,
                                tmp_path / "fp", {"task": "sst2"})
    data = DataConfig(source="dir", dir=str(separable_glue), max_length=16, cache_dir=cache_dir)
    result = rtn(fp, "sst2", "w8a8", data, RtnConfig(calib_samples=32), EvaluateConfig(), tmp_path / "rtn")
    model, _, _ = models.load_checkpoint(fp)
    quantize_rtn(model, QuantConfig.parse("w8a8"), calibration_batches("sst2", tok, data, 32, 32))
    loaded, _ = load_packed_checkpoint(result.checkpoint)
    assert isinstance(loaded.bert.pooler, models.MeanPooler)
    batch = tok(["a good film", "the awful plot and dull acting"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded.eval()(**batch).logits)
