"""Model presets load offline and run on a padded batch."""
from __future__ import annotations

import pytest
import torch

from pipelines import models


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
