"""PreQuant (FP outlier columns) on every model family, outside Ray.

Classifiers (encoders, and decoders with a sequence-classification head) go through what the
stages run: quantize_pretrained -> task-agnostic save -> build_model with a fresh head -> train ->
save -> checkpoints.load. Decoders as causal LMs go through the numerics and the prequant format.
"""
from __future__ import annotations

import re

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from tiny_models import DECODERS, FAMILIES
from tiny_models import logits as _logits
from tiny_models import tokenizer as _tokenizer
from transformers.pytorch_utils import Conv1D

from pipelines import checkpoints, models
from pipelines import prequant_model as pm
from pipelines.config import ConfigError, PrequantConfig
from pipelines.evaluation import quantize_rtn
from quant import QuantConfig, prequant

# The Linears of each family's classification head: randomly initialised on a pre-trained body,
# so they stay FP, are not stored in the task-agnostic model and train per task.
HEAD_LINEARS = {
    "tiny-bert": {"classifier"}, "tiny-roberta": {"classifier.dense", "classifier.out_proj"},
    "tiny-distilbert": {"pre_classifier", "classifier"},
    "tiny-electra": {"classifier.dense", "classifier.out_proj"},
    "tiny-deberta-v2": {"pooler.dense", "classifier"}, **{d: {"score"} for d in DECODERS},
}
# (criterion, quantizer, gptq); the tiny presets are 32 and 64 wide, so groups come from w4g16.
SETTINGS = [("weight", "row", False), ("activation", "group-mse", True)]
NORM_NAME = re.compile(r"norm|ln_")  # how the families name their normalisation layers


def _pcfg(criterion: str = "weight", quantizer: str = "row", gptq: bool = False, **kw) -> PrequantConfig:
    return PrequantConfig(quant=["w4g16"], quantizer=quantizer, criterion=criterion, gptq=gptq, budget_pct=1.0,
                          calib_samples=8, calib_max_length=16, seed=0, **kw)


def _batch(name: str, n: int = 4, length: int = 12, seed: int = 0, padded: bool = True) -> dict:
    return tiny_models.batch(name, seed, n, length, padded)


def _fp_linears(model) -> set[str]:
    return {n for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or isinstance(m, Conv1D)) and not isinstance(m, prequant.OutlierLinear)}


def _head_params(model, name: str) -> set[str]:
    tops = {h.split(".")[0] for h in HEAD_LINEARS[name]}
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in tops}


_BASES: dict = {}


@pytest.fixture
def base(tmp_path_factory):
    """(quantized classifier, meta, folder of its task-agnostic save), once per family and setting."""
    def get(name: str, setting: tuple = SETTINGS[0]):
        if (name, setting) not in _BASES:
            clf, tok, meta = pm.quantize_pretrained(name, "w4g16", setting[0], _pcfg(*setting))
            folder = tmp_path_factory.mktemp("base")
            checkpoints.save(clf, tok, folder, {**meta, "task_agnostic": True}, fmt="prequant")
            _BASES[name, setting] = (clf.eval(), meta, folder)
        return _BASES[name, setting]
    return get


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("name", FAMILIES)
def test_quantize_converts_the_body_and_keeps_the_head_fp(name, setting, base):
    clf, meta, _ = base(name, setting)
    assert _fp_linears(clf) == HEAD_LINEARS[name]  # GPT-2's Conv1Ds included: none is left
    layers = dict(prequant.outlier_modules(clf))
    assert layers and all(m.num_outliers > 0 for m in layers.values())
    assert meta["outlier_params"] == sum(m.outlier.numel() for m in layers.values()) > 0
    head = sum(p.numel() for n, p in clf.named_parameters() if n in _head_params(clf, name))
    body = sum(p.numel() for n, p in clf.named_parameters() if not n.endswith(".outlier")) - head
    assert meta["body_params"] == body  # the head is not in the budget's base
    assert abs(meta["budget_pct_used"] - 1.0) < 0.05


@pytest.mark.parametrize("name", FAMILIES)
def test_activation_criterion_keeps_each_layers_largest_inputs(name, base):
    """The statistics reach every body Linear through the family's own inputs (token types, pad)."""
    clf, _, _ = base(name, SETTINGS[1])
    fp = models.load_classifier(name, 2, seed=0)
    layers = dict(prequant.outlier_modules(clf))
    stats = pm.input_statistics(fp, _tokenizer(name), _pcfg(), list(layers))
    assert set(stats) == set(layers)
    for layer, m in layers.items():
        top = stats[layer]["absmax"].topk(m.num_outliers).indices.sort().values
        assert torch.equal(m.outlier_idx, top), layer


