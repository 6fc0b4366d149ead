"""Stage records: a record whose content is not what `commit` wrote is not trusted; its stage is recomputed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.store import CHECKSUM, StageStore

NAME, KEY = "rtn/sst2/w4a8", "k1"


@pytest.fixture(params=[False, True], ids=["local", "uri"])
def store(request, tmp_path) -> StageStore:
    """A store whose run directory is a local folder, or a file:// URI (a remote store's code path)."""
    local = tmp_path / "local"
    run_dir = (tmp_path / "bucket").as_uri() if request.param else str(local)
    return StageStore(run_dir, local)


def record_file(store: StageStore) -> Path:
    return Path(store._record_path(NAME))


def commit(store: StageStore) -> dict:
    return store.commit(NAME, KEY, {"row": {"value": 87.5}, "info": {"wall_s": 3.0}})


def test_a_committed_record_carries_a_checksum_and_skips_its_stage(store, capsys):
    commit(store)
    assert CHECKSUM in json.loads(record_file(store).read_text())
    done = store.done(NAME, KEY)
    assert done["row"] == {"value": 87.5} and done["key"] == KEY and CHECKSUM not in done
    assert "WARNING" not in capsys.readouterr().out


def test_a_truncated_record_is_recomputed_with_a_warning_naming_the_file(store, capsys):
    commit(store)
    text = record_file(store).read_text()
    record_file(store).write_text(text[:len(text) // 2])
    assert store.done(NAME, KEY) is None
    out = capsys.readouterr().out
    assert f"WARNING: the record {record_file(store)} is not a whole JSON record" in out
    assert f"stage {NAME} will be recomputed" in out


def test_an_edited_record_is_recomputed(store, capsys):
    commit(store)
    rec = json.loads(record_file(store).read_text())
    rec["row"]["value"] = 99.0  # a better figure typed in by hand
    record_file(store).write_text(json.dumps(rec))
    assert store.done(NAME, KEY) is None
    assert f"{record_file(store)} does not match its checksum (edited or damaged)" in capsys.readouterr().out


def test_a_record_without_a_checksum_is_recomputed(store, capsys):
    commit(store)
    rec = json.loads(record_file(store).read_text())
    del rec[CHECKSUM]  # as plmq wrote records before they had one
    record_file(store).write_text(json.dumps(rec))
    assert store.done(NAME, KEY) is None
    assert "has no checksum (written by an older plmq, or by hand)" in capsys.readouterr().out


def test_a_recommitted_stage_is_trusted_again(store):
    commit(store)
    record_file(store).write_text("{")
    assert store.done(NAME, KEY) is None
    commit(store)  # what the runner does after recomputing the stage
    assert store.done(NAME, KEY)["row"] == {"value": 87.5}


def test_values_json_holds_differently_still_verify(store):
    """Paths become strings, tuples lists, int keys strings, NaN stays NaN: the checksum is of what is stored."""
    store.commit(NAME, KEY, {"checkpoint": Path("/x/model"), "layers": (0, 2), "by_k": {1: 0.5},
                             "loss": float("nan")})
    done = store.done(NAME, KEY)
    assert (done["checkpoint"], done["layers"], done["by_k"]) == ("/x/model", [0, 2], {"1": 0.5})
    assert math.isnan(done["loss"])


def test_a_record_that_is_not_an_object_is_recomputed(store, capsys):
    commit(store)
    record_file(store).write_text("[1, 2]")
    assert store.done(NAME, KEY) is None
    assert "is not a JSON object" in capsys.readouterr().out
