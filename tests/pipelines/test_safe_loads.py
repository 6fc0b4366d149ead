"""Nothing read back from an output folder is unpickled: every training state goes through io.load_tensors, and a
crafted file (whose unpickling would create a marker file) is refused with an error naming it."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import ray.train
import torch

from pipelines import lm_train, reconstruction, training
from pipelines.io import UnsafeFile, load_tensors
from tests.crafted import crafted_pickle

ROOT = Path(__file__).resolve().parents[2]


def test_a_plain_state_loads_and_a_crafted_one_is_refused(tmp_path):
    torch.save({"step": 3, "w": torch.ones(2), "losses": [0.5]}, tmp_path / "ok.pt")
    assert load_tensors(tmp_path / "ok.pt")["step"] == 3
    marker = crafted_pickle(tmp_path / "bad" / "state.pt")
    with pytest.raises(UnsafeFile, match=re.escape(str(tmp_path / "bad" / "state.pt"))) as err:
        load_tensors(tmp_path / "bad" / "state.pt")
    assert isinstance(err.value, pickle.UnpicklingError) and "Delete it" in str(err.value)
    assert not marker.exists()


def test_mrem_and_pretrain_states_are_never_unpickled(tmp_path):
    marker = crafted_pickle(tmp_path / "module1" / reconstruction.STATE_FILE)
    with pytest.raises(UnsafeFile):
        reconstruction.load_state(tmp_path / "module1", "cpu")
    marker2 = crafted_pickle(tmp_path / "pretrain" / lm_train.STATE_FILE)
    with pytest.raises(UnsafeFile):
        lm_train.LocalSession(tmp_path / "pretrain").restore()
    assert not marker.exists() and not marker2.exists()


def test_a_finetune_resumes_only_from_plain_state(tmp_path, monkeypatch):
    """The state a Ray Train worker resumes from (train_state.pt in its latest checkpoint)."""
    marker = crafted_pickle(tmp_path / "ckpt" / "train_state.pt")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(tmp_path / "ckpt"))
    with pytest.raises(UnsafeFile, match="train_state.pt"):
        training._restore(torch.nn.Linear(2, 2), None, None)
    assert not marker.exists()


def test_product_code_reads_states_only_through_load_tensors():
    """No torch.load (but load_tensors'), pickle load or allow_pickle anywhere in quant/, actors/ and pipelines/."""
    unsafe = []
    for path in [p for d in ("quant", "actors", "pipelines") for p in (ROOT / d).rglob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|cloudpickle", code):
                unsafe.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert [u.split(":")[0] for u in unsafe] == ["pipelines/io.py"], unsafe  # load_tensors, weights_only=True
    assert "weights_only=True" in unsafe[0]
