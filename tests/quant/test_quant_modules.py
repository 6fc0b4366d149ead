import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quant import QuantConfig, QuantEmbedding, Quantizer, QuantLinear, TensorQuant, calibrate


@pytest.mark.parametrize("gran, shape", [("tensor", ()), ("channel", (6, 1)), ("group", (6, 2, 1))])
def test_quantizer_state_shapes_and_kinds(gran, shape):
    w = torch.randn(6, 16)
    learn = Quantizer(TensorQuant(bits=4, granularity=gran, group_size=8, symmetric=False, learnable=True))
    learn.init_from(w)
    assert isinstance(learn.step, nn.Parameter) and isinstance(learn.zero_point, nn.Parameter)
    assert learn.step.shape == shape and learn.zero_point.shape == shape
    fixed = Quantizer(TensorQuant(bits=4, granularity=gran, group_size=8), dynamic=False)
    fixed.init_from(w)
    assert dict(fixed.named_parameters()) == {} and fixed.step.shape == shape
    assert "step" in dict(fixed.named_buffers())


def test_lazy_init_from_first_tensor():
    q = Quantizer(TensorQuant(bits=8), name="act", kind="act")
    assert not q.dynamic and q.step is None
    x = torch.randn(4, 10)
    y = q(x)
    assert bool(q.initialized) and q.step.item() == pytest.approx(x.abs().max().item() / 127)
    assert torch.equal(q(x), y)
    out, step = q(10 * x), q.step.item()  # clipped at the old range: codes -128..127 (int8 runtimes' grid)
    assert out.max().item() == pytest.approx(127 * step) and out.min().item() == pytest.approx(-128 * step)


def test_dynamic_weight_quantizer_follows_weights_until_frozen():
    w = torch.randn(4, 8)
    q = Quantizer(TensorQuant(bits=4, granularity="channel"))
    assert q.dynamic
    assert torch.allclose(q(3 * w), 3 * q(w))
    q.freeze(w)
    assert not q.dynamic
    assert torch.allclose(q(3 * w).abs().amax(1), q(w).abs().amax(1))  # range no longer follows


def test_calibration_minmax_percentile_mse():
    batches = [torch.randn(8, 16) * s for s in (1.0, 4.0, 2.0)]
    qs = {i: Quantizer(TensorQuant(bits=8, init=i, percentile=99.0), name="act", kind="act")
          for i in ("minmax", "percentile", "mse")}
    lin = nn.Sequential(*qs.values())
    with calibrate(lin):
        for b in batches:
            assert torch.equal(lin(b), b)  # observe mode passes activations through
    absmax = max(b.abs().max() for b in batches)
    assert qs["minmax"].step.item() == pytest.approx(absmax.item() / 127)
    assert 0 < qs["percentile"].step.item() < qs["minmax"].step.item()
    assert 0 < qs["mse"].step.item() <= qs["minmax"].step.item()
    assert not any(q.observing for q in qs.values())


def test_calibration_per_channel_and_sample_cap():
    q = Quantizer(TensorQuant(bits=8, granularity="channel", axis=-1, init="percentile", percentile=100.0),
                  name="act", kind="act")
    x = torch.randn(50, 7, 5) * torch.arange(1.0, 6.0)
    q.start_observing(max_samples=10_000)
    q(x)
    q.finish_observing()
    assert q.step.shape == (5,)
    assert torch.allclose(q.step, x.abs().amax((0, 1)) / 127)  # 100th percentile = max
    q.start_observing(max_samples=100)  # 20 rows of 5 kept out of 350
    q(x)
    assert q._obs["rows"].shape == (20, 5)
    q.finish_observing()
    assert torch.all(q.step <= x.abs().amax((0, 1)) / 127)


# Relative output error vs FP on this 16->12 layer: worst over 20 seeds was 1.0% (w8a8),
# 8% (w4), 37% (TWN), 56% (binary; theory for Gaussian weights sqrt(1 - 2/pi) = 60%).
# The bounds leave 1.6-2x room, yet fail if a layer's weights were quantized wrongly.
@pytest.mark.parametrize("name, bound", [("w8a8", 0.02), ("w4a8-o8", 0.2), ("w4g8a8", 0.2),
                                         ("w2a8", 0.7), ("w1a8", 0.9)])
def test_quantlinear_wraps_linear_and_conv1d_identically(name, bound):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    conv = Conv1D(12, 16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    ql, qc = QuantLinear.from_float(lin, name), QuantLinear.from_float(conv, name)
    assert ql.weight is lin.weight and qc.weight is conv.weight and qc.bias is conv.bias  # shared
    assert qc.transposed and qc.weight.shape == (16, 12) and (qc.out_features, qc.in_features) == (12, 16)
    # equal up to float summation order (ternary/binary means over a transposed view)
    assert torch.allclose(ql.quant_weight(), qc.quant_weight(), rtol=1e-6, atol=0)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(ql(x), qc(x), atol=1e-6)
    ref = lin(x) - lin.bias
    assert ((ql(x) - lin(x)).norm() / ref.norm()).item() < bound


def test_quantlinear_trains_weights_and_steps():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    ql = QuantLinear.from_float(lin, "w4a8:weight.learnable=true,act.learnable=true,act.symmetric=false")
    x = torch.randn(32, 16)
    ql(x)  # lazily initialises the activation quantizer
    params = dict(ql.named_parameters())
    assert set(params) == {"weight", "bias", "weight_q.step", "act_q.step", "act_q.zero_point"}
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.Adam(ql.parameters(), lr=1e-2)
    loss = (ql(x) - torch.randn(32, 8)).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    opt.step()
    assert all(not torch.equal(before[k], params[k]) for k in params)
    assert not torch.equal(lin.weight, before["weight"])  # the original module's weight moved too


def test_weight_cache_invalidated_by_in_place_updates():
    lin = nn.Linear(8, 4)
    ql = QuantLinear.from_float(lin, "w8a16")
    x = torch.randn(3, 8)
    with torch.no_grad():
        y1 = ql(x)
        assert ql.quant_weight() is ql.quant_weight()  # cached in inference
        lin.weight.mul_(2)
        y2 = ql(x)
    assert not torch.allclose(y1, y2)
    assert torch.allclose(y2 - lin.bias, 2 * (y1 - lin.bias), atol=1e-5)


@pytest.mark.parametrize("emb", ["8", "2", "1"])
def test_quantembedding_training_path_matches_inference(emb):
    torch.manual_seed(0)
    e = nn.Embedding(20, 16, padding_idx=0)
    qe = QuantLinear.from_float(e, QuantConfig.parse(f"w8a8-e{emb}"))
    assert isinstance(qe, QuantEmbedding) and qe.weight is e.weight
    ids = torch.randint(0, 20, (3, 7))
    train = qe(ids)  # grad enabled: gathers rows then quantizes them
    with torch.no_grad():
        infer = qe(ids)  # quantizes (and caches) the whole table
    assert torch.equal(train.detach(), infer)
    assert torch.equal(infer, qe.quant_weight()[ids])
    train.sum().backward()
    assert e.weight.grad[ids.unique()].abs().sum() > 0