@pytest.mark.parametrize("name", FAMILIES)
def test_task_agnostic_base_leaves_out_the_head_and_loads_with_a_fresh_one(name, base):
    clf, _, folder = base(name)
    stored = load_file(str(folder / prequant.WEIGHTS_FILE))
    tops = {h.split(".")[0] for h in HEAD_LINEARS[name]}
    assert not [k for k in stored if k.split(".")[0] in tops]
    loaded = checkpoints.load(folder).model
    assert type(loaded) is type(clf)
    state, ref = loaded.state_dict(), clf.state_dict()
    assert set(state) == set(ref)
    assert all(torch.equal(state[k], v) for k, v in ref.items() if k.split(".")[0] not in tops)
    assert _logits(loaded, _batch(name)).shape == (4, 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_finetune_trains_the_outlier_columns_and_head_and_round_trips(name, base, tmp_path):
    clf, _, folder = base(name)
    meta = {"outlier_layers": len(dict(prequant.outlier_modules(clf)))}
    model = pm.build_model(folder, 2, "prequant", _pcfg(), 0, _tokenizer(name).pad_token_id)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    outliers = {n for n, _ in model.named_parameters() if n.endswith(".outlier")}
    assert trainable == outliers | _head_params(model, name)
    assert len(outliers) == len(prequant.read_manifest(folder)["modules"]) == meta["outlier_layers"]
    assert _fp_linears(model) == HEAD_LINEARS[name]
    batch = _batch(name)
    loss = model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    checkpoints.save(model, _tokenizer(name), tmp_path / "ft", {"model": name, "method": "prequant"},
                     fmt="prequant")
    loaded = checkpoints.load(tmp_path / "ft").model
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


@pytest.mark.parametrize("name", FAMILIES)
def test_train_norms_trains_every_normalisation_layer(name):
    """LayerNorm (encoders, GPT-2, OPT) and RMSNorm (Llama, Mistral, Qwen) are both norms."""
    model = models.load_classifier(name, 2, seed=0)
    norms = {n for n, _ in prequant.trainable_selection(model, outliers=False, norms=True, head=False)}
    expected = {n for n, _ in model.named_parameters()
                if NORM_NAME.search(n.rsplit(".", 1)[0].lower())}
    assert norms == expected and norms


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("name", DECODERS)
def test_causal_lm_round_trips_through_the_prequant_format(name, setting, tmp_path):
    criterion, quantizer, gptq = setting
    torch.manual_seed(0)
    lm = models.load_causal_lm(name).eval()
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    ocfg = prequant.OutlierConfig(prequant.with_quantizer("w4g16", quantizer), criterion, budget=0.01)
    names = prequant.targets(lm, ocfg)
    batches = [_batch(name, n=1, length=16, seed=s, padded=False) for s in range(4)]
    stats = prequant.input_stats(lm, names, batches, hessian=gptq)
    report = prequant.prequantize(lm, ocfg, {n: s["absmax"] for n, s in stats.items()},
                                  {n: s["hessian"] for n, s in stats.items()} if gptq else None)
    assert _fp_linears(lm) == {"lm_head"} and report.outlier_params > 0
    batch = _batch(name)
    checkpoints.save(lm, _tokenizer(name), tmp_path / "lm", {"model": name}, fmt="prequant")
    loaded = checkpoints.load(tmp_path / "lm").model
    assert type(loaded) is type(lm)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    assert torch.equal(_logits(loaded, batch), _logits(lm, batch))


@pytest.mark.parametrize("name", DECODERS)
def test_classifier_of_a_causal_lm_checkpoint_loads_back_as_a_classifier(name, tmp_path):
    """A pre-trained decoder folder's config names *ForCausalLM; its prequant classifier must not say so."""
    torch.manual_seed(0)
    checkpoints.save(models.load_causal_lm(name), _tokenizer(name), tmp_path / "lm", {}, fmt="fp")
    assert models.head_of(models.model_config(tmp_path / "lm")) == "causal-lm"
    clf, tok, meta = pm.quantize_pretrained(str(tmp_path / "lm"), "w4g16", "weight", _pcfg())
    checkpoints.save(clf.eval(), tok, tmp_path / "q", meta, fmt="prequant")
    loaded = checkpoints.load(tmp_path / "q").model
    assert type(loaded) is type(clf) and models.head_of(loaded.config) == "classifier"
    batch = _batch(name)
    assert torch.equal(_logits(loaded, batch), _logits(clf, batch))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_baselines_on_the_plain_base_train_their_parameters(name, method, tmp_path):
    clf, tok, meta = pm.quantize_pretrained(name, "w4g16", None, _pcfg())
    checkpoints.save(clf, tok, tmp_path / "plain", {**meta, "task_agnostic": True}, fmt="prequant")
    model = pm.build_model(tmp_path / "plain", 2, method, _pcfg(), 0, tok.pad_token_id)
    own = {n for n, p in model.named_parameters() if p.requires_grad} - _head_params(model, name)
    kind = "lora_" if method == "lora" else ".bias"
    assert all(kind in n for n in own) and (own or method == "bitfit")
    model(**_batch(name), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # LoRA's B starts at zero, so A has no gradient before the first step
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" not in n)


@pytest.mark.parametrize("name", DECODERS)
def test_packed_export_of_a_causal_lm_never_saved_as_fp_loads_back_as_one(name, tmp_path):
    """The packed format shares the config writer: it names the model's class, not the config's (none here)."""
    torch.manual_seed(0)
    lm = models.load_causal_lm(name).eval()
    assert not lm.config.architectures
    quantize_rtn(lm, QuantConfig.parse("w4g16"), [_batch(name, seed=1)])
    checkpoints.save(lm, _tokenizer(name), tmp_path / "q", {"quant": "w4g16"}, fmt="packed")
    loaded = checkpoints.load(tmp_path / "q").model
    assert type(loaded) is type(lm)
    batch = _batch(name)
    assert torch.equal(_logits(loaded, batch), _logits(lm, batch))


def test_gpt2_head_modules_may_name_conv1d_layers(tmp_path):
    """GPT-2's Linears are Conv1Ds: head_modules matches them like any Linear (kept FP, trained)."""
    clf = models.load_classifier("tiny-gpt2", 2, seed=0)
    pm.check_head_modules(clf, ["transformer.h.3.mlp.c_proj"])
    with pytest.raises(ConfigError, match="matches no Linear"):
        pm.check_head_modules(clf, ["transformer.h.3.mlp.c_nope"])
    pcfg = _pcfg(head_modules=["transformer.h.3.mlp.c_proj"])
    clf, tok, meta = pm.quantize_pretrained("tiny-gpt2", "w4g16", "weight", pcfg)
    assert isinstance(clf.get_submodule("transformer.h.3.mlp.c_proj"), Conv1D)
    checkpoints.save(clf, tok, tmp_path / "base", {**meta, "task_agnostic": True}, fmt="prequant")
    model = pm.build_model(tmp_path / "base", 2, "prequant", pcfg, 0, tok.pad_token_id)
    assert {"transformer.h.3.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.bias"} <= {
        n for n, p in model.named_parameters() if p.requires_grad}


# transformers 5 loads any tokenizer saved beside a qwen2 config as Qwen2Tokenizer (its model-type
# override), which splits the preset's WordPiece text into characters: a different calibration text.
QWEN2_TOKENIZER = pytest.mark.xfail(strict=True, reason="a saved tiny-qwen2 tokenizer reloads as Qwen2Tokenizer")


@pytest.mark.parametrize("name", [pytest.param(d, marks=QWEN2_TOKENIZER) if d == "tiny-qwen2" else d
                                  for d in DECODERS])
def test_calibration_of_a_saved_decoder_feeds_the_inputs_of_its_preset(name, tmp_path):
    """A preset's tokenizer emits no token types (GPT-2 would embed them as words), and neither does the
    tokenizer saved beside it, so statistics on the saved folder are those of the preset."""
    fp = models.load_classifier(name, 2, seed=0)
    checkpoints.save(fp, _tokenizer(name), tmp_path / "fp", {}, fmt="fp")
    tok = models.load_tokenizer(str(tmp_path / "fp"))
    assert set(tok("a short sentence")) == {"input_ids", "attention_mask"}
    names = prequant.targets(fp, prequant.OutlierConfig("w4"))
    saved = pm.input_statistics(models.load_classifier(str(tmp_path / "fp"), 2), tok, _pcfg(), names)
    preset = pm.input_statistics(fp, _tokenizer(name), _pcfg(), names)
    assert all(torch.equal(saved[n]["absmax"], preset[n]["absmax"]) for n in names)
