"""quant.outliers: outlier-column selection, the budget, OutlierLinear and its packed export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import QuantConfig, Quantizer, calibrate
from quant import outliers as ol

PLANTED = [5, 77, 100]


def planted_weight(seed: int = 0) -> torch.Tensor:
    """[64, 128] small weights with three columns holding a few very large entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * 0.02
    for j, c in enumerate(PLANTED):
        w[j * 7: j * 7 + 3, c] = torch.tensor([0.9, -1.1, 0.8]) * (1 + j)
    return w


def test_weight_criterion_picks_the_planted_outlier_columns():
    w = planted_weight()
    scores = ol.column_scores("weight", w)
    assert set(scores.topk(3).indices.tolist()) == set(PLANTED)
    layer = nn.Sequential(nn.Linear(128, 64))
    layer[0].weight.data.copy_(w)
    body = sum(p.numel() for p in layer.parameters())
    plan = ol.plan_outliers(layer, ol.OutlierConfig("w4", "weight", budget=(3 * 64 + 10) / body))
    assert sorted(plan["0"].tolist()) == PLANTED  # r = 3 columns of 64 fit the budget, a 4th does not


def test_activation_criterion_picks_the_layernorm_outlier_dimensions(model_factory):
    model = model_factory["bert"]()
    with torch.no_grad():  # BERT-style LayerNorm outlier dimensions 3 and 17 feed layer 0's query/key/value
        model.bert.embeddings.LayerNorm.weight[[3, 17]] = 40.0
    cfg = ol.OutlierConfig("w4", "activation", budget=0.05)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    act = ol.activation_absmax(model, ol.targets(model, cfg), [{"input_ids": ids[i:i + 1]} for i in range(4)])
    plan = ol.plan_outliers(model, cfg, act)
    for name in ("query", "key", "value"):
        idx = plan[f"bert.encoder.layer.0.attention.self.{name}"]
        assert len(idx) >= 2 and {3, 17} <= set(idx.tolist())
    assert not {3, 17} <= set(ol.plan_outliers(model, ol.OutlierConfig("w4", "weight", budget=0.05))[
        "bert.encoder.layer.0.attention.self.query"].tolist())  # the weights alone do not show them
    with pytest.raises(ValueError, match="needs activation statistics"):
        ol.plan_outliers(model, cfg)


def test_random_criterion_is_reproducible_per_seed_and_criteria_are_pluggable(monkeypatch, model_factory):
    model = model_factory["bert"]()
    plans = [ol.plan_outliers(model, ol.OutlierConfig("w4", "random", budget=0.05, seed=s)) for s in (0, 0, 1)]
    name = "bert.encoder.layer.0.output.dense"
    assert torch.equal(plans[0][name], plans[1][name]) and not torch.equal(plans[0][name], plans[2][name])
    monkeypatch.setitem(ol.CRITERIA, "last", ol.Criterion(lambda w, act, gen: torch.arange(w.shape[1]).float()))
    plan = ol.plan_outliers(model, ol.OutlierConfig("w4", "last", budget=0.05))
    assert all(set(idx.tolist()) == set(range(model.get_submodule(n).in_features - len(idx),
                                              model.get_submodule(n).in_features)) for n, idx in plan.items())


