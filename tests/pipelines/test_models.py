"""Model presets load offline and run on a padded batch."""
from __future__ import annotations

import pytest
import torch

from pipelines import checkpoints, models
from pipelines.config import ConfigError, load_config
from pipelines.dag import keys
from pipelines.stages import finetune


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_tiny_presets_classify_padded_batches(name):
    tok = models.load_tokenizer(name)
    model = models.load_classifier(name, num_labels=3, seed=1)
    batch = tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, 3)
    # the same seed gives the same initial model
    again = models.load_classifier(name, num_labels=3, seed=1)
    assert torch.equal(again(**batch).logits, logits)


def test_minilm_default_is_the_pretrained_package():
    model = models.load_classifier("minilm-l6", num_labels=2)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    n = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("classifier"))
    assert abs(n - 22.7e6) < 0.1e6


def test_tiny_gpt2_causal_lm_and_checkpoint_round_trip(tmp_path):
    lm = models.load_causal_lm("tiny-gpt2", vocab_size=100)
    assert lm(torch.randint(0, 100, (1, 8))).logits.shape == (1, 8, 100)
    tok = models.load_tokenizer("tiny-bert")
    clf = models.load_classifier("tiny-bert", 2)
    checkpoints.save(clf, tok, tmp_path / "ckpt", {"task": "sst2"}, "fp")
    loaded = checkpoints.load(tmp_path / "ckpt")
    x = torch.randint(0, 100, (2, 5))
    assert loaded.meta == {"task": "sst2", "format": "fp"}
    assert torch.equal(loaded.model(x).logits, clf.eval()(x).logits)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a plmq checkpoint .*pass a model folder"):
        checkpoints.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        models.checkpoint_identity(tmp_path)


def _two_sentences(tok):
    return tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")


def test_mean_pooling_averages_the_real_tokens_only():
    tok = models.load_tokenizer("tiny-bert")
    model = models.load_classifier("tiny-bert", 2, seed=1, pooling="mean").eval()
    batch = _two_sentences(tok)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first one is padded
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
        real = batch["attention_mask"][0].bool()
        expected = model.classifier(torch.tanh(model.bert.pooler.dense(hidden[0, real].mean(0))))
        logits = model(**batch).logits
        alone = model(**tok(["a short one"], return_tensors="pt")).logits
    assert torch.allclose(logits[0], expected, atol=1e-5) and torch.allclose(logits[0], alone[0], atol=1e-5)
    assert model.bert.pooler.mask is None  # not kept between calls
    cls = models.load_classifier("tiny-bert", 2, seed=1).eval()  # same weights, [CLS] head
    assert {n for n, _ in cls.named_parameters()} == {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        assert not torch.allclose(cls(**batch).logits, logits)


def test_mean_pooling_survives_a_checkpoint_round_trip(tmp_path):
    tok = models.load_tokenizer("tiny-bert")
    model = models.load_classifier("tiny-bert", 2, seed=1, pooling="mean").eval()
    checkpoints.save(model, tok, tmp_path / "mean", {}, "fp")
    loaded = checkpoints.load(tmp_path / "mean").model
    batch = _two_sentences(tok)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert isinstance(loaded.bert.pooler, models.MeanPooler)


def test_pooling_is_checked_before_work_and_changes_the_key():
    with pytest.raises(ConfigError, match="finetune.pooling=mean: model tiny-gpt2 .*set finetune.pooling=cls"):
        models.check_pooling("tiny-gpt2", "mean")
    with pytest.raises(ConfigError, match="finetune.pooling='max'"):
        models.check_pooling("tiny-bert", "max")
    models.check_pooling("tiny-bert", "mean")
    def key(*overrides):
        cfg = load_config(None, ["model=tiny-bert", *overrides])
        return keys(cfg, finetune.plan(cfg))["finetune/sst2"]
    assert key("finetune.pooling=mean") != key() == key("finetune.log_every=3")
