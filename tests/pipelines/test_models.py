"""Model presets load offline and run on a padded batch."""
from __future__ import annotations

import pytest
import torch

from pipelines import models
from pipelines.config import ConfigError, DataConfig, FinetuneConfig
from pipelines.finetune import stage_key


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
    models.save_checkpoint(clf, tok, tmp_path / "ckpt", {"task": "sst2"})
    loaded, _, meta = models.load_checkpoint(tmp_path / "ckpt")
    x = torch.randint(0, 100, (2, 5))
    assert meta["task"] == "sst2" and torch.equal(loaded.eval()(x).logits, clf.eval()(x).logits)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `plmq finetune` first"):
        models.load_checkpoint(tmp_path)
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
    models.save_checkpoint(model, tok, tmp_path / "mean", {})
    loaded, _, _ = models.load_checkpoint(tmp_path / "mean")
    batch = _two_sentences(tok)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model(**batch).logits)
    assert isinstance(loaded.bert.pooler, models.MeanPooler)
    models.save_checkpoint(models.load_classifier("tiny-bert", 2), tok, tmp_path / "cls", {})
    assert "plmq_pooling" not in (tmp_path / "cls" / "config.json").read_text()  # cls configs as before


def test_pooling_is_checked_before_work_and_keys_only_change_for_mean():
    with pytest.raises(ConfigError, match="finetune.pooling=mean: model tiny-gpt2 .*set finetune.pooling=cls"):
        models.check_pooling("tiny-gpt2", "mean")
    with pytest.raises(ConfigError, match="finetune.pooling='max'"):
        models.check_pooling("tiny-bert", "max")
    models.check_pooling("tiny-bert", "mean")
    data = DataConfig()
    legacy = FinetuneConfig().key_fields()
    assert "pooling" not in legacy and "log_every" not in legacy  # keys of stored cls runs still match
    assert stage_key("sst2", "tiny-bert", data, FinetuneConfig(pooling="mean")) != stage_key(
        "sst2", "tiny-bert", data, FinetuneConfig())
