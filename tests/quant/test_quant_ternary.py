import pytest
import torch

from quant import QuantConfig, Quantizer, QuantLinear, TensorQuant, fake_quantize, ternary_params

TERNARY = TensorQuant(bits=2, scheme="ternary", granularity="channel", axis=0)
BINARY = TensorQuant(bits=1, scheme="binary", granularity="channel", axis=0)


def test_twn_hand_example():
    w = torch.tensor([[1.0, -0.2, 0.5, -1.5],   # mean|w| = 0.8, delta = 0.56, kept {1.0, 1.5}: alpha = 1.25
                      [0.1, 0.1, -0.1, 0.0],    # mean = 0.075, delta = 0.0525, kept 3 x 0.1: alpha = 0.1
                      [0.0, 0.0, 0.0, 0.0]])    # all zero: alpha = 0, no NaN
    alpha, delta = ternary_params(w, (1,))
    assert torch.allclose(delta.squeeze(1), torch.tensor([0.56, 0.0525, 0.0]))
    assert torch.allclose(alpha.squeeze(1), torch.tensor([1.25, 0.1, 0.0]))
    expected = torch.tensor([[1.25, 0.0, 0.0, -1.25], [0.1, 0.1, -0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(fake_quantize(w, TERNARY), expected)


def test_binary_hand_example():
    w = torch.tensor([[1.0, -0.2, 0.5, -1.5], [0.0, -2.0, 2.0, 0.0]])
    expected = torch.tensor([[0.8, -0.8, 0.8, -0.8], [1.0, -1.0, 1.0, 1.0]])  # sign(0) -> +1
    assert torch.allclose(fake_quantize(w, BINARY), expected)


@pytest.mark.parametrize("spec, levels", [(TERNARY, 3), (BINARY, 2)])
def test_levels_per_row_and_straight_through_gradient(spec, levels):
    w = torch.randn(6, 16, requires_grad=True)
    q = fake_quantize(w, spec)
    for row in q.detach():
        assert len(torch.unique(row)) <= levels
    upstream = torch.randn(6, 16)
    q.backward(upstream)
    assert torch.equal(w.grad, upstream)  # STE: gradient handed to the latent weights unchanged


def test_ternary_scale_follows_weights_even_when_learnable():
    spec = TensorQuant(bits=2, scheme="ternary", granularity="channel", axis=0, learnable=True)
    lin = torch.nn.Linear(8, 4)
    ql = QuantLinear.from_float(lin, QuantConfig(weight=spec))
    assert [n for n, _ in ql.weight_q.named_parameters()] == []  # alpha is not a trained parameter
    before = ql.quant_weight().detach().clone()
    with torch.no_grad():
        lin.weight.mul_(2.0)  # shared parameter: the module sees the change
    assert torch.allclose(ql.quant_weight(), 2 * before)


def test_frozen_ternary_keeps_alpha_and_threshold():
    w = torch.randn(4, 8)
    q = Quantizer(TERNARY)
    q.freeze(w)
    assert q.step.shape == (4, 1) and q.threshold.shape == (4, 1)
    assert torch.equal(q(w), fake_quantize(w, TERNARY))
    doubled = q(2 * w)
    assert torch.all((doubled.abs() == q.step) | (doubled == 0))  # alpha fixed, not rescaled by 2
    assert not torch.equal(doubled, fake_quantize(2 * w, TERNARY))
