"""Tiny random BERT / GPT-2 models for the quant tests (built here, no presets)."""

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()  # tiny vocab makes GPT2Config warn about bos/eos ids

BERT_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64)
GPT2_KW = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)


def make_bert(seed: int = 0, **overrides) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**BERT_KW, **overrides})).eval()


def make_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_KW)).eval()


@pytest.fixture
def tiny_bert():
    return make_bert()


@pytest.fixture
def tiny_gpt2():
    return make_gpt2()


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 100, (3, 24), generator=g)


@pytest.fixture
def model_factory():
    """name -> fresh model; "bert"/"gpt2" tiny, "bert-wide" big enough for size ratios."""
    return {"bert": make_bert, "gpt2": make_gpt2,
            "bert-wide": lambda seed=0: make_bert(seed, hidden_size=256, intermediate_size=1024, num_attention_heads=4)}
