import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import Quantizer, TensorQuant, fake_quant, fake_quantize, lsq_grad_scale, qrange
from quant.uniform import group_view, reduce_dims


@st.composite
def cases(draw):
    """(x, spec) over shapes, bits, symmetry, granularities and range inits."""
    gran = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
    group = draw(st.sampled_from([2, 4, 8]))
    rows = draw(st.integers(1, 6))
    cols = group * draw(st.integers(1, 4)) if gran == "group" else draw(st.integers(1, 12))
    shape = (draw(st.integers(1, 3)), rows, cols) if draw(st.booleans()) else (rows, cols)
    spec = TensorQuant(bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()), granularity=gran,
                       axis=draw(st.integers(0, len(shape) - 1)), group_size=group,
                       init=draw(st.sampled_from(["minmax", "percentile", "mse"])), percentile=99.0)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    return x, spec


def _grid(x, spec):
    """Grouped view of x and its (step, zero_point), as the quantizer computes them."""
    q = Quantizer(spec, dynamic=True)
    p = q.compute_params(x)
    return q._view(x), p["step"], p["zero_point"]


@settings(max_examples=50, deadline=None)
@given(cases())
def test_values_lie_on_the_grid_with_few_levels(case):
    x, spec = case
    xg, step, zp = _grid(x, spec)
    xq = fake_quantize(x, spec).reshape(xg.shape)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    k = xq / step + (0 if zp is None else zp)
    assert torch.allclose(k, k.round(), atol=1e-3)  # integer multiples of the step
    assert k.round().min() >= qmin and k.round().max() <= qmax
    # at most 2^b distinct values inside every group sharing a step
    dims = reduce_dims(xg.dim(), spec.granularity, spec.axis)
    kept = [d for d in range(xg.dim()) if d not in dims]
    flat = xq.permute(*kept, *dims).reshape(-1, math.prod(xg.shape[d] for d in dims))
    assert max(len(torch.unique(r)) for r in flat) <= 2**spec.bits


@settings(max_examples=50, deadline=None)
@given(cases())
def test_error_within_half_step_inside_clipping_range(case):
    x, spec = case
    xg, step, zp = _grid(x, spec)
    xq = fake_quantize(x, spec).reshape(xg.shape)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    z = 0 if zp is None else zp
    inside = (xg / step + z >= qmin) & (xg / step + z <= qmax)
    err = (xg - xq).abs()
    bound = (step / 2) * (1 + 1e-5) + 1e-7 * xg.abs()
    assert torch.all(err[inside] <= bound.expand_as(err)[inside])
    if spec.init == "minmax":  # min-max ranges contain every value
        assert torch.all(err <= bound.expand_as(err))


@settings(max_examples=50, deadline=None)
@given(cases())
def test_idempotent_on_fixed_grid(case):
    x, spec = case
    xg, step, zp = _grid(x, spec)
    once = fake_quant(xg, step, zp, spec.bits, spec.symmetric)
    assert torch.equal(fake_quant(once, step, zp, spec.bits, spec.symmetric), once)


