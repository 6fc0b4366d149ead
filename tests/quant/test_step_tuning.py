"""End-to-end step-size tuning: only the steps train, the codes stay, q/k/v share one step, export is exact."""
from __future__ import annotations

import torch

from quant import QuantConfig, calibrate, load_quantized, quant_modules, quantize_model, release_codes, save_quantized
from quant.step_tuning import tune_steps
from tests.quant.conftest import make_bert


def _quantized(config: str):
    """A calibrated fake-quantized tiny BERT (the weight grids still follow the weights)."""
    model = make_bert()
    quantize_model(model, QuantConfig.parse(config))
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    with calibrate(model):
        model(input_ids=ids)
    return model


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.weight_q.codes(m.linear_weight())[0] for n, m in quant_modules(model)}


def test_only_steps_train_and_the_codes_stay(tmp_path, token_ids):
    model = _quantized("w2a8")
    before = _codes(model)
    steps = tune_steps(model, lambda: model(input_ids=token_ids))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(s) for s in steps} and steps
    attn = model.bert.encoder.layer[0].attention.self
    assert attn.query.act_q is attn.key.act_q is attn.value.act_q  # one step for the tensor q, k, v read
    start = [s.detach().clone() for s in steps]
    opt = torch.optim.Adam(steps, lr=1e-2)  # large enough to push some steps below 0
    target = torch.tensor([0, 1, 0])
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(input_ids=token_ids).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, s) for a, s in zip(start, steps))  # the steps moved
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=token_ids).logits
    assert release_codes(model) == len(before)
    assert all(torch.equal(before[n], c) for n, c in _codes(model).items())  # codes unchanged by the new steps
    save_quantized(model, tmp_path)
    loaded = load_quantized(make_bert(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=token_ids).logits, tuned, atol=1e-5)


def test_weights_do_not_move_while_steps_train(token_ids):
    model = _quantized("w4a8")
    tune_steps(model, lambda: model(input_ids=token_ids))
    weights = {n: m.weight.detach().clone() for n, m in quant_modules(model)}
    model(input_ids=token_ids).logits.sum().backward()
    assert all(m.weight.grad is None and torch.equal(m.weight, weights[n]) for n, m in quant_modules(model))
    assert all(m.weight_q.step.grad is not None for _, m in quant_modules(model))
