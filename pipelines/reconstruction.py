"""MREM's reconstruction math on one module of a partitioned model (pipelines/partition.py).

A student (the quantized module) learns to reproduce its FP teacher's output at every layer
of the module (plus the logits in the last module). Its input is the teacher's, its
predecessor's quantized outputs, or a mix of both (annealed teacher forcing). The trained
modules' state dicts use the full model's key names, so `assemble` loads their union.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.io import atomic_dir, load_tensors
from pipelines.partition import PartSpec, layout, part_forward, prune_to_part
from quant import QuantConfig, calibrate, quantize_model

# token ids, attention mask, token types, hidden states entering the module (None for the first module)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
STATE_FILE = "state.pt"


def learnable(qcfg: QuantConfig) -> QuantConfig:
    """LSQ: the uniform weight/activation step sizes are trained with the weights."""
    out = QuantConfig.from_dict(qcfg.to_dict())
    for role in ("weight", "act", "embedding", "output"):
        spec = getattr(out, role)
        # per-token/per-group activation steps are recomputed on every call: nothing to learn
        dynamic = role in ("act", "output") and spec is not None and spec.granularity in ("token", "group")
        if spec is not None and spec.scheme == "uniform" and not dynamic:
            spec.learnable = True
    return out


def student_and_teacher(model: nn.Module, spec: PartSpec, quant: str,
                        student_dropout: bool = False) -> tuple[nn.Module, nn.Module]:
    """Module `spec` of an FP model twice: a quantized student (training mode) and a frozen FP teacher.
    `model` becomes the student (quantized whole first, so names and embeddings are as in the export)."""
    layout(model)  # found on the FP model, kept by both copies
    teacher = prune_to_part(copy.deepcopy(model), spec).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    quantize_model(model, learnable(QuantConfig.parse(quant)))
    student = prune_to_part(model, spec)
    student.train()  # quantizers train (stochastic rounding, LSQ); dropout only if asked for
    if not student_dropout:
        for m in student.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # HF attention reads its dropout probability from these modules too
    return student, teacher


def is_quant_param(name: str) -> bool:
    """Quantizer parameters (LSQ steps, offsets) live in `*.weight_q` / `*.act_q` submodules."""
    parts = name.split(".")
    return len(parts) > 1 and parts[-2].endswith("_q")


def optimizer(student: nn.Module, lr: float, lr_quant: float) -> torch.optim.Optimizer:
    """Adam with two groups: the weights (lr) and the quantizer step sizes (lr_quant)."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    weights = [p for n, p in named if not is_quant_param(n)]
    steps = [p for n, p in named if is_quant_param(n)]
    return torch.optim.Adam([{"params": weights, "lr": lr}, {"params": steps, "lr": lr_quant}])


def cosine(step: int, steps: int) -> float:
    """The learning-rate factor at `step` of a cosine decay over `steps`."""
    return 0.5 * (1 + math.cos(math.pi * step / steps))


@dataclass
class Plateau:
    """When a module is done: its held-out loss has not improved by `tolerance` (relative to the best so far)
    for `patience` checks in a row. The first `decays` plateaus lower the learning rate instead of stopping."""
    tolerance: float
    patience: int
    decays: int = 1
    best: float = math.inf
    stale: int = 0
    plateaus: int = 0

    def update(self, loss: float) -> str | None:
        """One check: None, "decay" (lower the learning rate and go on) or "plateau" (done, if allowed)."""
        if loss < self.best * (1 - self.tolerance):
            self.best, self.stale = loss, 0
            return None
        self.best, self.stale = min(self.best, loss), self.stale + 1
        if self.stale < self.patience:
            return None
        self.stale = 0
        if self.plateaus < self.decays:
            self.plateaus += 1
            return "decay"
        return "plateau"

    def restart(self) -> None:
        """The measured loss changed meaning (new inputs): judge improvement from the next check on."""
        self.best, self.stale = math.inf, 0


def teacher_forcing(step: int, t0: int) -> float:
    """lambda_t = max(1 - t/T0, 0): the teacher's share of a student input (0 once t >= T0)."""
    return max(1.0 - step / t0, 0.0) if t0 > 0 else 0.0


