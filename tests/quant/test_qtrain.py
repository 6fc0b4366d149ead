"""Quantized training linear (quant/qtrain.py): exactness when off, grids, rounding, conversion, recipes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from quant.config import TensorQuant
from quant.qtrain import QTrainLinear, Recipe, convert_qtrain, make_optimizer


def ref_quant(x: torch.Tensor, bits: int, dim: int | None) -> torch.Tensor:
    """Independent reference: symmetric absmax fake quantization, nearest, per `dim` slice."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    step = amax / qmax
    return torch.round(x / step).clamp(-qmax, qmax) * step


def pair(kind: str, seed: int = 0):
    """A float layer and a QTrainLinear (recipe fp) with the same parameters."""
    torch.manual_seed(seed)
    a = nn.Linear(16, 8) if kind == "linear" else Conv1D(8, 16)
    b = nn.Linear(16, 8) if kind == "linear" else Conv1D(8, 16)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("recipe", ["fp", "m8v8"])  # optimizer-only recipes leave the layer exact too
def test_all_off_matches_float_layer_exactly(kind, recipe):
    ref, other = pair(kind)
    q = QTrainLinear.from_float(other, recipe)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 8)
    y_ref, y = ref(x), q(x2)
    y_ref.backward(g)
    y.backward(g)
    assert torch.equal(y_ref, y)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(ref.weight.grad, q.weight.grad)
    assert torch.equal(ref.bias.grad, q.bias.grad)


def test_forward_quantizes_weight_per_channel_and_act_per_token():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = QTrainLinear.from_float(lin, "w4a8")
    x = torch.randn(2, 5, 16) * torch.linspace(0.1, 3, 5).view(1, 5, 1)  # tokens of very different scale
    expected = F.linear(ref_quant(x, 8, -1), ref_quant(lin.weight, 4, 1), lin.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q(x), lin(x), atol=1e-3)  # it does quantize


def _backward(recipe: str, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8)
    q = QTrainLinear.from_float(lin, recipe)
    x = torch.randn(4, 6, 16, requires_grad=True)
    g = torch.randn(4, 6, 8) * torch.linspace(0.01, 2, 6).view(1, 6, 1)
    q(x).backward(g)
    return lin, x, g