def test_column_blocks_spend_the_whole_budget_in_the_last_blocks(model_factory):
    assert [ol.block_index(n) for n in ("bert.encoder.layer.11.output.dense", "transformer.h.3.mlp.c_fc",
                                         "bert.pooler.dense")] == [11, 3, None]
    model = model_factory["bert"](vocab_size=30522)
    full = ol.plan_outliers(model, ol.OutlierConfig("w4", "weight", budget=0.004))
    top = ol.plan_outliers(model, ol.OutlierConfig("w4", "weight", budget=0.004, column_blocks=1))
    assert full.keys() == top.keys()
    last = max(ol.block_index(n) for n in top if ol.block_index(n) is not None)
    params = {p: sum(len(i) * model.get_submodule(n).out_features for n, i in plan.items())
              for p, plan in (("full", full), ("top", top))}
    assert abs(params["top"] - params["full"]) <= 0.0005 * ol.body_params(model)
    assert all(len(i) == 0 for n, i in top.items() if ol.block_index(n) not in (None, last))
    assert all(len(top[n]) > len(full[n]) for n in top if ol.block_index(n) == last)
    one_block = ol.OutlierConfig("w4", "weight", budget=0.004, column_blocks=1)
    assert ol.column_targets(ol.targets(model, one_block), one_block) == \
        [n for n in top if ol.block_index(n) in (None, last)]
    assert ol.column_targets(list(top), ol.OutlierConfig("w4", None, column_blocks=1)) == []  # no criterion: none
    with pytest.raises(ValueError, match="column_blocks=0"):
        ol.plan_outliers(model, ol.OutlierConfig("w4", "weight", budget=0.004, column_blocks=0))


@pytest.mark.parametrize("budget", [0.002, 0.005, 0.01])
@pytest.mark.parametrize("reserved", [0, 1500])
def test_budget_gives_the_requested_percentage_of_parameters(budget, reserved, model_factory):
    model = model_factory["bert"](vocab_size=30522)  # tiny-bert size: ~1.0M params, 0.03M in Linears
    report = ol.prequantize(model, ol.OutlierConfig("w4", "weight", budget=budget, reserved=reserved))
    used = 100 * (report.outlier_params + reserved) / report.body_params
    assert abs(used - 100 * budget) <= 0.05 and report.outlier_params + reserved <= budget * report.body_params
    assert len(set(report.modules.values()) - {0}) >= 1
    trainable = ol.mark_trainable(model, outliers=True, head=False)
    assert ol.trainable_count(model) == report.outlier_params and all(n.endswith(".outlier") for n in trainable)


def test_allocate_respects_caps_and_rejects_impossible_targets(model_factory):
    costs, caps = {"a": 10, "b": 30}, {"a": 5, "b": 1}
    units = ol.allocate(costs, caps, 75, {"b": 1.0})
    assert units["b"] <= 1 and units["a"] <= 5 and 75 - 10 < sum(units[n] * costs[n] for n in costs) <= 75
    assert ol.allocate(costs, caps, 80) == {"a": 5, "b": 1}
    for bad in (-1, 81):
        with pytest.raises(ValueError, match="outside what the layers hold"):
            ol.allocate(costs, caps, bad)
    with pytest.raises(ValueError, match="leaves no room"):
        ol.plan_outliers(model_factory["bert"](), ol.OutlierConfig("w4", "weight", budget=0.001, reserved=10**6))
    with pytest.raises(ValueError, match="exceeds the 17408 weights of the quantized layers"):
        ol.plan_outliers(model_factory["bert"](vocab_size=30522), ol.OutlierConfig("w4", "weight", budget=0.5))


def test_outlier_linear_keeps_fp_columns_and_quantizes_the_rest_on_their_own_grid():
    w, b = planted_weight(), torch.randn(64) * 0.1
    m = ol.OutlierLinear.from_linear(w, b, "w4", torch.tensor(PLANTED))
    eff = m.effective_weight()
    keep = [j for j in range(128) if j not in PLANTED]
    assert torch.equal(eff[:, PLANTED], w[:, PLANTED]) and torch.equal(m.weight[:, PLANTED], torch.zeros(64, 3))
    per_row = Quantizer(QuantConfig.parse("w4").weight, dynamic=True)(w[:, keep])
    assert torch.equal(eff[:, keep], per_row)  # grid of the other columns, not stretched by the outliers
    rtn = Quantizer(QuantConfig.parse("w4").weight, dynamic=True)(w)
    assert (eff - w).norm() < 0.5 * (rtn - w).norm()
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(m(x), F.linear(x, eff, b))