def mix(teacher_in: torch.Tensor, predecessor: torch.Tensor | None, lam: float) -> torch.Tensor:
    """The student's input: lambda * teacher + (1 - lambda) * quantized predecessor."""
    return teacher_in if predecessor is None else lam * teacher_in + (1 - lam) * predecessor


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real (unpadded) tokens."""
    w = mask.unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * w).sum() / (w.sum() * a.shape[-1]).clamp_min(1)


def reconstruction_loss(student: nn.Module, teacher: nn.Module, spec: PartSpec, batch: Batch,
                        student_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, student output): the layer outputs' MSE against the teacher fed `batch`'s input
    (plus the logits' in the last module); the student is fed hidden states `student_in` when given."""
    ids, mask, tt, hidden = batch
    with torch.no_grad():
        t_out, t_layers = part_forward(teacher, spec, ids, mask, tt, hidden)
    s_out, s_layers = part_forward(student, spec, ids, mask, tt, hidden if student_in is None else student_in)
    loss = sum(masked_mse(s, t, mask) for s, t in zip(s_layers, t_layers))
    if spec.last:
        loss = loss + nn.functional.mse_loss(s_out, t_out)
    return loss, s_out


@torch.no_grad()
def module_error(student: nn.Module, teacher: nn.Module, spec: PartSpec, batches: Iterable[Batch]) -> float:
    """Module-local error: the layer outputs' MSE, student and teacher fed the same (teacher) inputs."""
    was_training = student.training
    student.eval()
    errs = []
    for ids, mask, tt, hidden in batches:
        _, t_layers = part_forward(teacher, spec, ids, mask, tt, hidden)
        _, s_layers = part_forward(student, spec, ids, mask, tt, hidden)
        errs.append(float(sum(masked_mse(s, t, mask) for s, t in zip(s_layers, t_layers))))
    student.train(was_training)
    return sum(errs) / max(len(errs), 1)


@torch.no_grad()
def init_ranges(student: nn.Module, spec: PartSpec, batches: Iterable[Batch]) -> None:
    """Activation quantizers start from min-max ranges of teacher inputs (as RTN does)."""
    with calibrate(student):
        for ids, mask, tt, hidden in batches:
            part_forward(student, spec, ids, mask, tt, hidden)


def assemble(model: nn.Module, quant: str, states: list[dict[str, torch.Tensor]]) -> nn.Module:
    """The FP `model`, quantized, with every module's trained weights and quantizer parameters."""
    layout(model)
    quantize_model(model, learnable(QuantConfig.parse(quant)))
    merged = {k: v for state in states for k, v in state.items()}
    missing = set(model.state_dict()) - set(merged)
    if missing:
        raise RuntimeError(f"assembled MREM model lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(merged)
    return model.eval()


@torch.no_grad()
def boundary_errors(model: nn.Module, teacher: nn.Module, specs: list[PartSpec],
                    batches: Iterable[dict[str, torch.Tensor]]) -> list[float]:
    """Per-module reconstruction error of a whole quantized model against its FP teacher:
    each module fed by its quantized predecessors (hidden-state MSE; logits MSE for the last)."""
    totals, count = [0.0] * len(specs), 0
    model.eval(), teacher.eval()
    for batch in batches:
        ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        xs = xt = None
        for s in specs:
            xs, _ = part_forward(model, s, ids, mask, tt, xs)
            xt, _ = part_forward(teacher, s, ids, mask, tt, xt)
            err = nn.functional.mse_loss(xs, xt) if s.last else masked_mse(xs, xt, mask)
            totals[s.index] += float(err)
        count += 1
    return [t / max(count, 1) for t in totals]


def save_state(folder: str | Path, state: dict) -> None:
    """A module's training state (state dicts, step, losses), written atomically into `folder`."""
    with atomic_dir(folder) as tmp:
        torch.save(state, tmp / STATE_FILE)


def load_state(folder: str | Path, device: str) -> dict | None:
    """The state `save_state` wrote, or None; tensors, numbers and lists only (nothing unpickled)."""
    path = Path(folder) / STATE_FILE
    return load_tensors(path, device) if path.is_file() else None