def test_grad_output_quantized_per_token_for_dw_only():
    lin, x, g = _backward("g8:grad_output.rounding=nearest")
    g2, x2 = g.reshape(-1, 8), x.detach().reshape(-1, 16)
    gq = ref_quant(g2, 8, -1)
    # Q(G) lies on a per-token grid of absmax / 127 ...
    steps = g2.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(gq / steps, torch.round(gq / steps), atol=1e-4)
    # ... dW is built from it, while dX uses the exact G (the paper's default)
    torch.testing.assert_close(lin.weight.grad, gq.t() @ x2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, g @ lin.weight.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(lin.weight.grad, g2.t() @ x2, atol=1e-4)


def test_grad_input_option_quantizes_dx_and_keeps_dw_exact():
    lin, x, g = _backward("gx8:grad_input.rounding=nearest")
    g2, x2 = g.reshape(-1, 8), x.detach().reshape(-1, 16)
    torch.testing.assert_close(x.grad.reshape(-1, 16), ref_quant(g2, 8, -1) @ lin.weight.detach(),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(lin.weight.grad, g2.t() @ x2)


def test_weight_gradient_lies_on_its_per_channel_grid():
    lin, x, g = _backward("gw4:grad_weight.rounding=nearest")
    dw = lin.weight.grad
    exact = g.reshape(-1, 8).t() @ x.detach().reshape(-1, 16)
    steps = exact.abs().amax(1, keepdim=True) / 7
    codes = dw / steps
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)
    assert codes.abs().max() <= 7 + 1e-4
    assert all(len(torch.unique(torch.round(r))) <= 15 for r in codes)
    assert (dw - exact).abs().max() <= steps.max() / 2 + 1e-6


def test_gradients_round_stochastically_by_default_weights_and_activations_to_nearest():
    recipe = Recipe.parse("w8a8g8gx8gw8")
    assert {k: getattr(recipe, k).rounding for k in ("weight", "act", "grad_output", "grad_input", "grad_weight")} == {
        "weight": "nearest", "act": "nearest", "grad_output": "stochastic", "grad_input": "stochastic",
        "grad_weight": "stochastic"}
    # one-hot tokens: dW = Q(G)^T X has Q(G)[t] as its column t
    torch.manual_seed(1)
    q = QTrainLinear.from_float(nn.Linear(16, 8), "g8").train()
    gt = torch.randn(8, 8) * torch.linspace(0.01, 2, 8).view(8, 1)
    q(torch.eye(16)[:8]).backward(gt)
    gq = q.weight.grad.t()[:8]
    steps = gt.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(gq / steps, torch.round(gq / steps), atol=1e-3)
    assert ((gq - gt).abs() <= steps + 1e-6).all()
    assert ((gq - gt).abs() > steps / 2 + 1e-6).any()  # some entries rounded away from nearest


def test_stochastic_rounding_of_gradients_is_unbiased():
    """N copies of the same tokens in one batch: dW = sum_k Q_k(G)^T, so dW / N is the
    sample mean of N independent stochastic roundings of G."""
    n_copies, tokens, out = 4000, 8, 4
    torch.manual_seed(0)
    g0 = torch.randn(tokens, out)
    x = torch.eye(tokens).repeat(n_copies, 1)  # dW[o, t] = sum over copies of Q(G)[t, o]
    step = g0.abs().amax(1) / 1  # 2 bits: grid {-1, 0, 1} * absmax per token
    tol = 5 * (step.max() / 2) / math.sqrt(n_copies)  # 5 sigma; per-sample std <= step / 2
    means = {}
    for rounding in ("stochastic", "nearest"):
        lin = nn.Linear(tokens, out, bias=False)
        recipe = Recipe(grad_output=TensorQuant(bits=2, granularity="token", rounding=rounding))
        q = QTrainLinear(lin.weight, None, recipe).train()
        q(x).backward(g0.repeat(n_copies, 1))
        means[rounding] = lin.weight.grad.t() / n_copies
    assert (means["stochastic"] - g0).abs().max() < tol
    assert (means["nearest"] - g0).abs().max() > 3 * tol  # the test can tell a biased rounding


def test_convert_gpt2_quantizes_every_linear_and_the_head_but_not_embeddings(tiny_gpt2):
    model = tiny_gpt2
    keys = {k: v.shape for k, v in model.state_dict().items()}
    names = convert_qtrain(model, "w8a8g8")
    assert sorted(n.split(".")[-1] for n in names) == sorted(["c_attn", "c_proj", "c_fc", "c_proj"] * 2 + ["lm_head"])
    assert isinstance(model.lm_head, QTrainLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert isinstance(model.transformer.wte, nn.Embedding) and isinstance(model.transformer.ln_f, nn.LayerNorm)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # HF-compatible state dict
    model.train()
    ids = torch.randint(0, 100, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item()) and model.transformer.h[0].attn.c_attn.weight.grad is not None


def tiny_llama(seed: int = 0):
    """A tied Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))


def test_convert_llama_quantizes_every_projection_and_the_head_and_trains():
    model = tiny_llama()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = convert_qtrain(model, "w8a8g8gw8")
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(n.split(".")[-1] for n in names) == sorted(projections * 2 + ["lm_head"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # 2 key/value heads of 8
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # HF-compatible state dict
    opt = make_optimizer(model.parameters(), "w8a8g8gw8m8v8", lr=3e-3, min_quant_numel=0)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    after = model.state_dict()
    assert all(not torch.equal(after[f"{n}.weight"], before[f"{n}.weight"]) for n in names)  # every layer trained


def test_convert_options(model_factory):
    model = model_factory["gpt2"]()
    assert "lm_head" not in convert_qtrain(model, "w8", include_head=False)
    assert convert_qtrain(model_factory["gpt2"](), "m8v8") == []  # optimizer-only recipe: layers untouched


def test_quantized_training_lowers_loss(tiny_gpt2):
    model = tiny_gpt2
    convert_qtrain(model, "w8a8g8gw8")
    opt = make_optimizer(model.parameters(), "w8a8g8gw8m8v8", lr=3e-3, min_quant_numel=0)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("name", ["fp", "w8", "w4", "a8", "w8a8g8", "gx8gw8", "m4v8", "w8a8g8gw8m8v8",
                                  "v8:opt_v.code=linear", "w8a8:act.rounding=stochastic,weight.granularity=tensor"])
def test_recipe_names_round_trip(name):
    recipe = Recipe.parse(name)
    assert Recipe.parse(str(recipe)) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_defaults():
    r = Recipe.parse("w4a8g8m4v8")
    assert (r.weight.bits, r.weight.granularity, r.weight.axis) == (4, "channel", 0)
    assert (r.act.granularity, r.grad_output.granularity) == ("token", "token")
    assert r.grad_input is None and r.grad_weight is None
    assert (r.opt_m.bits, r.opt_m.block_size, r.opt_v.code) == (4, 128, "sqrt")
    assert Recipe.parse("fp") == Recipe()
    assert Recipe().with_overrides({"weight": {"bits": 4}}).weight.bits == 4  # a kind that was off is switched on


@pytest.mark.parametrize("name, message", [
    ("w9", "weight.bits=9 is out of range"),
    ("w1", "weight.bits=1 is out of range"),
    ("x8", "cannot parse 'x8'"),
    ("w8w4", "weight is given twice"),
    ("m3", "opt_m.bits=3"),
    ("v8:opt_v.code=log", "opt_v.code='log'"),
    ("m8:opt_m.code=sqrt", "opt_m.code='sqrt' is for the (non-negative) second moment"),
    ("w8:wieght.bits=4", "unknown tensor kind 'wieght'"),
    ("w8:weight.bitz=4", "weight.bitz is not a field"),
    ("w8:weight.learnable=true", "weight.learnable=True"),
    ("a8:act.granularity=channel", "act.axis=0"),
    ("w8:weight", "must look like <kind>.<field>=<value>"),
])
def test_bad_recipes_name_the_field(name, message):
    with pytest.raises(ValueError) as err:
        Recipe.parse(name)
    assert message in str(err.value)