@settings(max_examples=50, deadline=None)
@given(cases())
def test_symmetric_grid_is_symmetric(case):
    x, spec = case
    spec.symmetric = True
    xg, step, _ = _grid(x, spec)
    qmin, qmax = qrange(spec.bits, True)
    assert qmin == -qmax
    assert torch.equal(fake_quant(-xg, step, None, spec.bits), -fake_quant(xg, step, None, spec.bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1.2, 1.2, 25)
    step = torch.tensor(1.2 / (2 ** (bits - 1) - 1))
    draws = 4000
    xs = x.expand(draws, -1)
    q = fake_quant(xs, step, None, bits, True, stochastic=True, generator=g)
    lo, hi = torch.floor(x / step) * step, torch.ceil(x / step) * step
    assert torch.all((q == lo) | (q == hi))  # only the two neighbouring levels
    # Each draw is lo or hi; its std is <= step/2, so the mean of `draws` samples has a
    # standard error <= step / (2 sqrt(draws)). Allow 5 standard errors.
    tol = 5 * step / (2 * math.sqrt(draws))
    assert torch.all((q.mean(0) - x).abs() <= tol)
    # and nearest rounding would be biased by far more than that somewhere
    assert ((fake_quant(x, step, None, bits) - x).abs().max() > tol)


def test_stochastic_rounding_only_in_training():
    spec = TensorQuant(bits=4, rounding="stochastic", granularity="tensor")
    q = Quantizer(spec, dynamic=True)
    x = torch.randn(64, 32)
    q.eval()
    assert torch.equal(q(x), q(x))
    q.train()
    assert not torch.equal(q(x), q(x))


def test_ste_gradient_inside_and_outside_range():
    x = torch.tensor([-9.0, -3.4, -1.2, 0.0, 0.49, 2.9, 3.6, 12.0], requires_grad=True)
    step = torch.tensor(1.0)  # 3-bit symmetric: clipping range [-3, 3]
    y = fake_quant(x, step, None, bits=3)
    upstream = torch.arange(1.0, 9.0)
    y.backward(upstream)
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(x.grad, torch.where(inside, upstream, 0.0))


def test_lsq_step_gradient_hand_example():
    # 3-bit symmetric: Qn=-3, Qp=3, s=1. Per element d x_hat/ds:
    #  0.3 -> round(0.3)-0.3 = -0.3;  1.6 -> 2-1.6 = 0.4;  -2.2 -> -2+2.2 = 0.2
    #  5.0 -> clipped, Qp = 3;  -7.0 -> clipped, Qn = -3.           Sum = 0.3
    x = torch.tensor([0.3, 1.6, -2.2, 5.0, -7.0])
    s = torch.tensor(1.0, requires_grad=True)
    fake_quant(x, s, None, bits=3).sum().backward()
    assert s.grad.item() == pytest.approx(0.3, abs=1e-6)
    # Through the module, the gradient is scaled by g = 1/sqrt(N * Qp), N = 5 elements.
    q = Quantizer(TensorQuant(bits=3, learnable=True))
    q.init_from(x)
    with torch.no_grad():
        q.step.fill_(1.0)
    q(x).sum().backward()
    assert q.step.grad.item() == pytest.approx(0.3 / math.sqrt(5 * 3), abs=1e-6)
    assert lsq_grad_scale(5, 3) == pytest.approx(1 / math.sqrt(15))


def test_lsq_plus_offset_gradient_hand_example():
    # 2-bit asymmetric: levels 0..3, s=1, z=1 -> v = x + 1.
    #  0.4 -> v=1.4 inside: ds = round(1.4)-1.4 = -0.4, dz = 0
    #  2.7 -> v=3.7 clipped high: ds = 3 - z = 2,     dz = -s = -1
    # -3.0 -> v=-2  clipped low:  ds = 0 - z = -1,    dz = -1
    x = torch.tensor([0.4, 2.7, -3.0])
    s = torch.tensor(1.0, requires_grad=True)
    z = torch.tensor(1.0, requires_grad=True)
    y = fake_quant(x, s, z, bits=2, symmetric=False)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, -1.0]))
    y.sum().backward()
    assert s.grad.item() == pytest.approx(0.6, abs=1e-6)
    assert z.grad.item() == pytest.approx(-2.0)


def test_step_gradient_matches_finite_differences_where_clipped():
    # In the clipped region x_hat = (q_bound - z) * s is smooth in s and z, so the
    # LSQ/LSQ+ gradient is the true derivative there and finite differences apply.
    x = torch.tensor([[5.0, -6.0], [9.0, -4.5]], dtype=torch.float64)
    s = torch.tensor([[1.0], [0.8]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, z: fake_quant(x, s, z, 2, False), (s, z))
    assert torch.autograd.gradcheck(lambda s: fake_quant(x, s, None, 3, True), (s,))


def test_per_group_steps_are_independent():
    x = torch.cat([torch.full((1, 4), 0.01), torch.full((1, 4), 100.0)], dim=1)
    spec = TensorQuant(bits=4, granularity="group", group_size=4)
    assert torch.allclose(fake_quantize(x, spec), x)  # each group gets its own scale
    per_tensor = fake_quantize(x, TensorQuant(bits=4))
    assert torch.all(per_tensor[0, :4] == 0)  # a shared scale wipes out the small group


def test_group_view_shape():
    assert group_view(torch.zeros(3, 8), 4).shape == (3, 2, 4)
