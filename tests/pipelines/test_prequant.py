"""PreQuant stages: quantize once (task-agnostic), fine-tune only outliers per task on Ray Train."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipelines import models, tracking
from pipelines import prequant as pq
from pipelines.cli import app
from pipelines.config import ConfigError, load_config
from pipelines.data import tokenized_split
from pipelines.evaluate import evaluate_model
from pipelines.finetune import make_loader, make_optimizer
from quant import outliers as ol


def write_pair_task(root, folder="RTE", n_train=64, n_dev=32, seed=1):
    """An RTE-format folder (sentence pairs, entailment labels) beside the separable SST-2."""
    rng = random.Random(seed)
    (root / folder).mkdir()
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            same = rng.random() < 0.5
            a = rng.choice(["the film was good", "the plot was dull", "a great story"])
            b = a if same else rng.choice(["the acting was poor", "it rained all day"])
            lines.append(f"{i}\t{a}\t{b}\t{'entailment' if same else 'not_entailment'}")
        (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def tiny_cfg(tmp_path, glue, cache_dir, *extra):
    return load_config(None, [
        "model=tiny-bert", "tasks=[sst2]", f"output_dir={tmp_path / 'out'}", "experiment=plmq-prequant-test",
        "data.source=dir", f"data.dir={glue}", "data.max_length=16", f"data.cache_dir={cache_dir}",
        "data.train_examples=64", "data.eval_examples=32", "finetune.epochs=1", "finetune.batch_size=32",
        "finetune.log_every=1", "prequant.quant=[w4]", "prequant.lr=1e-2", *extra])

# ---------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize("overrides,message", [
    (["prequant.budget_pct=0"], "prequant.budget_pct=0.0: must be in (0, 100)"),
    (["prequant.budget_pct=-1"], "prequant.budget_pct=-1.0"),
    (["prequant.budget_pct=100"], "prequant.budget_pct=100.0: must be in (0, 100)"),
    (["prequant.quant=[w16a8]"], "prequant.quant[0]='w16a8': PreQuant needs quantized weights"),
    (["prequant.quant=[w4-e8]"], "drop the -e/-o part"),
    (["prequant.quant=[w4x]"], "prequant.quant[0]='w4x'"),
    (["prequant.methods=[qat]"], "prequant.methods: 'qat'"),
    (["prequant.criterion=gradient"], "prequant.criterion='gradient'"),
    (["prequant.quantizer=gptq"], "prequant.quantizer='gptq'"),
    (["prequant.head_lr=2"], "prequant.head_lr=2.0: must be in (0, 1)"),
    (["prequant.gptq=maybe"], "prequant.gptq: expected bool, got str 'maybe'"),
    (["prequant.scale_outlier_lr=1"], "prequant.scale_outlier_lr: expected bool"),
    (["prequant.body_dropout=1"], "prequant.body_dropout=1.0: must be in [0, 1)"),
    (["prequant.body_dropout=-0.1"], "prequant.body_dropout=-0.1"),
    (["prequant.column_blocks=0"], "prequant.column_blocks=0: a number of blocks >= 1"),
    (["prequant.gptq=true", "prequant.quant=[w4,w2]"], "prequant.quant[1]='w2': GPTQ rounds onto uniform grids"),
])
def test_bad_prequant_config_is_rejected_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_missing_artefact_fails_before_any_work(tmp_path, separable_glue, cache_dir, monkeypatch):
    cfg = tiny_cfg(tmp_path, separable_glue, cache_dir)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the missing artefact was reported")

    for name in ("ensure_ray", "tokenized_split", "fit_to_dir"):
        monkeypatch.setattr(pq, name, no_work)
    with pytest.raises(FileNotFoundError, match="no pre-quantized model .* run `plmq prequant-quantize`"):
        pq.prequant_finetune("sst2", "tiny-bert", "w4", "prequant", cfg.data, cfg.finetune, cfg.prequant,
                             cfg.evaluate, tmp_path / "empty", tmp_path / "ft")
    result = CliRunner().invoke(app, ["prequant-finetune", "--set", "model=tiny-bert", "--quant", "w4",
                                      "--output-dir", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "no pre-quantized model" in result.output
    assert not (tmp_path / "ft").exists() and not (tmp_path / "cli").exists()

# ---------------------------------------------------------------- prequant-quantize


@pytest.mark.parametrize("train_norms", [False, True])
def test_quantize_hits_the_budget_and_is_stored_once(tmp_path, monkeypatch, train_norms):
    cfg = load_config(None, ["prequant.quant=[w4]", "prequant.budget_pct=0.5", f"prequant.train_norms={train_norms}"])
    first = pq.prequant_quantize("tiny-bert", "w4", cfg.prequant, tmp_path)
    assert not first.reused and abs(first.budget_pct_used - 0.5) <= 0.05
    manifest = ol.read_manifest(first.directory)
    assert manifest["spec"]["criterion"] == "weight" and manifest["quant"] == "w4a16"
    assert (manifest["reserved_params"] > 0) == train_norms
    tensors = load_file(f"{first.directory}/{ol.WEIGHTS_FILE}")
    assert not any(k.startswith("classifier.") for k in tensors)  # task-agnostic: no head stored
    assert any(k.endswith(".weight.packed") for k in tensors) and any(k.endswith(".outlier_idx") for k in tensors)
    assert sum(tensors[k].numel() for k in tensors if k.endswith(".outlier")) == manifest["outlier_params"]

    monkeypatch.setattr(ol, "prequantize", lambda *a, **k: pytest.fail("quantized a second time"))
    again = pq.prequant_quantize("tiny-bert", "w4", cfg.prequant, tmp_path)
    assert again.reused and again.directory == first.directory
    other = load_config(None, ["prequant.budget_pct=1.0"]).prequant  # a different key is a different model
    assert pq.artefact_spec("tiny-bert", "w4", other).directory(tmp_path) != pq.artefact_spec(
        "tiny-bert", "w4", cfg.prequant).directory(tmp_path)


def test_column_blocks_put_the_budget_in_the_top_blocks_and_key_the_model(tmp_path, monkeypatch):
    everywhere = load_config(None, ["prequant.quant=[w4]", "prequant.budget_pct=0.3"]).prequant
    top = load_config(None, ["prequant.quant=[w4]", "prequant.budget_pct=0.3", "prequant.column_blocks=1"]).prequant
    assert pq.artefact_spec("tiny-bert", "w4", top).key != pq.artefact_spec("tiny-bert", "w4", everywhere).key
    results = {name: pq.prequant_quantize("tiny-bert", "w4", c, tmp_path) for name, c in
               (("everywhere", everywhere), ("top", top))}
    assert abs(results["top"].outlier_params - results["everywhere"].outlier_params) <= 0.05e-2 * results[
        "top"].body_params  # the same budget
    tensors = load_file(f"{results['top'].directory}/{ol.WEIGHTS_FILE}")
    cols = {k: tensors[k].shape[1] for k in tensors if k.endswith(".outlier")}
    last = max(ol.block_index(k) for k in cols if ol.block_index(k) is not None)
    assert all(n == 0 for k, n in cols.items() if ol.block_index(k) not in (None, last))
    assert all(n > 0 for k, n in cols.items() if ol.block_index(k) == last)
    too_many = load_config(None, ["prequant.quant=[w4]", "prequant.column_blocks=99",  # calibrates: activation criterion
                                   "prequant.criterion=activation"]).prequant
    monkeypatch.setattr(pq, "_input_stats", lambda *a: pytest.fail("calibrated before checking column_blocks"))
    with pytest.raises(ValueError, match="column_blocks=99: the model's quantized Linears sit in"):
        pq.prequant_quantize("tiny-bert", "w4", too_many, tmp_path)


def test_new_weights_in_a_local_model_folder_are_quantized_afresh(tmp_path):
    """A pre-trained model given as a folder is keyed by its weights, not only its path."""
    cfg = load_config(None, ["prequant.quant=[w4]"]).prequant
    tok, folder = models.load_tokenizer("tiny-bert"), tmp_path / "pretrained"
    models.save_checkpoint(models.load_classifier("tiny-bert", 2, seed=1), tok, folder, {})
    first = pq.prequant_quantize(str(folder), "w4", cfg, tmp_path / "store")
    assert pq.prequant_quantize(str(folder), "w4", cfg, tmp_path / "store").reused
    models.save_checkpoint(models.load_classifier("tiny-bert", 2, seed=2), tok, folder, {})
    second = pq.prequant_quantize(str(folder), "w4", cfg, tmp_path / "store")
    assert not second.reused and second.directory != first.directory
    assert pq.artefact_spec("tiny-bert", "w4", cfg).weights is None  # presets and hub names: keyed by name


def test_gptq_is_its_own_stored_model_for_every_method(tmp_path):
    plain = load_config(None, ["prequant.quant=[w4]", "prequant.criterion=activation", "prequant.calib_samples=8"])
    gptq = load_config(None, ["prequant.quant=[w4]", "prequant.criterion=activation", "prequant.calib_samples=8",
                              "prequant.gptq=true"])
    for method in ("prequant", "lora"):  # LoRA/BitFit start from the same GPTQ base
        spec = pq.artefact_spec("tiny-bert", "w4", gptq.prequant, method)
        assert spec.gptq and spec.calib == ("wikitext2", 8, 128)
        assert spec.key != pq.artefact_spec("tiny-bert", "w4", plain.prequant, method).key
    # models stored before the gptq and weights fields keep their key (asdict without them)
    old = dataclasses.asdict(pq.artefact_spec("tiny-bert", "w4", plain.prequant))
    del old["gptq"], old["weights"], old["column_blocks"]
    assert pq.artefact_spec("tiny-bert", "w4", plain.prequant).key == \
        hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    results = {name: pq.prequant_quantize("tiny-bert", "w4", c.prequant, tmp_path) for name, c in
               (("nearest", plain), ("gptq", gptq))}
    assert ol.read_manifest(results["gptq"].directory)["gptq"] is True
    a, b = (load_file(f"{r.directory}/{ol.WEIGHTS_FILE}") for r in results.values())
    packed = [k for k in a if k.endswith(".weight.packed")]
    assert packed and any(not torch.equal(a[k], b[k]) for k in packed)  # other rounding, same grid
    assert all(torch.equal(a[k.replace("packed", "step")], b[k.replace("packed", "step")]) for k in packed)


def test_head_modules_that_match_no_linear_are_rejected(tmp_path):
    cfg = load_config(None, ["prequant.quant=[w4]", "prequant.head_modules=['*poolr*']"])
    with pytest.raises(ConfigError, match=re.escape("prequant.head_modules: '*poolr*' matches no Linear")):
        pq.prequant_quantize("tiny-bert", "w4", cfg.prequant, tmp_path)
    assert not any(tmp_path.iterdir())

# ---------------------------------------------------------------- prequant-finetune on Ray Train


def _frozen_tensors_equal(artefact: str, export: str, trainable: set[str]) -> list[str]:
    """Names of tensors shared by the artefact and the export that differ (trainable ones and the
    task's calibrated input ranges aside)."""
    a, b = load_file(f"{artefact}/{ol.WEIGHTS_FILE}"), load_file(f"{export}/{ol.WEIGHTS_FILE}")
    return [k for k in a if k not in trainable and ".act_q." not in k and not torch.equal(a[k], b[k])]


def _prequant_export(tmp_path, task: str):
    """The one model folder the prequant method exported for `task` in tiny_cfg's output_dir."""
    (model_dir,) = [d / "model" for d in (tmp_path / "out" / task / "prequant").iterdir() if d.is_dir()]
    return model_dir


@pytest.mark.ray
@pytest.mark.slow
def test_prequant_finetune_trains_only_outliers_and_two_tasks_share_one_quantization(
        ray_session, mlflow_uri, tmp_path, separable_glue, cache_dir, monkeypatch):
    write_pair_task(separable_glue)
    cfg = tiny_cfg(tmp_path, separable_glue, cache_dir, "tasks=[sst2, rte]")
    with tracking.parent_run(cfg.experiment_name, "test", {}):
        (row,) = pq.run_prequant_task(cfg, "sst2")
        artefact = pq.require_artefact("tiny-bert", "w4", cfg.prequant, pq.artefact_root(cfg.prequant,
                                                                                          cfg.output_dir), "prequant")
        stamp = (artefact / ol.WEIGHTS_FILE).stat().st_mtime_ns
        monkeypatch.setattr(ol, "prequantize", lambda *a, **k: pytest.fail("the second task re-quantized"))
        # the second task also scales the outlier columns' steps: a fine-tuning option, same stored model
        scaled = dataclasses.replace(cfg, prequant=dataclasses.replace(cfg.prequant, scale_outlier_lr=True))
        (row2,) = pq.run_prequant_task(scaled, "rte")
        other = pq.run_prequant_finetune_stage(scaled, "sst2", "w4", "prequant")  # another recipe, same task
    assert (artefact / ol.WEIGHTS_FILE).stat().st_mtime_ns == stamp
    monkeypatch.setattr(pq, "fit_to_dir", lambda *a, **k: pytest.fail("same inputs were fine-tuned again"))
    again = pq.prequant_finetune("sst2", "tiny-bert", "w4", "prequant", cfg.data, cfg.finetune, cfg.prequant,
                                 cfg.evaluate, pq.artefact_root(cfg.prequant, cfg.output_dir),
                                 tmp_path / "out" / "sst2" / "prequant")
    assert round(100 * again.eval.main, 2) == row["value"]
    assert row["method"] == "prequant-w4a16" and 0.0 <= row["value"] <= 100.0 and row2["task"] == "rte"
    # the other recipe's result has its own folder: the first one was not replaced
    model_dir = Path(again.checkpoint)
    assert other.checkpoint != again.checkpoint and Path(other.checkpoint).parent.parent == model_dir.parent.parent
    assert json.loads((Path(other.checkpoint) / "plmq_meta.json").read_text())["scaled_outlier_columns"] > 0

    meta = json.loads((model_dir / "plmq_meta.json").read_text())
    assert again.train_s == meta["train_s"] > 0  # the reused result reports its own training time
    trainable = set(meta["trainable_names"])
    # only outlier columns and the fresh head are trained, and only they have optimizer state
    assert trainable and all(n.endswith(".outlier") or n.startswith("classifier.") for n in trainable)
    assert set(meta["optimizer_state_names"]) == trainable and meta["optimizer_state_bytes"] > 0
    assert abs(meta["trainable_pct"] - 0.5) <= 0.05
    # the worker of the second task applied scale_outlier_lr: some columns took smaller steps
    assert meta["scaled_outlier_columns"] == 0
    rte_meta = json.loads((_prequant_export(tmp_path, "rte") / "plmq_meta.json").read_text())
    assert rte_meta["scaled_outlier_columns"] > 0
    # packed low-bit weights, scales and every frozen FP tensor are bit-identical to prequant-quantize's
    assert _frozen_tensors_equal(str(artefact), str(model_dir), trainable) == []
    a, b = load_file(f"{artefact}/{ol.WEIGHTS_FILE}"), load_file(f"{model_dir}/{ol.WEIGHTS_FILE}")
    assert sum(k.endswith(".weight.packed") for k in a) == len(ol.read_manifest(artefact)["modules"]) > 0
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".outlier"))  # the outliers did train
    # the export is one low-bit model that loads and reproduces what was evaluated
    model, tok, manifest = pq.load_prequant_checkpoint(model_dir)
    assert manifest["bytes"] == (model_dir / ol.WEIGHTS_FILE).stat().st_size
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith(".weight") and "dense" in n)

    runs = mlflow.search_runs([mlflow.get_experiment_by_name("plmq-prequant-test").experiment_id],
                              output_format="list")
    ft_run = next(r for r in runs if r.info.run_name == "prequant-finetune/sst2/prequant-w4")
    assert ft_run.data.metrics["trainable_params"] == meta["trainable_params"]
    assert ft_run.data.metrics["trainable_pct"] == pytest.approx(meta["trainable_pct"])
    assert len(mlflow.MlflowClient().get_metric_history(ft_run.info.run_id, "train_loss")) >= 2
    quantize_runs = [r for r in runs if r.info.run_name.startswith("prequant-quantize/")]
    assert sorted(r.data.metrics["reused"] for r in quantize_runs) == [0.0, 1.0]