def test_only_the_outlier_columns_receive_gradients():
    m = ol.OutlierLinear.from_linear(planted_weight(), None, "w3", torch.tensor(PLANTED))
    frozen = m.weight.detach().clone()
    m(torch.randn(4, 128)).square().sum().backward()
    assert not m.weight.requires_grad and m.weight.grad is None
    assert m.outlier.grad is not None and m.outlier.grad.abs().sum() > 0
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(m.weight, frozen)


class Wrapped(nn.Module):  # input_stats feeds models keyword batches
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_loud_outlier_columns_take_proportionally_smaller_steps():
    m = ol.OutlierLinear.from_linear(planted_weight(), None, "w4", torch.tensor(PLANTED))
    gain = torch.ones(128)
    gain[PLANTED[0]], gain[PLANTED[1]] = 10.0, 4.0  # inputs 10x and 4x the other features' RMS
    batches = [{"x": torch.randn(64, 128, generator=torch.Generator().manual_seed(i)) * gain} for i in range(4)]
    factors = ol.set_outlier_lr(Wrapped(m), batches)["layer"]
    torch.testing.assert_close(factors, torch.tensor([0.1, 0.25, 1.0]), atol=0.03, rtol=0)
    assert m.outlier_lr is not None and "outlier_lr" not in m.state_dict()  # not part of the stored model

    plain = ol.OutlierLinear.from_linear(planted_weight(), None, "w4", torch.tensor(PLANTED))
    steps = []
    for layer in (plain, m):
        start = layer.outlier.detach().clone()
        opt = torch.optim.AdamW([layer.outlier], lr=0.01)
        assert ol.scale_outlier_steps(opt, layer) == (layer is m)  # all-1 factors: no hook
        layer(batches[0]["x"]).square().sum().backward()
        opt.step()  # one step from the same start: the same Adam step, scaled column by column
        steps.append(layer.outlier.detach() - start)
    torch.testing.assert_close(steps[1], steps[0] * m.outlier_lr, rtol=1e-4, atol=1e-7)
    assert torch.equal(m.weight, plain.weight)  # the frozen low-bit weight is untouched


CONFIGS = ["w4", "w3", "w2", "w1", "w4g16", "w4a8", "w4:weight.symmetric=false",
           "w8:weight.init=mse,weight.granularity=tensor"]


@pytest.mark.parametrize("quant", CONFIGS)
def test_export_round_trip_is_bit_exact(tmp_path, token_ids, quant, model_factory):
    model = model_factory["bert"]()
    ol.prequantize(model, ol.OutlierConfig(quant, "weight", budget=0.05))
    if QuantConfig.parse(quant).act is not None:
        with calibrate(model):
            model(input_ids=token_ids)
    with torch.no_grad():
        ref = model(input_ids=token_ids).logits
    size = ol.save_outlier_model(model, tmp_path, {"note": "test"})
    assert ol.read_manifest(tmp_path)["note"] == "test" and not (tmp_path / "model.safetensors").exists()
    fresh = model_factory["bert"](seed=7)
    ol.to_skeleton(fresh, tmp_path)
    ol.load_weights(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, ref)
    fp_linear_bytes = sum(4 * m.weight.numel() for _, m in ol.outlier_modules(model))
    assert size < (tmp_path / ol.WEIGHTS_FILE).stat().st_size + 1 and size > 0
    packed = sum(v.numel() for k, v in ol.load_file(str(tmp_path / ol.WEIGHTS_FILE)).items()
                 if k.endswith(".weight.packed"))
    assert packed * 8 <= fp_linear_bytes * 8 / 4  # at most 8 bits of storage per weight vs 32


