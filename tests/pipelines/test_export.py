"""Stage `export`: quantized models written for ONNX Runtime / OpenVINO (ONNX) and transformers
(compressed-tensors), evaluated in that runtime; what a format cannot hold is refused before work."""
from __future__ import annotations

import pytest
import torch

from pipelines import checkpoints, runtimes
from pipelines.config import ConfigError, load_config
from pipelines.stages import Context, evaluate, export, plan, plan_kinds, rtn
from quant import quant_modules
from quant.deploy import problem, working_formats

TEXTS = ["a good film", "the awful plot and dull acting", "fine"]


def test_formats_say_which_configs_they_hold():
    assert working_formats("w8a8") == ["onnx", "compressed-tensors"]
    assert working_formats("w4g128a16") == ["onnx", "compressed-tensors"]
    assert working_formats("w4a8-e8") == ["compressed-tensors"]
    assert "per-channel" in problem("w4g64a8", "onnx") and problem("w4g64a8", "compressed-tensors") is None
    assert "binary" in problem("w1a8", "onnx") and "binary" in problem("w1a8", "compressed-tensors")
    assert "3-bit" in problem("w3a8", "compressed-tensors")


def test_the_run_plans_an_export_after_each_quantized_model_and_refuses_what_a_format_cannot_hold(tmp_path):
    cfg = load_config(None, ["model=tiny-bert", f"output_dir={tmp_path}", "rtn.quant=[w8a8,w4g16a16]",
                             "export.formats=[onnx,compressed-tensors]"])
    exports = {s.name: s for s in plan(cfg) if s.kind == "export"}
    assert set(exports) == {f"export/rtn/sst2/{q}/{f}" for q in ("w8a8", "w4g16a16") for f in
                            ("onnx", "compressed-tensors")}
    assert exports["export/rtn/sst2/w8a8/onnx"].deps == ("rtn/sst2/w8a8",)
    report = next(s for s in plan(cfg) if s.kind == "report")
    assert set(exports) <= set(report.deps)
    bad = load_config(None, ["model=tiny-bert", f"output_dir={tmp_path}", "rtn.quant=[w4g16a8]",
                             "export.formats=[onnx]"])
    with pytest.raises(ConfigError, match="cannot be exported to onnx: .*Formats that take w4g16a8: "
                                          "compressed-tensors"):
        plan(bad)
    with pytest.raises(ConfigError, match="export.formats: unknown format"):
        load_config(None, ["export.formats=[tflite]"])
    gpt2 = load_config(None, ["model=tiny-gpt2", "tasks=[wikitext2]", f"output_dir={tmp_path}", "rtn.quant=[w8a8]",
                              "export.formats=[onnx]"])
    with pytest.raises(ConfigError, match="is a GPT-2, whose Conv1D layers neither"):
        plan(gpt2)


def _rtn(cfg, checkpoint, root):
    (stage,) = rtn.plan(cfg, checkpoint)
    return rtn.run(cfg, stage, {}, Context(root, "k1"))


@pytest.mark.parametrize("quant,fmt", [("w8a8", "onnx"), ("w2a8", "onnx"), ("w4g16a16", "onnx"),
                                       ("w4a8", "compressed-tensors")])
def test_an_export_scores_what_plmq_scored_in_its_runtime(tiny_teacher, tiny_run_cfg, tmp_path, quant, fmt):
    cfg = tiny_run_cfg(f"rtn.quant=[{quant}]", "rtn.calib_samples=64", f"export.formats=[{fmt}]",
                       "export.latency_batch=4", "export.latency_tokens=16", "export.latency_runs=2")
    source = _rtn(cfg, tiny_teacher, tmp_path / "run")
    (stage,) = export.plan(cfg, source.checkpoint)
    result = export.run(cfg, stage, {}, Context(tmp_path / "run", "k2"))
    assert result.row["value"] == source.row["value"]
    assert result.row["latency_ms"] > 0 and result.info["bytes"] > 0
    assert result.row["method"] == f"rtn-{quant}@{'onnxruntime' if fmt == 'onnx' else 'transformers'}"
    plmq, deployed = checkpoints.load(source.checkpoint), checkpoints.load(result.checkpoint)
    batch = plmq.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = plmq.model(**batch).logits, deployed.model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)  # one int8 grid in plmq and the runtimes
    if fmt == "onnx":  # every quantized Linear runs as an integer matmul in ONNX Runtime
        linears = sum(1 for _ in quant_modules(plmq.model))
        assert runtimes.integer_matmuls(f"{result.checkpoint}/model.onnx") == linears


