"""GPTQ as a post-training method (pipelines.gptq_model, stage `gptq`): closer to the FP model than RTN on
several families, on RTN's grids, exported bit-exact; the stage through the runner; its config errors."""
from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from tiny_models import tokenizer as _tokenizer
from typer.testing import CliRunner

from pipelines import checkpoints, lm_eval
from pipelines.cli import app
from pipelines.config import ConfigError, load_config
from pipelines.evaluation import check_inputs, evaluate_model, quantize_rtn
from pipelines.gptq_model import gptq_quantize
from pipelines.partition import PartSpec, layout, part_forward
from quant import QuantConfig, QuantLinear, freeze, quantizers

ENCODERS = ["tiny-bert", "tiny-roberta", "tiny-electra"]
DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-opt"]


def _model(name: str) -> torch.nn.Module:
    return tiny_models.model(name)


def _batch(name: str, seed: int, n: int = 8, length: int = 16, pad_id: int = 0) -> dict[str, torch.Tensor]:
    return tiny_models.batch(name, seed, n, length, pad_id=pad_id)


def _calibration(name: str, **kwargs) -> list[dict]:
    return [_batch(name, seed, **kwargs) for seed in range(8)]


@torch.no_grad()
def _outputs(model, batch) -> list[torch.Tensor]:
    """Every block's output, then the logits."""
    spec = PartSpec(0, 0, layout(model).count, 1)
    logits, blocks = part_forward(model, spec, batch["input_ids"], batch["attention_mask"],
                                  batch.get("token_type_ids"))
    return [*blocks, logits]


def _errors(model, fp, batches) -> torch.Tensor:
    """Relative error against the FP model per block output and at the logits, averaged over `batches`."""
    per = [[((q - f).norm() / f.norm()).item() for q, f in zip(_outputs(model, b), _outputs(fp, b))]
           for b in batches]
    return torch.tensor(per).mean(0)


def _rounded_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-electra", *DECODERS])
def test_gptq_is_closer_to_fp_than_rtn_per_block_and_at_the_logits(name):
    """On held-out batches of the calibration distribution, at 3 bits in groups of 16."""
    fp, calib, held_out = _model(name), _calibration(name), [_batch(name, seed) for seed in (100, 101)]
    rtn, gptq = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_rtn(rtn, QuantConfig.parse("w3g16"), calib)
    report = gptq_quantize(gptq, "w3g16", calib)
    assert report.rounded and set(report.rounded) == set(report.converted) and not report.unreached
    rtn_err, gptq_err = _errors(rtn, fp, held_out), _errors(gptq, fp, held_out)
    print(f"{name}: RTN {rtn_err.tolist()} GPTQ {gptq_err.tolist()}")
    assert (gptq_err[:-1] < 0.9 * rtn_err[:-1]).all(), f"{name}: per block GPTQ {gptq_err} vs RTN {rtn_err}"
    assert gptq_err[-1] < rtn_err[-1], f"{name}: logits GPTQ {gptq_err[-1]:.4g} vs RTN {rtn_err[-1]:.4g}"


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_weights_sit_on_the_rtn_grid_and_only_the_rounding_differs(name):
    fp, calib = _model(name), _calibration(name)
    rtn, gptq = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_rtn(rtn, QuantConfig.parse("w4g16"), calib)
    freeze(rtn)  # RTN's grid, computed from the FP weights as its dynamic quantizer does
    gptq_quantize(gptq, "w4g16", calib)
    moved = 0
    for name_, layer in _rounded_layers(gptq).items():
        w, ref = layer.linear_weight(), _rounded_layers(rtn)[name_]
        assert torch.equal(layer.weight_q(w), w), f"{name_}: a weight off its grid"
        assert torch.equal(layer.weight_q.step, ref.weight_q.step)
        moved += int((w != ref.quant_weight()).sum())
    assert moved > 0  # GPTQ rounded some weights away from their nearest grid point


def test_heads_stay_fp_unless_include_head():
    calib = _calibration("tiny-llama")
    model = _model("tiny-llama")
    assert "lm_head" not in gptq_quantize(model, "w4g16", calib).converted
    assert not isinstance(model.lm_head, QuantLinear)
    model = _model("tiny-llama")
    report = gptq_quantize(model, "w4g16", calib, include_head=True)
    assert report.rounded[-1] == "lm_head" and isinstance(model.lm_head, QuantLinear)