def test_3bit_codes_are_packed_densely_and_v1_artefacts_still_load(tmp_path, token_ids, model_factory):
    import json

    from safetensors.torch import save_file

    from quant import legacy_width, pack, unpack
    model = model_factory["bert"]()
    ol.prequantize(model, ol.OutlierConfig("w3", "weight", budget=0.05))
    with torch.no_grad():
        ref = model(input_ids=token_ids).logits
    ol.save_outlier_model(model, tmp_path)
    manifest = ol.read_manifest(tmp_path)
    tensors = ol.load_file(str(tmp_path / ol.WEIGHTS_FILE))
    for name, info in manifest["modules"].items():  # 3 bits per code; v1 stored them in 4
        out_f, in_f = info["shape"]
        assert tensors[f"{name}.weight.packed"].numel() == -(-out_f * in_f * 3 // 8)
        codes = unpack(tensors[f"{name}.weight.packed"], 3, info["shape"])
        tensors[f"{name}.weight.packed"] = pack(codes, 3, legacy_width(3))
    save_file(tensors, str(tmp_path / ol.WEIGHTS_FILE))
    (tmp_path / ol.MANIFEST_FILE).write_text(json.dumps(manifest | {"format": "plmq-prequant-v1"}))
    fresh = model_factory["bert"](seed=7)
    ol.to_skeleton(fresh, tmp_path)
    ol.load_weights(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, ref)


def test_gpt2_conv1d_layers_are_converted_in_linear_layout(tmp_path, token_ids, model_factory):
    model = model_factory["gpt2"]()
    with torch.no_grad():
        fp = model(input_ids=token_ids).logits
    report = ol.prequantize(model, ol.OutlierConfig("w8", "weight", budget=0.05))
    assert "transformer.h.0.attn.c_attn" in report.modules and "lm_head" not in report.modules
    with torch.no_grad():
        q = model(input_ids=token_ids).logits
    assert 0 < (q - fp).abs().max() < 0.05 * fp.abs().max()
    ol.save_outlier_model(model, tmp_path)
    fresh = model_factory["gpt2"](seed=3)
    ol.to_skeleton(fresh, tmp_path)
    ol.load_weights(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, q)


def test_a_modified_frozen_weight_is_caught_at_export(tmp_path, model_factory):
    model = model_factory["bert"]()
    ol.prequantize(model, ol.OutlierConfig("w4", "weight", budget=0.05))
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 1] += 1e-3
    with pytest.raises(ValueError, match="no longer on its quantization grid"):
        ol.save_outlier_model(model, tmp_path)


def test_peft_lora_wraps_outlier_linear_and_the_export_keeps_the_adapters(tmp_path, token_ids, model_factory):
    from peft import LoraConfig, inject_adapter_in_model

    def build(seed):
        model = model_factory["bert"](seed)
        ol.prequantize(model, ol.OutlierConfig("w4", None))  # plain low-bit base: no FP columns
        return model

    model = build(0)
    targets = [n for n, _ in ol.outlier_modules(model)]
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    inject_adapter_in_model(lora, model)
    names = ol.mark_trainable(model, outliers=False, extra=lambda n: "lora_" in n)
    assert names and all("lora_" in n or n.startswith("classifier.") for n in names)
    model(input_ids=token_ids).logits.sum().backward()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # as if trained
    with torch.no_grad():
        ref = model(input_ids=token_ids).logits
    ol.save_outlier_model(model, tmp_path)
    fresh = model_factory["bert"](seed=5)
    ol.to_skeleton(fresh, tmp_path)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets), fresh)
    ol.load_weights(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, ref)