@pytest.mark.slow
def test_minilm_exports_every_quantized_linear_as_an_integer_matmul(tmp_path):
    """MiniLM (offline) at W8A8: ONNX Runtime fuses all 37 quantized Linears (36 in the encoder, the pooler) and
    gives plmq's logits."""
    from pipelines import models
    from quant import calibrate, quantize_model

    model, tok = models.load_classifier("minilm-l6", 2, seed=0).eval(), models.load_tokenizer("minilm-l6")
    quantize_model(model, "w8a8")
    batch = tok(TEXTS * 4, padding=True, return_tensors="pt")
    with calibrate(model):
        model(**batch)
    checkpoints.save(model, tok, tmp_path / "onnx", {"task": "sst2", "quant": "w8a8"}, "onnx")
    assert runtimes.integer_matmuls(tmp_path / "onnx" / checkpoints.ONNX_FILE) == 37
    test = tok(["an unexpectedly moving and funny film", "no"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(**test).logits
    assert torch.allclose(checkpoints.load(tmp_path / "onnx").model(**test).logits, ours, atol=1e-5)


def test_openvino_runs_the_onnx_export(tiny_teacher, tiny_run_cfg, tmp_path):
    cfg = tiny_run_cfg("rtn.quant=[w8a8]", "rtn.calib_samples=64")
    source = _rtn(cfg, tiny_teacher, tmp_path / "run")
    plmq = checkpoints.load(source.checkpoint)
    checkpoints.save(plmq.model, plmq.tokenizer, tmp_path / "onnx", {**plmq.meta, "runtime": "openvino"}, "onnx")
    ort_model = runtimes.OnnxModel(tmp_path / "onnx" / checkpoints.ONNX_FILE)
    ov_model = checkpoints.load(tmp_path / "onnx").model
    batch = plmq.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert ov_model.runtime == "openvino"
    ours = ort_model(**batch).logits
    assert torch.allclose(ov_model(**batch).logits, ours, atol=0.02 * ours.abs().max().item())


def test_plmq_evaluate_runs_an_export_in_its_runtime_and_other_verbs_refuse_it(tiny_teacher, tiny_run_cfg, tmp_path):
    cfg = tiny_run_cfg("rtn.quant=[w8a8]", "rtn.calib_samples=64", "export.formats=[onnx]")
    source = _rtn(cfg, tiny_teacher, tmp_path / "run")
    (stage,) = export.plan(cfg, source.checkpoint)
    exported = export.run(cfg, stage, {}, Context(tmp_path / "run", "k2")).checkpoint
    (ev, _) = plan_kinds(cfg, ("evaluate",), exported)  # the evaluate stage, then the report
    row = evaluate.run(cfg, ev, {}, Context(tmp_path / "ev", "k3")).row
    assert row["method"] == "checkpoint@onnxruntime" and row["bits"] == 8 and row["value"] == source.row["value"]
    with pytest.raises(ConfigError, match="is an export \\(format onnx\\).*plmq evaluate takes it"):
        plan_kinds(cfg, ("rtn",), exported)


def test_export_of_an_unquantized_or_unexportable_checkpoint_fails_before_work(tiny_teacher, tiny_run_cfg, tmp_path):
    with pytest.raises(ConfigError, match="is not quantized"):
        export.plan(tiny_run_cfg("export.formats=[onnx]"), tiny_teacher)
    cfg = tiny_run_cfg("rtn.quant=[w4a8-e8]", "rtn.calib_samples=32")
    source = _rtn(cfg, tiny_teacher, tmp_path / "run")
    with pytest.raises(ConfigError, match="quantized embeddings .* Formats that take w4a8-e8: compressed-tensors"):
        export.plan(tiny_run_cfg("export.formats=[onnx]"), source.checkpoint)