def _input_gram(model, name: str, batches) -> torch.Tensor:
    """sum X^T X over the real tokens of the input of Linear `name` in a whole-model forward."""
    total, state = [], {}

    def hook(module, args):
        x = args[0][state["mask"].bool()]
        total.append(x.T @ x)

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in batches:
            state["mask"] = b["attention_mask"]
            model(**b)
    handle.remove()
    return sum(total)


def test_each_hessian_is_taken_on_the_outputs_of_the_quantized_layers_before_it(monkeypatch):
    """Block by block: the H a Linear was rounded with is the gram matrix of its input in the final quantized
    model (weights rounded and input ranges fixed upstream), not in the FP model."""
    from pipelines import gptq_model

    used, real = {}, gptq_model.gptq_round

    def spy(weight, hessian, quantizer, **kwargs):
        used[id(quantizer)] = hessian.clone()
        return real(weight, hessian, quantizer, **kwargs)

    monkeypatch.setattr(gptq_model, "gptq_round", spy)
    fp, calib = _model("tiny-llama"), _calibration("tiny-llama")
    model = copy.deepcopy(fp)
    gptq_quantize(model, "w4a8", calib)
    def distance(a, b):
        return ((a - b).norm() / b.norm()).item()

    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.3.self_attn.v_proj"):
        h = used[id(model.get_submodule(name).weight_q)]
        to_quantized, to_fp = distance(h, _input_gram(model, name, calib)), distance(h, _input_gram(fp, name, calib))
        print(f"{name}: {to_quantized:.2e} from the quantized model's inputs, {to_fp:.2e} from the FP model's")
        assert to_quantized < 1e-5, name
        if name != "model.layers.0.self_attn.q_proj":  # the first layer reads the (unquantized) embeddings
            assert to_fp > 1e-2, name


def test_padding_does_not_reach_the_hessians():
    """The rounded weights depend on the real tokens only: other ids at the padded positions change nothing."""
    a, b = _model("tiny-llama"), _model("tiny-llama")
    gptq_quantize(a, "w3g16", _calibration("tiny-llama", pad_id=0))
    gptq_quantize(b, "w3g16", _calibration("tiny-llama", pad_id=1500))
    for (name, la), lb in zip(_rounded_layers(a).items(), _rounded_layers(b).values()):
        assert torch.equal(la.weight, lb.weight), name


@pytest.mark.parametrize("name,quant", [("tiny-bert", "w4a8"), ("tiny-gpt2", "w4g16"), ("tiny-llama", "w4a8"),
                                        ("tiny-opt", "w3g16a8")])
def test_packed_export_loads_back_to_the_same_logits(name, quant, tmp_path):
    tok = _tokenizer(name)
    checkpoints.save(_model(name), tok, tmp_path / "fp", {"task": "t"})  # as the stage starts: from a checkpoint
    model = checkpoints.load(tmp_path / "fp").model
    gptq_quantize(model, quant, _calibration(name))
    acts = [q for _, q in quantizers(model, "act")]
    assert bool(acts) == (QuantConfig.parse(quant).act is not None)
    assert all(q.enabled and q._ready for q in acts)  # every input range calibrated
    checkpoints.save(model, tok, tmp_path / "q", {"task": "t", "quant": quant}, fmt="packed")
    loaded = checkpoints.load(tmp_path / "q")
    assert type(loaded.model) is type(model)
    batch = _batch(name, 100)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, model(**batch).logits)