def test_with_quantizer_selects_the_weight_quantizer():
    assert ol.with_quantizer("w4", "minmax").weight.granularity == "tensor"
    assert ol.with_quantizer("w4", "mse").weight.init == "mse"
    assert ol.with_quantizer("w4", "row").weight.granularity == "channel"
    assert ol.with_quantizer("w4g64", "config").weight.granularity == "group"
    grouped = ol.with_quantizer("w4", "group-mse").weight
    assert (grouped.granularity, grouped.group_size, grouped.init) == ("group", 128, "mse")
    with pytest.raises(ValueError, match="needs quantized weights"):
        ol.with_quantizer("w16a8", "row")
    with pytest.raises(ValueError, match="quantizer='gptq'"):
        ol.with_quantizer("w4", "gptq")
    per_tensor = ol.OutlierLinear.from_linear(planted_weight(), None, ol.with_quantizer("w4", "minmax"), [5])
    per_row = ol.OutlierLinear.from_linear(planted_weight(), None, ol.with_quantizer("w4", "row"), [5])
    assert per_tensor.weight_q.step.numel() == 1 and per_row.weight_q.step.numel() == 64
    w = torch.cat([planted_weight(), planted_weight(1) * 4], 1)  # [64, 256]: two groups of 128 per row
    per_group = ol.OutlierLinear.from_linear(w, None, ol.with_quantizer("w4", "group-mse"), [5])
    row = ol.OutlierLinear.from_linear(w, None, ol.with_quantizer("w4", "row"), [5])
    assert per_group.weight_q.step.numel() == 128
    assert (per_group.effective_weight() - w).norm() < (row.effective_weight() - w).norm()


def test_asymmetric_group_grid_uses_every_level_and_packs():
    """group-mse-asym: a zero point per group, 8 levels at W3 (the symmetric grid has 7), lower
    error than group-mse; it packs and loads back bit-identically, outlier columns included."""
    w = torch.cat([planted_weight(), planted_weight(1).abs() * 4], 1)  # [64, 256], one one-sided group
    cfg = ol.with_quantizer("w3", "group-mse-asym")
    assert not cfg.weight.symmetric and cfg.weight.group_size == 128
    asym = ol.OutlierLinear.from_linear(w, None, cfg, [5])
    sym = ol.OutlierLinear.from_linear(w, None, ol.with_quantizer("w3", "group-mse"), [5])
    assert asym.weight_q.zero_point.shape == asym.weight_q.step.shape
    codes, _ = asym.weight_q.codes(asym.weight)
    assert codes.unique().numel() == 8
    assert (asym.effective_weight() - w).norm() < (sym.effective_weight() - w).norm()
    state = asym.packed_state()
    loaded = ol.OutlierLinear(256, 64, False, cfg, 1)
    loaded.outlier_idx.copy_(asym.outlier_idx)
    loaded.load_packed(state)
    assert torch.equal(loaded.weight, asym.weight)


def test_mark_trainable_groups(model_factory):
    model = model_factory["bert"]()
    ol.prequantize(model, ol.OutlierConfig("w4", "weight", budget=0.05))
    names = set(ol.mark_trainable(model, outliers=False, biases=True, norms=True, head=False))
    assert "bert.embeddings.LayerNorm.weight" in names and "bert.encoder.layer.0.output.dense.bias" in names
    assert not any(n.endswith(".outlier") or n.startswith("classifier") for n in names)
    names = set(ol.mark_trainable(model))
    assert all(n.endswith(".outlier") or n.startswith("classifier.") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names


def test_a8_outlier_features_bypass_the_input_quantizer():
    """LLM.int8()-style: the features whose weight columns stay FP reach them in FP and leave the
    8-bit input grid to the others, instead of stretching it 60x."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g)
    idx = torch.tensor([3, 40])
    x[:, idx] *= 60  # LayerNorm-style activation outlier dimensions
    m = ol.OutlierLinear.from_linear(w, None, "w8a8", idx)
    with calibrate(m):
        m(x)
    keep = torch.ones(64, dtype=torch.bool).index_fill(0, idx, False)
    assert m.act_q.step.item() == pytest.approx(x[:, keep].abs().max().item() / 127)
    exact = F.linear(x, m.effective_weight())
    one_grid = Quantizer(QuantConfig.parse("w8a8").act, kind="act")
    one_grid.init_from(x)
    assert (m(x) - exact).norm() < 0.1 * (F.linear(one_grid(x), m.effective_weight()) - exact).norm()
    x.requires_grad_(True)
    m(x).sum().backward()  # the FP path passes gradients to the outlier features
    assert x.grad[:, idx].abs().sum() > 0
