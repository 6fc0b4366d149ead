"""AdamW with block-wise quantized states (quant/qoptim.py)."""

import math

import pytest
import torch

from quant.pack import pack
from quant.qoptim import (
    QAdamW,
    StateQuant,
    code_table,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    unpack_nibbles,
)

SHAPE = (64, 64)  # 4096 values: 16 blocks of 256


def quadratic_run(m=None, v=None, steps=200, lr=2e-2, noise=0.5, seed=0):
    """Noisy quadratic 0.5 * sum h (x - x*)^2 with curvatures over two decades.
    Returns (final params, loss per step, optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.exp(torch.empty(SHAPE).uniform_(math.log(0.1), math.log(10.0), generator=gen))
    target = torch.randn(SHAPE, generator=gen)
    p = torch.nn.Parameter(torch.zeros(SHAPE))
    opt = QAdamW([p], lr=lr, betas=(0.9, 0.999), weight_decay=0.0, m=m, v=v)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        p.grad = h * (p.detach() - target) + noise * torch.randn(SHAPE, generator=noise_gen)
        opt.step()
        losses.append(float(0.5 * (h * (p.detach() - target) ** 2).sum()))
    return p.detach().clone(), losses, opt


def test_unquantized_states_match_torch_adamw_exactly():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(40, 70))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ref = torch.optim.AdamW([p1], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    opt = QAdamW([p2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(10):
        g = torch.randn(40, 70)
        p1.grad, p2.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert torch.equal(p1, p2)


def test_8bit_states_track_fp_adamw_on_a_quadratic():
    """Tolerance: the loss curve stays within 10% of FP AdamW's at every step and the final
    parameters within 10% (relative L2); measured here: 5% and 4.4%."""
    p_fp, loss_fp, opt_fp = quadratic_run()
    p_q, loss_q, opt_q = quadratic_run(StateQuant(8, 256, "linear"), StateQuant(8, 256, "sqrt"))
    assert loss_fp[-1] < 0.01 * loss_fp[0]  # the problem is actually solved
    assert max(abs(a - b) / b for a, b in zip(loss_q, loss_fp)) < 0.10
    assert (p_q - p_fp).norm() / p_fp.norm() < 0.10
    state = opt_q.state[next(iter(opt_q.state))]
    assert {k: v.dtype for k, v in state.items() if k.endswith("_codes")} == {"m_codes": torch.uint8,
                                                                             "v_codes": torch.uint8}
    n, blocks = 64 * 64, 64 * 64 // 256
    assert opt_q.state_bytes() == 2 * (n + 4 * blocks) + 4  # codes + float32 absmax per block + step
    assert opt_fp.state_bytes() == 2 * 4 * n + 4
    assert opt_fp.state_bytes() / opt_q.state_bytes() >= 3.5


def test_linear_second_moment_is_unstable_and_sqrt_code_is_not():
    """Linear 8-bit v: small v round to 0 and m / (sqrt(v) + eps) explodes."""
    _, loss_fp, _ = quadratic_run()
    _, loss_lin, _ = quadratic_run(v=StateQuant(8, 256, "linear"))
    _, loss_sqrt, _ = quadratic_run(v=StateQuant(8, 256, "sqrt"))
    _, loss_dyn, _ = quadratic_run(v=StateQuant(8, 256, "dynamic"))
    assert loss_lin[-1] > 100 * loss_fp[-1]
    assert abs(loss_sqrt[-1] / loss_fp[-1] - 1) < 0.1 and abs(loss_dyn[-1] / loss_fp[-1] - 1) < 0.1


def test_4bit_states_are_packed_two_per_byte():
    torch.manual_seed(0)
    x = torch.randn(1000)
    spec = StateQuant(4, 128, "linear")
    codes, absmax = quantize_blockwise(x, spec, signed=True)
    assert codes.dtype == torch.uint8 and codes.numel() == 1024 // 2 and absmax.numel() == 8
    idx = unpack_nibbles(codes)
    assert torch.equal(codes, pack(idx, 4))  # quant.pack's layout
    y = dequantize_blockwise(codes, absmax, spec, True, x.shape)
    step = (absmax / 7).repeat_interleave(128)[:1000]
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    assert spec.bytes_for(1000) == 512 + 4 * 8


@pytest.mark.parametrize("code, signed", [("linear", True), ("dynamic", True), ("linear", False),
                                          ("dynamic", False), ("sqrt", False)])
@pytest.mark.parametrize("bits", [4, 8])
def test_codes_round_to_the_nearest_entry(code, signed, bits):
    table, _ = code_table(code, bits, signed)
    assert len(table) <= 2**bits and torch.all(table[1:] > table[:-1])
    assert table[-1] == 1 and (table[0] == -1 if signed and code == "linear" else table[0] >= -1)
    torch.manual_seed(bits)
    x = torch.randn(4096) if signed else torch.rand(4096) ** 4
    spec = StateQuant(bits, 256, code)
    y = dequantize_blockwise(*quantize_blockwise(x, spec, signed), spec, signed, x.shape)
    absmax = (x.sqrt() if code == "sqrt" else x).abs().view(-1, 256).amax(1).repeat_interleave(256)
    xs, ys = (x.sqrt(), y.sqrt()) if code == "sqrt" else (x, y)
    nearest = table[(xs / absmax).unsqueeze(1).sub(table).abs().argmin(1)] * absmax
    assert torch.allclose(ys, nearest, atol=1e-6)


def test_dynamic_map_is_bitsandbytes_sized():
    for signed in (True, False):
        for bits in (4, 8):
            values = dynamic_map(signed, bits)
            assert len(values) == len(set(values)) == 2**bits and 0.0 in values and max(values) == 1.0
    assert min(v for v in dynamic_map(False, 8) if v > 0) < 1e-6  # 7 decades


def test_small_tensors_keep_fp32_states():
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))
    opt = QAdamW([big, small], m=StateQuant(), v=StateQuant(code="sqrt"), min_quant_numel=4096)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert set(opt.state[big]) == {"step", "m_codes", "m_absmax", "v_codes", "v_absmax"}
    assert set(opt.state[small]) == {"step", "m", "v"} and opt.state[small]["m"].dtype == torch.float32


def test_state_dict_round_trip_resumes_exactly():
    def make(p):
        return QAdamW([p], lr=1e-2, m=StateQuant(4, 128), v=StateQuant(8, 256, "sqrt"), min_quant_numel=0)

    torch.manual_seed(0)
    grads = [torch.randn(32, 48) for _ in range(8)]
    p1 = torch.nn.Parameter(torch.randn(32, 48))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = make(p1), make(p2)
    for i, g in enumerate(grads):
        if i == 4:  # "restart": a fresh optimizer from the saved state dict
            saved = o2.state_dict()
            o2 = make(p2)
            o2.load_state_dict(saved)
            assert o2.state[p2]["m_codes"].dtype == torch.uint8
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), "opt_m.bits=3 is not supported"),
    (dict(block_size=7), "opt_m.block_size=7"),
    (dict(code="log"), "opt_m.code='log'"),
    (dict(code="sqrt"), "opt_m.code='sqrt' is for the (non-negative) second moment only"),
    (dict(rounding="up"), "opt_m.rounding='up'"),
])
def test_bad_state_specs(kwargs, message):
    with pytest.raises(ValueError) as err:
        QAdamW([torch.nn.Parameter(torch.zeros(2))], m=StateQuant(**kwargs))
    assert message in str(err.value)