# --- config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("gptq.quant=[w2a8]", r"gptq.quant\[0\]='w2a8': GPTQ rounds onto uniform grids, not ternary weights; .*w2g64"),
    ("gptq.quant=[w4a8,w1a8]", r"gptq.quant\[1\]='w1a8': .* not binary weights"),
    ("gptq.quant=[w4q8]", r"gptq.quant\[0\]='w4q8': config name"),
    ("gptq.calib_samples=0", r"gptq.calib_samples=0: must be >= 1, e.g. 128"),
    ("gptq.batch_size=-1", r"gptq.batch_size=-1: must be >= 1, e.g. 8"),
    ("gptq.block_size=0", r"gptq.block_size=0: must be >= 1, e.g. 128"),
    ("gptq.damp=0", r"gptq.damp=0.0: .* in \(0, 1\), e.g. 0.01"),
    ("gptq.damp=1.5", r"gptq.damp=1.5: "),
    ("gptq.steps=3", r"unknown config key 'gptq.steps'"),
])
def test_bad_gptq_settings_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_gptq_settings_parse_and_are_checked_against_the_model_and_text_before_work(tmp_path, cache_dir):
    cfg = load_config(None, ["gptq.quant=[w4g128,w2g64,w4a8]", "gptq.damp=0.1"])
    assert cfg.gptq.quant == ["w4g128", "w2g64", "w4a8"] and cfg.gptq.damp == 0.1 and cfg.gptq.calib_samples == 128
    cfg = load_config(None, ["model=tiny-bert", "tasks=[sst2]", "gptq.quant=[w4g16,w4g128]"])
    with pytest.raises(ConfigError, match=r"gptq.quant\[1\]='w4g128': groups of 128 weights do not divide the "
                                          r"input width 32 of bert.encoder.layer.0.attention.self.query"):
        check_inputs(cfg, "tiny-bert")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of a small text to calibrate on" for i in range(200)) + "\n")
    cfg = load_config(None, ["model=tiny-llama", f"tasks=[text:{text}]", "data.max_length=16",
                             f"data.cache_dir={cache_dir}", "gptq.quant=[w4g16]", "gptq.calib_samples=5000"])
    (warning,) = lm_eval.check_lm_tasks(cfg, "tiny-llama")
    assert "gptq.calib_samples=5000 windows of data.max_length=16 tokens need 80000" in warning


def test_cli_verb_plans_gptq_stages_of_a_checkpoint(tmp_path):
    checkpoints.save(_model("tiny-llama"), _tokenizer("tiny-llama"), tmp_path / "fp", {"task": "wikitext2"})
    base = ["gptq", str(tmp_path / "fp"), "--task", "wikitext2", "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*base, "--quant", "w4g16", "--quant", "w4a8", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "gptq/wikitext2/w4g16a16" in result.output and "gptq/wikitext2/w4a8" in result.output
    assert "rtn/" not in result.output
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2 and "no QuantConfig: pass --quant w4g128 or set gptq.quant" in result.output
    result = CliRunner().invoke(app, [*base, "--quant", "w2a8"])
    assert result.exit_code == 2 and "GPTQ rounds onto uniform grids, not ternary weights" in result.output


@pytest.mark.ray
@pytest.mark.slow
def test_gptq_stage_through_the_runner_reports_ppl_of_the_export(ray_session, mlflow_uri, tmp_path, cache_dir):
    cfg = load_config(None, ["model=tiny-llama", "tasks=[wikitext2]", f"output_dir={tmp_path / 'out'}",
                             "experiment=gptq-test", "data.max_length=32", "data.eval_examples=8",
                             f"data.cache_dir={cache_dir}", "evaluate.batch_size=4", "rtn.quant=[w3g16]",
                             "rtn.calib_samples=16", "gptq.quant=[w3g16]", "gptq.calib_samples=16",
                             "gptq.batch_size=4"])
    from pipelines.runner import run

    summary = run(cfg)
    rows = {r["method"]: r for r in summary.rows}
    assert set(rows) == {"fp", "rtn-w3g16a16", "gptq-w3g16a16"} and {r["metric"] for r in rows.values()} == {"ppl"}
    gptq = rows["gptq-w3g16a16"]
    assert gptq["bits"] == 3 and gptq["model_MB"] == rows["rtn-w3g16a16"]["model_MB"] < rows["fp"]["model_MB"]
    assert "| wikitext2 | gptq-w3g16a16 | 3 | ppl |" in summary.table
    outcome = summary.outcomes["gptq/wikitext2/w3g16a16"]
    assert outcome["info"]["rounded"] == outcome["info"]["converted"] == 28 and not outcome["info"]["unreached"]
    assert outcome["info"]["calib_tokens"] == 16 * 32
    exported = checkpoints.load(outcome["checkpoint"])
    assert exported.meta["method"] == "gptq" and exported.meta["format"] == "packed"
    direct = evaluate_model(exported.model, exported.tokenizer, "wikitext2", cfg.data, cfg.evaluate)
    assert gptq["value"] == round(direct.metrics["ppl"], 2)  # the row scores the export
