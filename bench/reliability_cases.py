"""The bad inputs bench/reliability.py tries: (case, `plmq` arguments, a word the error line must contain).

Each builds what it needs under a temporary folder: broken task files, model folders, output paths, a lock.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

SETS = [  # (case, --set overrides, a word the error must contain)
    ("unknown config key", ["mremm.steps=3"], "mremm"),
    ("zero epochs", ["finetune.epochs=0"], "finetune.epochs"),
    ("infinite epochs", ["finetune.epochs=.inf"], "finetune.epochs"),
    ("zero batch size", ["finetune.batch_size=0"], "batch_size"),
    ("negative MREM steps", ["mrem.quant=[w4a8]", "mrem.steps=-1"], "mrem.steps"),
    ("zero calibration samples", ["mrem.quant=[w4a8]", "mrem.calib_samples=0"], "calib_samples"),
    ("more modules than layers", ["mrem.quant=[w4a8]", "mrem.modules=99"], "mrem.modules"),
    ("negative learning rate", ["mrem.quant=[w4a8]", "mrem.lr=-1"], "mrem.lr"),
    ("unknown task", ["tasks=[sst3]"], "sst3"),
    ("unknown quant string", ["rtn.quant=[w5x]"], "w5x"),
    ("group size that does not divide the width", ["rtn.quant=[w4g7a8]"], "rtn.quant"),
    ("context above the model's positions", ["data.max_length=100000"], "data.max_length"),
    ("malformed --set", ["tasks=[sst2"], "tasks"),
    ("missing data folder", ["data.source=dir", "data.dir=/nonexistent/glue"], "/nonexistent/glue"),
    ("missing model folder", ["model=/nonexistent/model"], "/nonexistent/model"),
]
TSVS = [  # (case, train.tsv bytes, a word the error must contain)
    ("empty train.tsv", b"", "train.tsv"),
    ("header-only train.tsv", b"sentence\tlabel\n", "train.tsv"),
    ("a line with three columns", b"sentence\tlabel\ngood film\t1\nbad\t0\textra\n", "line 3"),
    ("a non-numeric label", b"sentence\tlabel\ngood film\tpositive\n", "positive"),
    ("binary garbage", b"sentence\tlabel\n\x00\x01\x02\xff\xfe\n", "train.tsv"),
    ("a Latin-1 file", "sentence\tlabel\ncaf\xe9 cr\xe8me\t1\n".encode("latin-1"), "UTF-8"),
]


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def make_bad_inputs(tmp: Path, config: Path) -> list[tuple[str, list[str], str]]:
    """Every case as (name, `plmq` arguments, expected word), with its files made under `tmp`."""
    run = ["run", str(config)]
    cases = [(name, [*run, *_sets(sets)], word) for name, sets, word in SETS]
    for i, (name, body, word) in enumerate(TSVS):
        glue = tmp / f"glue{i}" / "SST-2"
        glue.mkdir(parents=True)
        (glue / "train.tsv").write_bytes(body)
        (glue / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
        cases.append((name, [*run, *_sets(["data.source=dir", f"data.dir={glue.parent}"])], word))
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "broken.yaml").write_text("model: [tiny-bert\n")
    cases += [("YAML that is not a mapping", ["run", str(tmp / "list.yaml")], "mapping"),
              ("malformed YAML file", ["run", str(tmp / "broken.yaml")], "broken.yaml")]
    cases += _model_cases(tmp, run) + _output_cases(tmp, config, run)
    return cases


def _model_cases(tmp: Path, run: list[str]) -> list[tuple[str, list[str], str]]:
    from pipelines import checkpoints, models

    empty = tmp / "no-weights"
    empty.mkdir()
    model = models.load_classifier("tiny-bert", 2, seed=0)
    model.config.save_pretrained(empty)
    full = tmp / "ckpt"
    checkpoints.save(model, models.load_tokenizer("tiny-bert"), full, {"task": "sst2"}, "fp")
    cut = tmp / "truncated"
    checkpoints.save(model, models.load_tokenizer("tiny-bert"), cut, {"task": "sst2"}, "fp")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [("model folder without weights", [*run, "--set", f"model={empty}"], "no-weights"),
            ("truncated safetensors", [*run, "--set", f"model={cut}"], "model.safetensors"),
            ("checkpoint of another task", ["evaluate", str(full), "--task", "rte"], "sst2")]


def _output_cases(tmp: Path, config: Path, run: list[str]) -> list[tuple[str, list[str], str]]:
    (tmp / "a-file").write_text("not a folder")
    locked = tmp / "locked"
    locked.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(), "command": "bench"}
    (locked / ".plmq.lock").write_text(json.dumps(holder))
    return [("output_dir is a file", [*run, "--set", f"output_dir={tmp / 'a-file'}"], "output_dir"),
            ("output_dir under a file", [*run, "--set", f"output_dir={tmp / 'a-file' / 'run'}"], "output_dir"),
            ("a second writer", [*run, "--set", f"output_dir={locked}"], str(os.getpid()))]