ALLOWED = {"lora": lambda n: "lora_" in n, "bitfit": lambda n: n.endswith(".bias"),
           "random": lambda n: n.endswith(".outlier"), "prequant": lambda n: n.endswith(".outlier")}


@pytest.mark.parametrize("method,quant,pooler,pooling", [
    ("lora", "w4", False, "cls"), ("bitfit", "w4", False, "cls"), ("random", "w4", False, "cls"),
    ("prequant", "w3a8", False, "cls"), ("prequant", "w4", True, "cls"), ("lora", "w4", True, "cls"),
    ("prequant", "w4", True, "mean")])
def test_baselines_train_only_their_parameters_and_export_one_low_bit_model(tmp_path, separable_glue, cache_dir,
                                                                             method, quant, pooler, pooling):
    """The worker's pieces (build_model, calibrate_inputs, make_optimizer, export_finetuned) without Ray's
    start-up cost; the Ray path they run in is the same for every method (test above, bench --smoke).
    pooler: prequant.head_modules puts the pooler in the head (FP in the artefact, trained by every method);
    pooling: what the head reads (finetune.pooling), kept by the export."""
    head = ["prequant.head_modules=['*pooler*']"] if pooler else []
    cfg = tiny_cfg(tmp_path, separable_glue, cache_dir, f"prequant.quant=[{quant}]", *head)
    artefact = pq.prequant_quantize("tiny-bert", quant, cfg.prequant, tmp_path / "models", method).directory
    stored = load_file(f"{artefact}/{ol.WEIGHTS_FILE}")
    assert ("bert.pooler.dense.weight" in stored) == pooler  # FP, not packed
    assert ("bert.pooler.dense.weight.packed" in stored) == (not pooler)
    tok = models.load_tokenizer("tiny-bert")
    model = pq.build_model(artefact, 2, method, cfg.prequant, seed=0, pad_token_id=tok.pad_token_id,
                           pooling=pooling)
    loader = make_loader(str(tokenized_split("sst2", "train", tok, cfg.data)), tok, 32, True, 0)
    if "a8" in quant:  # inputs quantized too: ranges from this task's data before training
        pq.calibrate_inputs(model, loader, 2)
        assert all(bool(m.act_q.initialized) for _, m in ol.outlier_modules(model))
    optimizer, _ = make_optimizer(model, dataclasses.replace(cfg.finetune, lr=1e-2), len(loader))
    model.train()
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path / "export"
    worker_cfg = {"prequant": dataclasses.asdict(cfg.prequant), "method": method, "quant": quant,
                  "artefact": artefact, "artefact_key": "test"}
    pq.export_finetuned(worker_cfg, model, tok, str(out), {"steps": len(loader)}, optimizer)

    meta = json.loads((out / "plmq_meta.json").read_text())
    trainable = set(meta["trainable_names"])
    assert any(ALLOWED[method](n) for n in trainable)
    in_head = {n for n in trainable if n.startswith("classifier.") or (pooler and n.startswith("bert.pooler."))}
    assert all(ALLOWED[method](n) or n in in_head for n in trainable)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= trainable if pooler else True
    assert set(meta["optimizer_state_names"]) == trainable
    assert _frozen_tensors_equal(artefact, str(out), trainable) == []
    fresh = dict(pq.build_model(artefact, 2, method, cfg.prequant, seed=0, pad_token_id=tok.pad_token_id,
                                pooling=pooling).named_parameters())
    trained = dict(model.named_parameters())
    assert all(not torch.equal(fresh[n], trained[n]) for n in trainable if ALLOWED[method](n))  # all of them moved
    if method == "lora":
        head_pct = 100 * sum(p.numel() for n, p in trained.items() if n.startswith("bert.pooler.")) / meta["model_params"]
        assert abs(meta["trainable_pct"] - 0.5 - (head_pct if pooler else 0)) <= 0.05  # adapters: the same budget
    loaded, _, _ = pq.load_prequant_checkpoint(out)  # with its adapters
    assert isinstance(loaded.bert.pooler, models.MeanPooler) == (pooling == "mean")
    batch = tok(["a good film", "the awful plot and dull acting"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)
    result = evaluate_model(loaded, tok, "sst2", cfg.data, cfg.evaluate, model_bytes=meta["bytes"])
    assert 0.0 <= result.main <= 1.0 and result.model_bytes == (out / ol.WEIGHTS_FILE).stat().st_size


@pytest.mark.parametrize("method", ["prequant", "lora"])
def test_body_dropout_sets_the_frozen_body_only_and_keys_the_result(tmp_path, separable_glue, cache_dir, method):
    """prequant.body_dropout=0: the body runs without dropout in training, the head keeps BERT's 0.1,
    and the stored result's key changes (a run with the model's own dropout is not reused)."""
    cfg = tiny_cfg(tmp_path, separable_glue, cache_dir, "prequant.body_dropout=0")
    artefact = pq.prequant_quantize("tiny-bert", "w4", cfg.prequant, tmp_path / "models", method).directory
    tok = models.load_tokenizer("tiny-bert")
    batch = tok(["a good film", "the awful plot and dull acting"], padding=True, return_tensors="pt")

    def outputs(pcfg):
        model = pq.build_model(artefact, 2, method, pcfg, seed=0, pad_token_id=tok.pad_token_id).train()
        body = model.bert(**batch).last_hidden_state
        return model, body, model.bert(**batch).last_hidden_state

    model, first, second = outputs(cfg.prequant)
    assert torch.equal(first, second)  # no dropout anywhere in the body
    assert model.dropout.p == model.config.hidden_dropout_prob == 0.1  # the head's own
    _, first, second = outputs(dataclasses.replace(cfg.prequant, body_dropout=None))
    assert not torch.equal(first, second)  # the model's own dropout
    keys = {d: pq.finetune_key("sst2", "a", method, cfg.data, cfg.finetune,
                               dataclasses.replace(cfg.prequant, body_dropout=d)) for d in (None, 0.0, 0.05)}
    assert len(set(keys.values())) == 3
