"""MREM's reconstruction math on one module: the student/teacher pair, teacher forcing, assembly."""
from __future__ import annotations

import copy

import pytest
import torch

from pipelines import models
from pipelines.partition import split_layers
from pipelines.reconstruction import (
    assemble,
    boundary_errors,
    load_state,
    mix,
    reconstruction_loss,
    save_state,
    student_and_teacher,
    teacher_forcing,
)


def _batch(tok):
    return tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")


def test_teacher_forcing_anneals_to_the_predecessor():
    assert [teacher_forcing(t, 4) for t in (0, 2, 4, 9)] == [1.0, 0.5, 0.0, 0.0]
    assert teacher_forcing(0, 0) == 0.0  # T0 = 0: the predecessor's outputs from the start
    x, p = torch.ones(2), torch.zeros(2)
    assert torch.equal(mix(x, p, 0.25), torch.full((2,), 0.25)) and mix(x, None, 0.0) is x


def test_the_student_starts_near_its_frozen_teacher_and_only_it_learns():
    tok, model = models.load_tokenizer("tiny-bert"), models.load_classifier("tiny-bert", 2, seed=0)
    spec = split_layers(4, 2)[0]
    student, teacher = student_and_teacher(model, spec, "w8a8")
    batch = _batch(tok)
    loss, out = reconstruction_loss(student, teacher, spec, (batch["input_ids"], batch["attention_mask"], None, None))
    assert 0 < float(loss.detach()) < 1e-2 and out.shape[:2] == batch["input_ids"].shape
    assert not any(p.requires_grad for p in teacher.parameters()) and student.training and not teacher.training
    loss.backward()
    assert any(p.grad is not None for p in student.parameters())


def test_assembled_modules_reproduce_the_quantized_model_and_gaps_are_refused():
    tok, model = models.load_tokenizer("tiny-bert"), models.load_classifier("tiny-bert", 2, seed=0).eval()
    specs = split_layers(4, 2)
    states = [student_and_teacher(copy.deepcopy(model), s, "w4a8")[0].state_dict() for s in specs]
    states[1]["classifier.bias"] = states[1]["classifier.bias"] + 1.0  # as if module 1 had trained it
    whole = assemble(copy.deepcopy(model), "w4a8", states)
    assert torch.equal(whole.classifier.bias, states[1]["classifier.bias"])
    batch = _batch(tok)
    errors = boundary_errors(whole, model, specs, [dict(batch)])
    assert len(errors) == 2 and all(e > 0 for e in errors)  # quantized, so not the teacher
    with pytest.raises(RuntimeError, match="lacks"):
        assemble(copy.deepcopy(model), "w4a8", states[:1])


def test_module_state_round_trips(tmp_path):
    state = {"student": {"w": torch.ones(2)}, "step": 7, "losses": [0.5, 0.25], "initial_error": None}
    save_state(tmp_path / "module0", state)
    back = load_state(tmp_path / "module0", "cpu")
    assert back["step"] == 7 and back["losses"] == [0.5, 0.25] and torch.equal(back["student"]["w"], torch.ones(2))
    assert load_state(tmp_path / "module1", "cpu") is None


def test_a_plateau_first_lowers_the_learning_rate_then_stops():
    from pipelines.reconstruction import Plateau

    p = Plateau(tolerance=0.1, patience=2)
    # improving by more than 10% resets the count; two checks without it make a plateau
    events = [p.update(x) for x in (1.0, 0.8, 0.75, 0.74, 0.5, 0.49, 0.48, 0.47, 0.46)]
    assert events == [None, None, None, "decay", None, None, "plateau", None, "plateau"]
    p.restart()  # new inputs: the next loss is the new best, however high
    assert p.update(5.0) is None and p.best == 5.0
