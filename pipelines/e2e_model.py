"""The model and data of `mrem-e2e`'s Ray Train loop: an MREM model whose quantizer steps learn from its FP teacher.

`Distill` wraps the quantized student and its frozen FP teacher; its forward returns the loss the shared loop
(pipelines.training.run_loop) trains on: the KL divergence from the teacher's output distribution (per token for
a causal LM), or the task's own loss (labels; next token for a causal LM).
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from ray.train.torch import prepare_data_loader, prepare_model
from torch import nn
from torch.utils.data import DataLoader

from pipelines import checkpoints
from pipelines.config import DataConfig, FinetuneConfig
from pipelines.data import tokenized_split
from pipelines.lm_eval import calibration_batches
from pipelines.tasks import check_task
from pipelines.training import make_loader, make_optimizer, run_loop
from quant import release_codes, tune_steps


class Distill(nn.Module):
    """A quantized student and its FP teacher; forward(**batch) -> an object whose `.loss` trains the student."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str, causal: bool):
        super().__init__()
        self.student, self.teacher, self.loss_kind, self.causal = student, teacher.eval(), loss, causal
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for m in self.student.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # the student matches the deterministic teacher; HF attention reads p from these too

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, labels: torch.Tensor | None = None, **inputs) -> SimpleNamespace:
        mask = inputs.get("attention_mask")
        if self.loss_kind == "task":
            if self.causal:  # next token: the shifted input ids, padding ignored
                labels = inputs["input_ids"].masked_fill(mask == 0, -100) if mask is not None else inputs["input_ids"]
            return SimpleNamespace(loss=self.student(**inputs, labels=labels).loss)
        logits = self.student(**inputs).logits
        with torch.no_grad():
            target = self.teacher(**inputs).logits
        return SimpleNamespace(loss=distill_loss(logits, target, mask if self.causal else None))


def distill_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the output distributions, averaged over examples (or over a causal LM's real
    tokens, `mask`); a single output (regression) is matched by squared error."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits, target)
    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(target.float(), -1), log_target=True,
                  reduction="none").sum(-1)
    if mask is None:
        return kl.mean()
    w = mask.to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp_min(1)


def _window_loader(task: str, tokenizer, data: DataConfig, n: int, batch_size: int, seed: int) -> DataLoader:
    """`n` random text windows of an LM task, in batches (shuffled per epoch by the loader's generator)."""
    rows = [{k: v[0] for k, v in b.items()} for b in calibration_batches(task, tokenizer, data, n, 1, seed)]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def loader(cfg: dict, tokenizer, ft: FinetuneConfig) -> DataLoader:
    """The first `samples` shuffled training examples of a GLUE task (with labels), or windows of an LM task."""
    data = DataConfig(**cfg["data"])
    if check_task(cfg["task"]).kind == "lm":
        return _window_loader(cfg["task"], tokenizer, data, cfg["samples"], ft.batch_size, ft.seed)
    part = dataclasses.replace(data, train_examples=cfg["samples"])
    return make_loader(str(tokenized_split(cfg["task"], "train", tokenizer, part, seed=ft.seed)), tokenizer,
                       ft.batch_size, True, ft.seed)


def _setup(cfg: dict, ft: FinetuneConfig):
    student, teacher = checkpoints.load(cfg["student"]), checkpoints.load(cfg["teacher"])
    data = loader(cfg, student.tokenizer, ft)
    model = Distill(student.model, teacher.model, cfg["loss"], check_task(cfg["task"]).kind == "lm")
    first = {k: v for k, v in next(iter(data)).items() if k != "labels"}
    tune_steps(model.student, lambda: model.student(**first))  # only the steps train from here on
    # every worker loaded the same checkpoints: no buffer (int16 codes, which gloo cannot send) is broadcast
    data, model = prepare_data_loader(data), prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    total = max(1, math.ceil(ft.epochs * len(data)))
    optimizer, scheduler = make_optimizer(model, ft, total)
    return student.tokenizer, model, data, optimizer, scheduler, total


def _save(model: Distill, tokenizer, directory: str, meta: dict, optimizer) -> None:
    release_codes(model.student)  # the weights become codes x tuned steps: the packed export keeps the codes
    checkpoints.write(model.student, tokenizer, directory, meta, "packed")


def train_loop(cfg: dict) -> None:
    """Runs on each Ray Train worker; `cfg` is plain data (paths, numbers)."""
    run_loop(cfg, _setup, lambda model, tok, d, meta, opt: _save(model, tok, d, {**cfg["meta"], **meta}, opt))
