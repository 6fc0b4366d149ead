"""bench/lm.py: judging the causal-LM figures and writing their page (recorded-looking figures, no Ray)."""
from __future__ import annotations

from bench import lm


def _results() -> dict:
    details = {"mrem_s": {"train_s": 300.0}, "mrem_p": {"train_s": 150.0}}
    return {"fp_ppl": 100.0, "context": 256, "commands": {"w2g64/rtn": "python -m bench.lm ..."},
            "configs": {"w2g64": {"rtn": 130.0, "gptq": 110.0, "mrem_s": 104.0, "mrem_p": 104.52,
                                  "wall_s": {"mrem_s": 500.0, "mrem_p": 400.0}, "details": details}}}


def test_targets_and_speedups_are_judged_from_the_figures():
    results = _results()
    lm.judge(results)
    fig = results["configs"]["w2g64"]
    assert fig["mrem_p_le_gptq"] and fig["increase_ratio_p_vs_gptq"] == 0.452 and fig["p_vs_s_pct"] == 0.5
    assert results["speedup_p2_vs_s"] == 2.0 and results["speedup_p2_vs_s_stage"] == 1.25


def test_the_page_shows_every_method_and_the_command():
    results = _results()
    lm.judge(results)
    page = lm.markdown(results)
    assert "| w2g64 | 100 | 130 | 110 | 104 | 104.5 | True | 0.452 |" in page
    assert "2.0x in module training time" in page and "`python -m bench.lm ...`" in page


def _trained(folder, recipe: str, ppl: float, steps: int = 300) -> str:
    import json
    import math

    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({
        "recipe": recipe, "steps": steps, "corpus": "tinyshakespeare+wikitext2", "seed": 0, "val_ppl": ppl,
        "val_loss": math.log(ppl), "step_s": 8.0, "diverged": False}))
    return str(folder)


def test_the_quantized_pretraining_gap_compares_like_with_like(tmp_path):
    import pytest

    fp = _trained(tmp_path / "fp", "fp", 500.0)
    gap = lm.qpretrain_gap(fp, _trained(tmp_path / "q", "w8a8g8gw8m8v8", 510.0))
    assert gap["fp_ppl"] == 500.0 and gap["w8a8g8gw8m8v8_ppl"] == 510.0 and gap["gap_pct"] == 2.0
    with pytest.raises(SystemExit, match="trained differently"):
        lm.qpretrain_gap(fp, _trained(tmp_path / "short", "w8a8", 510.0, steps=100))


def test_contended_timings_stay_out_of_the_speedup():
    results = _results()
    details = {"mrem_s": {"train_s": 900.0}, "mrem_p": {"train_s": 150.0}}
    results["configs"]["w4a8"] = {"mrem_s": 104.0, "mrem_p": 104.0, "wall_s": {"mrem_s": 2000.0, "mrem_p": 400.0},
                                  "details": details, "timing_contended": "tests ran beside it"}
    lm.judge(results)
    assert results["speedup_p2_vs_s"] == 2.0 and results["configs"]["w4a8"]["p_vs_s_pct"] == 0.0
    assert "| contended |" in lm.markdown(results)
