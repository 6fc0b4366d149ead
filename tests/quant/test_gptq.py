"""quant.gptq: GPTQ rounding onto a fixed grid, with FP columns that take the rounding error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant import QuantConfig, Quantizer
from quant import prequant as pq
from quant.gptq import gptq_round


def correlated_inputs(n=512, d=96, seed=0) -> torch.Tensor:
    """Inputs with strongly correlated features, as in a transformer layer (where GPTQ pays)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def grid(w: torch.Tensor, quant: str = "w3") -> Quantizer:
    q = Quantizer(QuantConfig.parse(quant).weight, "weight", "weight", dynamic=False)
    q.init_from(w)
    return q


def output_error(x, w, w_q) -> float:
    return (F.linear(x, w_q) - F.linear(x, w)).norm().item()


@pytest.mark.parametrize("quant", ["w3", "w4g32", "w4:weight.symmetric=false"])
def test_gptq_stays_on_the_grid_and_beats_nearest_on_the_layer_output(quant):
    x, w = correlated_inputs(), torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    q = grid(w, quant)
    w_g = gptq_round(w, x.T @ x, q)
    assert torch.equal(q(w_g), w_g)  # every weight is a grid point: the codes pack as before
    assert output_error(x, w, w_g) < 0.7 * output_error(x, w, q(w))


def test_without_correlations_gptq_is_round_to_nearest():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    q = grid(w)
    assert torch.equal(gptq_round(w, torch.diag(torch.rand(32) + 0.5), q), q(w))


def test_fp_columns_are_not_rounded_and_absorb_the_error():
    x, w = correlated_inputs(), torch.randn(48, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    idx = torch.tensor([4, 50, 90])
    rest = w.clone()
    rest[:, idx] = 0
    q = grid(rest)
    w_g = gptq_round(w, x.T @ x, q, keep_fp=idx)
    keep = torch.ones(96, dtype=torch.bool).index_fill(0, idx, False)
    assert torch.equal(q(w_g)[:, keep], w_g[:, keep]) and not torch.equal(w_g[:, idx], w[:, idx])
    nearest_with_fp = q(rest).index_copy(1, idx, w[:, idx])
    assert output_error(x, w, w_g) < 0.7 * output_error(x, w, nearest_with_fp)


def test_gptq_rejects_what_it_cannot_round():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="fixed uniform grid"):
        gptq_round(w, torch.eye(16), grid(w, "w2"))  # ternary
    with pytest.raises(ValueError, match="does not match 16 input columns"):
        gptq_round(w, torch.eye(8), grid(w))


def test_prequantize_with_hessians_exports_bit_exact_and_is_closer_to_fp(tmp_path, token_ids, model_factory):
    fp = model_factory["bert"]()
    cfg = pq.OutlierConfig("w3", "activation", budget=0.05)
    names = pq.targets(fp, cfg)
    stats = pq.input_stats(fp, names, [{"input_ids": token_ids[i:i + 1]} for i in range(len(token_ids))],
                           hessian=True)
    assert all(s["hessian"].shape == (s["absmax"].numel(),) * 2 for s in stats.values())
    act = {n: s["absmax"] for n, s in stats.items()}
    with torch.no_grad():
        ref = fp(input_ids=token_ids).logits
    errors = {}
    for rounding in ("nearest", "gptq"):
        model = model_factory["bert"]()
        pq.prequantize(model, cfg, act, {n: s["hessian"] for n, s in stats.items()} if rounding == "gptq" else None)
        with torch.no_grad():
            out = model(input_ids=token_ids).logits
        errors[rounding] = (out - ref).norm().item()
    assert errors["gptq"] < errors["nearest"]
    pq.save_prequantized(model, tmp_path)  # the frozen weights are on their grid
    fresh = model_factory["bert"](seed=7)
    pq.to_skeleton(fresh, tmp_path)
    pq.load_prequantized(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids).logits, out)
