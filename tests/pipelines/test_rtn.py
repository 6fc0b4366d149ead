"""Stage `rtn`: converts, calibrates, exports packed, evaluates the export."""
from __future__ import annotations

import pytest
import torch

from pipelines import checkpoints, models
from pipelines.config import ConfigError, load_config
from pipelines.evaluation import calibration_batches, quantize_rtn
from pipelines.stages import Context, rtn
from quant import QuantConfig

TEXTS = ["a good film", "the awful plot and dull acting"]


def run_rtn(cfg, checkpoint, quant, root):
    (stage,) = [s for s in rtn.plan(cfg, checkpoint) if s.quant == quant]
    return rtn.run(cfg, stage, {}, Context(root, "k1"))


def rtn_in_memory(checkpoint, quant, cfg):
    fp = checkpoints.load(checkpoint)
    quantize_rtn(fp.model, QuantConfig.parse(quant), calibration_batches("sst2", fp.tokenizer, cfg.data, 64, 32))
    return fp.model.eval(), fp.tokenizer


@pytest.mark.parametrize("quant", ["w8a8", "w4a8-e8", "w2a8"])
def test_rtn_exports_a_smaller_model_with_the_same_outputs(tiny_teacher, tiny_run_cfg, tmp_path, quant):
    cfg = tiny_run_cfg(f"rtn.quant=[{quant}]", "rtn.calib_samples=64")
    result = run_rtn(cfg, tiny_teacher, quant, tmp_path / "run")
    assert result.info["packed_bytes"] < result.info["fp_bytes"]
    assert result.info["converted"] > 0 and 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    assert result.metrics["model_bytes"] == result.info["packed_bytes"]
    assert result.row["method"] == f"rtn-{QuantConfig.parse(quant)}" and result.row["bits"] < 32

    # the packed export gives exactly the logits of the in-memory fake-quant model
    model, tok = rtn_in_memory(tiny_teacher, quant, cfg)
    loaded = checkpoints.load(result.checkpoint)
    assert loaded.meta["format"] == "packed"
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)


def test_rtn_low_bits_move_outputs_more_than_high_bits(tiny_teacher, tiny_run_cfg):
    cfg = tiny_run_cfg()
    fp = checkpoints.load(tiny_teacher)
    batch = fp.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = fp.model(**batch).logits
        errors = {q: (rtn_in_memory(tiny_teacher, q, cfg)[0](**batch).logits - ref).norm().item()
                  for q in ("w8a8", "w2a8")}
    assert 0 < errors["w8a8"] < errors["w2a8"]


def test_bad_quant_config_fails_before_work():
    with pytest.raises(ConfigError, match=r"rtn.quant\[0\]='w17a8'"):
        load_config(None, ["rtn.quant=[w17a8]"])


def test_packed_export_keeps_mean_pooling(tiny_run_cfg, tmp_path):
    tok = models.load_tokenizer("tiny-bert")
    checkpoints.save(models.load_classifier("tiny-bert", 2, seed=3, pooling="mean"), tok, tmp_path / "fp",
                     {"task": "sst2"}, "fp")
    cfg = tiny_run_cfg("rtn.quant=[w8a8]", "rtn.calib_samples=64")
    result = run_rtn(cfg, str(tmp_path / "fp"), "w8a8", tmp_path / "run")
    model, _ = rtn_in_memory(str(tmp_path / "fp"), "w8a8", cfg)
    loaded = checkpoints.load(result.checkpoint).model
    assert isinstance(loaded.bert.pooler, models.MeanPooler)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_two_checkpoints_quantized_into_one_output_folder_keep_both_exports(tiny_teacher, tiny_run_cfg, tmp_path):
    """`plmq rtn A` then `plmq rtn B` with one --output-dir: B's export goes beside A's, not over it."""
    other = tmp_path / "other"
    checkpoints.save(models.load_classifier("tiny-bert", 2, seed=4), models.load_tokenizer("tiny-bert"), other,
                     {"task": "sst2"}, "fp")
    cfg = tiny_run_cfg("rtn.quant=[w8a8]", "rtn.calib_samples=16")
    first = run_rtn(cfg, tiny_teacher, "w8a8", tmp_path / "run")
    second = run_rtn(cfg, str(other), "w8a8", tmp_path / "run")
    assert first.checkpoint != second.checkpoint and first.outputs != second.outputs
    assert first.outputs.startswith("sst2/rtn/w8a8-ckpt-") and second.outputs.startswith("sst2/rtn/w8a8-ckpt-")
    a, b = checkpoints.load(first.checkpoint).model, checkpoints.load(second.checkpoint).model
    assert not torch.equal(a.classifier.weight, b.classifier.weight)  # A's export is still A's
    assert run_rtn(cfg, tiny_teacher, "w8a8", tmp_path / "run").checkpoint == first.checkpoint  # A again: its own


def test_a_stage_of_the_config_exports_where_it_always_did(tmp_path):
    from pipelines.stages.base import Stage, export_folder

    folder = tmp_path / "sst2" / "rtn" / "w4a8"
    assert export_folder(folder, Stage("rtn/sst2/w4a8", "rtn", "sst2", "w4a8")) == folder
    given = Stage("rtn/sst2/w4a8", "rtn", "sst2", "w4a8", checkpoint=str(tmp_path / "ckpt"))
    assert export_folder(folder, given).parent == folder.parent and export_folder(folder, given) != folder
