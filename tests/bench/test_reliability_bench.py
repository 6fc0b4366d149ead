"""bench/reliability.py: its scans and its page (no Ray; the faults themselves are tested in tests/pipelines)."""
from __future__ import annotations

import typer

from bench import reliability
from bench.reliability_cases import make_bad_inputs
from pipelines.cli import app


def test_the_product_code_has_no_unsafe_load_and_leftover_temporaries_are_found(tmp_path):
    assert reliability.unsafe_loads() == []
    (tmp_path / "run" / "stages").mkdir(parents=True)
    (tmp_path / "run" / "stages" / ".x.json.123.ab.tmp").write_text("{")
    (tmp_path / "run" / "model.tmp").mkdir()
    assert len(reliability.half_written(tmp_path)) == 2


def test_every_bad_input_case_is_built_and_the_page_counts_them(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("model: tiny-bert\n")
    cases = make_bad_inputs(tmp_path, config)
    assert len({name for name, _, _ in cases}) == len(cases) == 29
    verbs = typer.main.get_command(app).commands
    for _, args, _ in cases:  # each is a valid command line: the error must come from plmq, not from the parser
        verbs[args[0]].make_context(args[0], list(args[1:]))
    assert (tmp_path / "truncated" / "model.safetensors").stat().st_size < \
        (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    results = {"faults": {"tried": 2, "survived": 1}, "bad_inputs": {"tried": 3, "clear_error_before_work": 3},
               "half_written_files": 0, "unsafe_loads": 0, "command": "python -m bench.reliability",
               "machine": "2 cores", "wall_s": 10,
               "rows": [{"case": "c", "outcome": "o", "redone_s": 1.0, "survived": True}], "bad_input_rows": []}
    page = reliability.markdown(results)
    assert "Faults tried 2, survived 1" in page and "| c | o | 1 | True |" in page
