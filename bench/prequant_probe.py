"""How much of the pre-trained MiniLM a PreQuant base keeps, before any fine-tuning.

    python bench/prequant_probe.py            # MiniLM, W4/W3 grids x nearest/GPTQ rounding

For each base (prequant-quantize's numerics: activation criterion, 0.3% FP columns, the pooler
FP) it records
  cos   mean cosine between the base's and the FP model's mean-pooled embeddings of 64 MRPC
        dev pairs (fidelity);
  probe logistic-regression accuracy on frozen SST-2 features (3,000 train sentences, dev),
        from [CLS] and from the mean of the tokens (task information left in the body).
Writes bench/results/prequant_probe.json and .md.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines import models  # noqa: E402
from pipelines.io import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402
from pipelines.prequant_model import calibration_sentences  # noqa: E402
from quant import prequant as ol  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prequant_probe.json"
# (name, QuantConfig, prequant.quantizer, GPTQ)
ASYM = "w3:weight.symmetric=false"
BASES = [("fp", None, None, False)] + [(f"{label} {grid} {'gptq' if gptq else 'nearest'}", quant, grid, gptq)
                                       for label, quant, grid in (("w4", "w4", "row"), ("w4", "w4", "row-mse"),
                                                                  ("w3", "w3", "row-mse"), ("w3 asym", ASYM, "row-mse"))
                                       for gptq in (False, True)]
OCFG = {"criterion": "activation", "budget": 0.003, "skip": ["*pooler*"]}


def glue_rows(task: str, split: str, n: int) -> list[list[str]]:
    lines = (ROOT / "data" / "glue" / task / f"{split}.tsv").read_text().splitlines()
    return [line.split("\t") for line in lines[1:n + 1]]


def embed(model, tok, texts, pairs=None) -> dict[str, torch.Tensor]:
    """[CLS] and mean-pooled last hidden states, 64 at a time."""
    out = {"cls": [], "mean": []}
    for i in range(0, len(texts), 64):
        enc = tok(texts[i:i + 64], None if pairs is None else pairs[i:i + 64], padding=True, truncation=True,
                  max_length=128, return_tensors="pt")
        with torch.no_grad():
            h = model.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1)
        out["cls"].append(h[:, 0])
        out["mean"].append((h * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def probe(train: dict, dev: dict, y_train, y_dev) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    return {k: round(100 * LogisticRegression(max_iter=3000).fit(train[k].numpy(), y_train).score(
        dev[k].numpy(), y_dev), 2) for k in train}


def main() -> None:
    torch.manual_seed(0)
    fp = models.load_classifier("minilm-l6", 2, seed=42).eval()
    tok = models.load_tokenizer("minilm-l6")
    names = ol.targets(fp, ol.OutlierConfig("w4", **OCFG))
    stats = ol.input_stats(fp, names, (tok(s, truncation=True, max_length=128, return_tensors="pt")
                                       for s in calibration_sentences("wikitext2", 256)), hessian=True)
    act, hess = {n: s["absmax"] for n, s in stats.items()}, {n: s["hessian"] for n, s in stats.items()}
    mrpc = glue_rows("MRPC", "dev", 64)
    sst_train, sst_dev = glue_rows("SST-2", "train", 3000), glue_rows("SST-2", "dev", 1000)
    y_train, y_dev = np.array([int(r[1]) for r in sst_train]), np.array([int(r[1]) for r in sst_dev])
    ref = embed(fp, tok, [r[3] for r in mrpc], [r[4] for r in mrpc])["mean"]
    rows = []
    for name, quant, grid, gptq in BASES:
        model = copy.deepcopy(fp)
        if quant:
            ol.prequantize(model, ol.OutlierConfig(ol.with_quantizer(quant, grid), **OCFG), act,
                           hess if gptq else None)
        cos = torch.nn.functional.cosine_similarity(embed(model, tok, [r[3] for r in mrpc], [r[4] for r in mrpc])[
            "mean"], ref).mean().item()
        acc = probe(embed(model, tok, [r[0] for r in sst_train]), embed(model, tok, [r[0] for r in sst_dev]),
                    y_train, y_dev)
        rows.append({"base": name, "cos": round(cos, 4), "probe_cls": acc["cls"], "probe_mean": acc["mean"]})
        print(rows[-1], flush=True)
    command = "python bench/prequant_probe.py"
    write_json_atomic(RESULTS, {"command": command, "machine": f"{os.cpu_count()} cores", "setup": OCFG,
                                "rows": rows})
    write_text_atomic(RESULTS.with_suffix(".md"), "\n".join([
        "# PreQuant bases before fine-tuning (minilm-l6)", "",
        "cos: mean cosine of mean-pooled MRPC dev embeddings (64 pairs) to FP. probe_*: logistic regression on "
        "frozen SST-2 features (3,000 train sentences, dev accuracy), from [CLS] and from the mean of the tokens. "
        "Activation criterion, 0.3% FP columns, pooler FP, 256 WikiText-2 sentences for criterion and GPTQ.", "",
        markdown_table(rows, ["base", "cos", "probe_cls", "probe_mean"]), "", f"Command: `{command}`"]) + "\n")
    print(f"wrote {RESULTS} and {RESULTS.with_suffix('.md')}")


if __name__ == "__main__":
    main()
