"""quant.prequant: outlier-column selection, the budget, OutlierLinear and trainable selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import QuantConfig, Quantizer, calibrate
from quant import prequant as pq

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
    scores = pq.column_scores("weight", w)
    assert set(scores.topk(3).indices.tolist()) == set(PLANTED)
    layer = nn.Sequential(nn.Linear(128, 64))
    layer[0].weight.data.copy_(w)
    body = sum(p.numel() for p in layer.parameters())
    plan = pq.plan_outliers(layer, pq.OutlierConfig("w4", "weight", budget=(3 * 64 + 10) / body))
    assert sorted(plan["0"].tolist()) == PLANTED  # r = 3 columns of 64 fit the budget, a 4th does not


def test_activation_criterion_picks_the_layernorm_outlier_dimensions(model_factory):
    model = model_factory["bert"]()
    with torch.no_grad():  # BERT-style LayerNorm outlier dimensions 3 and 17 feed layer 0's query/key/value
        model.bert.embeddings.LayerNorm.weight[[3, 17]] = 40.0
    cfg = pq.OutlierConfig("w4", "activation", budget=0.05)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    act = pq.activation_absmax(model, pq.targets(model, cfg), [{"input_ids": ids[i:i + 1]} for i in range(4)])
    plan = pq.plan_outliers(model, cfg, act)
    for name in ("query", "key", "value"):
        idx = plan[f"bert.encoder.layer.0.attention.self.{name}"]
        assert len(idx) >= 2 and {3, 17} <= set(idx.tolist())
    assert not {3, 17} <= set(pq.plan_outliers(model, pq.OutlierConfig("w4", "weight", budget=0.05))[
        "bert.encoder.layer.0.attention.self.query"].tolist())  # the weights alone do not show them
    with pytest.raises(ValueError, match="needs activation statistics"):
        pq.plan_outliers(model, cfg)


def test_random_criterion_is_reproducible_per_seed_and_criteria_are_pluggable(monkeypatch, model_factory):
    model = model_factory["bert"]()
    plans = [pq.plan_outliers(model, pq.OutlierConfig("w4", "random", budget=0.05, seed=s)) for s in (0, 0, 1)]
    name = "bert.encoder.layer.0.output.dense"
    assert torch.equal(plans[0][name], plans[1][name]) and not torch.equal(plans[0][name], plans[2][name])
    monkeypatch.setitem(pq.CRITERIA, "last", pq.Criterion(lambda w, act, gen: torch.arange(w.shape[1]).float()))
    plan = pq.plan_outliers(model, pq.OutlierConfig("w4", "last", budget=0.05))
    assert all(set(idx.tolist()) == set(range(model.get_submodule(n).in_features - len(idx),
                                              model.get_submodule(n).in_features)) for n, idx in plan.items())


@pytest.mark.parametrize("budget", [0.002, 0.005, 0.01])
@pytest.mark.parametrize("reserved", [0, 1500])
def test_budget_gives_the_requested_percentage_of_parameters(budget, reserved, model_factory):
    model = model_factory["bert"](vocab_size=30522)  # tiny-bert size: ~1.0M params, 0.03M in Linears
    report = pq.prequantize(model, pq.OutlierConfig("w4", "weight", budget=budget, reserved=reserved))
    used = 100 * (report.outlier_params + reserved) / report.body_params
    assert abs(used - 100 * budget) <= 0.05 and report.outlier_params + reserved <= budget * report.body_params
    assert len(set(report.modules.values()) - {0}) >= 1
    trainable = pq.mark_trainable(model, outliers=True, head=False)
    assert pq.trainable_count(model) == report.outlier_params and all(n.endswith(".outlier") for n in trainable)


def test_allocate_respects_caps_and_rejects_impossible_targets(model_factory):
    costs, caps = {"a": 10, "b": 30}, {"a": 5, "b": 1}
    units = pq.allocate(costs, caps, 75, {"b": 1.0})
    assert units["b"] <= 1 and units["a"] <= 5 and 75 - 10 < sum(units[n] * costs[n] for n in costs) <= 75
    assert pq.allocate(costs, caps, 80) == {"a": 5, "b": 1}
    for bad in (-1, 81):
        with pytest.raises(ValueError, match="outside what the layers hold"):
            pq.allocate(costs, caps, bad)
    with pytest.raises(ValueError, match="leaves no room"):
        pq.plan_outliers(model_factory["bert"](), pq.OutlierConfig("w4", "weight", budget=0.001, reserved=10**6))
    with pytest.raises(ValueError, match="exceeds the 17408 weights of the quantized layers"):
        pq.plan_outliers(model_factory["bert"](vocab_size=30522), pq.OutlierConfig("w4", "weight", budget=0.5))


def test_outlier_linear_keeps_fp_columns_and_quantizes_the_rest_on_their_own_grid():
    w, b = planted_weight(), torch.randn(64) * 0.1
    m = pq.OutlierLinear.from_linear(w, b, "w4", torch.tensor(PLANTED))
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
    m = pq.OutlierLinear.from_linear(planted_weight(), None, "w3", torch.tensor(PLANTED))
    frozen = m.weight.detach().clone()
    m(torch.randn(4, 128)).square().sum().backward()
    assert not m.weight.requires_grad and m.weight.grad is None
    assert m.outlier.grad is not None and m.outlier.grad.abs().sum() > 0
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(m.weight, frozen)


def test_with_quantizer_selects_the_weight_quantizer():
    assert pq.with_quantizer("w4", "minmax").weight.granularity == "tensor"
    assert pq.with_quantizer("w4", "mse").weight.init == "mse"
    assert pq.with_quantizer("w4", "row").weight.granularity == "channel"
    assert pq.with_quantizer("w4g64", "config").weight.granularity == "group"
    grouped = pq.with_quantizer("w4", "group-mse").weight
    assert (grouped.granularity, grouped.group_size, grouped.init) == ("group", 128, "mse")
    narrow = pq.with_quantizer("w4g32", "group-mse").weight  # the string's own group size is kept
    assert (narrow.granularity, narrow.group_size, narrow.init) == ("group", 32, "mse")
    assert pq.with_quantizer("w4g32", "group-mse-asym").weight.group_size == 32
    with pytest.raises(ValueError, match="needs quantized weights"):
        pq.with_quantizer("w16a8", "row")
    with pytest.raises(ValueError, match="quantizer='gptq'"):
        pq.with_quantizer("w4", "gptq")
    per_tensor = pq.OutlierLinear.from_linear(planted_weight(), None, pq.with_quantizer("w4", "minmax"), [5])
    per_row = pq.OutlierLinear.from_linear(planted_weight(), None, pq.with_quantizer("w4", "row"), [5])
    assert per_tensor.weight_q.step.numel() == 1 and per_row.weight_q.step.numel() == 64
    w = torch.cat([planted_weight(), planted_weight(1) * 4], 1)  # [64, 256]: two groups of 128 per row
    per_group = pq.OutlierLinear.from_linear(w, None, pq.with_quantizer("w4", "group-mse"), [5])
    row = pq.OutlierLinear.from_linear(w, None, pq.with_quantizer("w4", "row"), [5])
    assert per_group.weight_q.step.numel() == 128
    assert (per_group.effective_weight() - w).norm() < (row.effective_weight() - w).norm()


def test_asymmetric_group_grid_uses_every_level_and_packs():
    """group-mse-asym: a zero point per group, 8 levels at W3 (the symmetric grid has 7), lower
    error than group-mse; it packs and loads back bit-identically, outlier columns included."""
    w = torch.cat([planted_weight(), planted_weight(1).abs() * 4], 1)  # [64, 256], one one-sided group
    cfg = pq.with_quantizer("w3", "group-mse-asym")
    assert not cfg.weight.symmetric and cfg.weight.group_size == 128
    asym = pq.OutlierLinear.from_linear(w, None, cfg, [5])
    sym = pq.OutlierLinear.from_linear(w, None, pq.with_quantizer("w3", "group-mse"), [5])
    assert asym.weight_q.zero_point.shape == asym.weight_q.step.shape
    codes, _ = asym.weight_q.codes(asym.weight)
    assert codes.unique().numel() == 8
    assert (asym.effective_weight() - w).norm() < (sym.effective_weight() - w).norm()
    state = asym.packed_state()
    loaded = pq.OutlierLinear(256, 64, False, cfg, 1)
    loaded.outlier_idx.copy_(asym.outlier_idx)
    loaded.load_packed(state)
    assert torch.equal(loaded.weight, asym.weight)


def test_mark_trainable_groups(model_factory):
    model = model_factory["bert"]()
    pq.prequantize(model, pq.OutlierConfig("w4", "weight", budget=0.05))
    names = set(pq.mark_trainable(model, outliers=False, biases=True, norms=True, head=False))
    assert "bert.embeddings.LayerNorm.weight" in names and "bert.encoder.layer.0.output.dense.bias" in names
    assert not any(n.endswith(".outlier") or n.startswith("classifier") for n in names)
    names = set(pq.mark_trainable(model))
    assert all(n.endswith(".outlier") or n.startswith("classifier.") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names


def test_a8_outlier_features_bypass_the_input_quantizer():
    """LLM.int8()-style: the features whose weight columns stay FP reach them in FP and leave the
    8-bit input grid to the others, instead of stretching it 60x."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g)
    idx = torch.tensor([3, 40])
    x[:, idx] *= 60  # LayerNorm-style activation outlier dimensions
    m = pq.OutlierLinear.from_linear(w, None, "w8a8", idx)
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
