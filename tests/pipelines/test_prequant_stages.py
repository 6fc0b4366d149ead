"""PreQuant stages: prequant-quantize (once, task-agnostic) and prequant-finetune (per task, Ray Train)."""
from __future__ import annotations

import dataclasses
import json
import random
import re

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from pipelines import checkpoints, models, prequant_model
from pipelines.config import ConfigError, load_config
from pipelines.data import tokenized_split
from pipelines.evaluation import evaluate_model
from pipelines.stages import prequant_finetune as pft
from pipelines.stages import prequant_quantize as pqz
from pipelines.stages.base import Context, Stage
from pipelines.training import make_loader, make_optimizer
from quant import prequant


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


def quantize(cfg, root, key="k1", method="prequant", quant="w4", checkpoint=None):
    """Run the prequant-quantize stage of `method`'s stored model directly."""
    stage = Stage(pqz.stage_name(cfg, quant, method), pqz.KIND, quant=quant, method=method, checkpoint=checkpoint)
    return pqz.run(cfg, stage, {}, Context(root=root, key=key))


def weights(result) -> dict:
    return load_file(f"{result.checkpoint}/{prequant.WEIGHTS_FILE}")

# ---------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize("overrides,message", [
    (["prequant.budget_pct=0"], "prequant.budget_pct=0.0: must be in (0, 100)"),
    (["prequant.budget_pct=100"], "prequant.budget_pct=100.0: must be in (0, 100)"),
    (["prequant.quant=[w16a8]"], "prequant.quant[0]='w16a8': PreQuant needs quantized weights"),
    (["prequant.quant=[w4-e8]"], "drop the -e/-o part"),
    (["prequant.quant=[w4x]"], "prequant.quant[0]='w4x'"),
    (["prequant.methods=[qat]"], "prequant.methods: 'qat'"),
    (["prequant.criterion=gradient"], "prequant.criterion='gradient'"),
    (["prequant.quantizer=gptq"], "prequant.quantizer='gptq'"),
    (["prequant.gptq=maybe"], "prequant.gptq: expected bool, got str 'maybe'"),
    (["prequant.gptq=true", "prequant.quant=[w4,w2]"], "prequant.quant[1]='w2': GPTQ rounds onto uniform grids"),
    (["prequant.head_modules=['']"], "prequant.head_modules=['']: expected module-name patterns"),
    (["prequant.scale_outlier_lr=true"], "unknown config key 'prequant.scale_outlier_lr'"),
])
def test_bad_prequant_config_is_rejected_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_finetune_from_a_checkpoint_that_is_no_stored_model_fails_at_plan(tmp_path):
    cfg = load_config(None, ["model=tiny-bert", "prequant.quant=[w4]"])
    fp = tmp_path / "fp"
    checkpoints.save(models.load_classifier("tiny-bert", 2), models.load_tokenizer("tiny-bert"), fp, {}, "fp")
    with pytest.raises(ConfigError, match="starts from a pre-quantized model .* not a fp checkpoint"):
        pft.plan(cfg, str(fp))
    with pytest.raises(FileNotFoundError, match="is not a plmq checkpoint"):
        pft.plan(cfg, str(tmp_path / "nothing"))


def test_head_modules_that_match_no_linear_fail_before_calibration(tmp_path, monkeypatch):
    cfg = load_config(None, ["model=tiny-bert", "prequant.quant=[w4]", "prequant.head_modules=['*poolr*']",
                             "prequant.criterion=activation"])
    monkeypatch.setattr(prequant_model, "input_statistics", lambda *a: pytest.fail("calibrated first"))
    with pytest.raises(ConfigError, match=re.escape("prequant.head_modules: '*poolr*' matches no Linear")):
        quantize(cfg, tmp_path)
    assert not any(tmp_path.iterdir())

# ---------------------------------------------------------------- plan and fragments


def test_plan_shares_stored_models_and_fragments_hold_what_changes_them(tmp_path):
    cfg = load_config(None, ["tasks=[sst2,rte]", "prequant.quant=[w4,w3a8]",
                             "prequant.methods=[fp,prequant,random,lora,bitfit]"])
    quantize_stages, finetune_stages = pqz.plan(cfg), pft.plan(cfg)
    assert [s.name for s in quantize_stages if s.quant == "w4"] == [
        "prequant-quantize/w4a16/weight", "prequant-quantize/w4a16/random", "prequant-quantize/w4a16/plain"]
    assert len(quantize_stages) == 6 and len(finetune_stages) == 2 * 2 * 4  # lora and bitfit share a plain model
    by_name = {s.name: s for s in finetune_stages}
    assert by_name["prequant/rte/bitfit-w3a8"].deps == ("prequant-quantize/w3a8/plain",)
    assert by_name["prequant/sst2/random-w4a16"].deps == ("prequant-quantize/w4a16/random",)
    stage = {s.name: s for s in quantize_stages}
    weight, plain = stage["prequant-quantize/w4a16/weight"], stage["prequant-quantize/w4a16/plain"]

    def frag(overrides, st):
        return pqz.fragment(load_config(None, ["prequant.quant=[w4,w3a8]", *overrides]), st)

    base = frag([], weight)
    assert base["quant"] == "w4a16" and base["criterion"] == "weight" and base["calib"] is None
    assert frag(["prequant.lr=1e-3", "finetune.epochs=9", "prequant.lora_scaling=4"], weight) == base
    for change in ("prequant.budget_pct=1", "prequant.train_norms=true", "prequant.quantizer=mse",
                   "prequant.seed=1", "prequant.gptq=true", "prequant.head_modules=['*pooler*']"):
        assert frag([change], weight) != base, change
    assert frag(["prequant.budget_pct=1", "prequant.train_norms=true"], plain) == frag([], plain)  # no columns
    assert frag(["prequant.criterion=activation"], weight)["calib"] == {
        "corpus": "wikitext2", "samples": 256, "max_length": 128}
    ft = pft.fragment(cfg, by_name["prequant/sst2/random-w4a16"])
    assert ft["prequant"]["lr"] == cfg.prequant.lr and "lr" not in ft["finetune"] and "log_every" not in ft["finetune"]
    other = dataclasses.replace(cfg, prequant=dataclasses.replace(cfg.prequant, lr=1e-3))
    assert pft.fragment(other, by_name["prequant/sst2/random-w4a16"]) != ft


def test_new_weights_in_a_local_model_folder_change_the_fragment(tmp_path):
    """A pre-trained model given as a folder is keyed by its weights, not only its path."""
    cfg = load_config(None, ["prequant.quant=[w4]"])
    tok, folder = models.load_tokenizer("tiny-bert"), tmp_path / "pretrained"
    (stage,) = pqz.plan(cfg, str(folder))
    checkpoints.save(models.load_classifier("tiny-bert", 2, seed=1), tok, folder, {}, "fp")
    first = pqz.fragment(cfg, stage)["model"]
    checkpoints.save(models.load_classifier("tiny-bert", 2, seed=2), tok, folder, {}, "fp")
    assert pqz.fragment(cfg, stage)["model"]["weights"] != first["weights"] and first["name"] == str(folder)
    assert pqz.fragment(cfg, pqz.plan(cfg)[0])["model"]["weights"] is None  # presets and hub names: keyed by name

# ---------------------------------------------------------------- prequant-quantize


@pytest.mark.parametrize("train_norms", [False, True])
def test_quantize_hits_the_budget_and_is_stored_once_per_key(tmp_path, monkeypatch, train_norms):
    cfg = load_config(None, ["model=tiny-bert", "prequant.quant=[w4]", "prequant.budget_pct=0.5",
                             f"prequant.train_norms={train_norms}"])
    first = quantize(cfg, tmp_path)
    assert first.metrics["reused"] == 0.0 and abs(first.metrics["budget_pct_used"] - 0.5) <= 0.05
    assert first.checkpoint == str(tmp_path / "prequant" / "k1") and first.outputs == "prequant/k1"
    meta = checkpoints.read_meta(first.checkpoint)
    assert (meta["format"], meta["criterion"], meta["quant"], meta["task_agnostic"]) == (
        "prequant", "weight", "w4a16", True)
    assert (meta["reserved_params"] > 0) == train_norms
    tensors = weights(first)
    assert not any(k.startswith("classifier.") for k in tensors)  # task-agnostic: no head stored
    assert any(k.endswith(".weight.packed") for k in tensors) and any(k.endswith(".outlier_idx") for k in tensors)
    assert sum(tensors[k].numel() for k in tensors if k.endswith(".outlier")) == meta["outlier_params"]
    loaded = checkpoints.load(first.checkpoint)  # loads with a fresh head
    assert any(isinstance(m, prequant.OutlierLinear) for m in loaded.model.modules())

    monkeypatch.setattr(pqz, "quantize_pretrained", lambda *a, **k: pytest.fail("quantized a second time"))
    again = quantize(cfg, tmp_path)
    assert again.metrics["reused"] == 1.0 and again.checkpoint == first.checkpoint
    with pytest.raises(pytest.fail.Exception, match="quantized a second time"):
        quantize(cfg, tmp_path, key="k2")  # another key: another stored model


def test_force_and_a_shared_prequant_dir(tmp_path, monkeypatch):
    cfg = load_config(None, ["model=tiny-bert", "prequant.quant=[w4]", f"prequant.dir={tmp_path / 'shared'}"])
    first = quantize(cfg, tmp_path / "run1")
    assert first.checkpoint == str(tmp_path / "shared" / "k1") and first.outputs is None  # outside the run
    assert quantize(cfg, tmp_path / "run2").metrics["reused"] == 1.0  # another run, same stage key
    stamp = (tmp_path / "shared" / "k1" / prequant.WEIGHTS_FILE).stat().st_mtime_ns
    stage = pqz.plan(cfg)[0]
    forced = pqz.run(cfg, stage, {}, Context(root=tmp_path / "run2", key="k1", force=True))
    assert forced.metrics["reused"] == 0.0
    assert (tmp_path / "shared" / "k1" / prequant.WEIGHTS_FILE).stat().st_mtime_ns != stamp


def test_gptq_rounds_differently_on_the_same_grid(tmp_path):
    base = ["model=tiny-bert", "prequant.quant=[w4]", "prequant.criterion=activation", "prequant.calib_samples=8"]
    plain = load_config(None, base)
    gptq = load_config(None, [*base, "prequant.gptq=true"])
    for method in ("prequant", "lora"):  # LoRA/BitFit start from the same GPTQ base
        stage = Stage(pqz.stage_name(gptq, "w4", method), pqz.KIND, quant="w4", method=method)
        frag = pqz.fragment(gptq, stage)
        assert frag["gptq"] and frag["calib"]["samples"] == 8 and frag != pqz.fragment(plain, stage)
    results = {name: quantize(c, tmp_path, key=name) for name, c in (("nearest", plain), ("gptq", gptq))}
    assert checkpoints.read_meta(results["gptq"].checkpoint)["gptq"] is True
    a, b = weights(results["nearest"]), weights(results["gptq"])
    packed = [k for k in a if k.endswith(".weight.packed")]
    assert packed and any(not torch.equal(a[k], b[k]) for k in packed)  # other rounding, same grid
    assert all(torch.equal(a[k.replace("packed", "step")], b[k.replace("packed", "step")]) for k in packed)

# ---------------------------------------------------------------- prequant-finetune


def _frozen_tensors_differ(artefact: str, export: str, trainable: set[str]) -> list[str]:
    """Names of tensors shared by the stored model and the export that differ (trainable ones and the
    task's calibrated input ranges aside)."""
    a, b = load_file(f"{artefact}/{prequant.WEIGHTS_FILE}"), load_file(f"{export}/{prequant.WEIGHTS_FILE}")
    return [k for k in a if k not in trainable and ".act_q." not in k and not torch.equal(a[k], b[k])]


@pytest.mark.ray
@pytest.mark.slow
def test_prequant_finetune_trains_only_outliers_and_tasks_share_one_quantization(
        ray_session, mlflow_uri, tmp_path, separable_glue, cache_dir, monkeypatch):
    write_pair_task(separable_glue)
    cfg = tiny_cfg(tmp_path, separable_glue, cache_dir, "tasks=[sst2, rte]")
    quantized = quantize(cfg, tmp_path, key="q")
    upstream = {pqz.stage_name(cfg, "w4", "prequant"): dataclasses.asdict(quantized)}
    stages = {s.task: s for s in pft.plan(cfg)}
    assert stages["sst2"].deps == tuple(upstream)
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("t").experiment_id).info.run_id
    sst2 = pft.run(cfg, stages["sst2"], upstream, Context(root=tmp_path, key="f1", run_id=run_id,
                                                          tracking_uri=mlflow_uri))
    rte = pft.run(cfg, stages["rte"], upstream, Context(root=tmp_path, key="f2"))
    assert sst2.row["method"] == "prequant-w4a16" and rte.row["task"] == "rte" and 0 <= sst2.row["value"] <= 100
    assert sst2.checkpoint == str(tmp_path / "sst2" / "prequant" / "f1" / "model")
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "train_loss")) >= 2  # the worker logs to ctx.run_id

    monkeypatch.setattr(pft, "fit_to_dir", lambda *a, **k: pytest.fail("same key fine-tuned again"))
    again = pft.run(cfg, stages["sst2"], upstream, Context(root=tmp_path, key="f1"))
    assert again.row["value"] == sst2.row["value"] and again.metrics["train_s"] == sst2.metrics["train_s"] > 0
    meta = checkpoints.read_meta(sst2.checkpoint)
    trainable = set(meta["trainable_names"])
    # only outlier columns and the fresh head are trained, and only they have optimizer state
    assert trainable and all(n.endswith(".outlier") or n.startswith("classifier.") for n in trainable)
    assert set(meta["optimizer_state_names"]) == trainable and meta["optimizer_state_bytes"] > 0
    assert abs(meta["trainable_pct"] - 0.5) <= 0.05 and sst2.metrics["trainable_pct"] == meta["trainable_pct"]
    # packed low-bit weights, scales and every frozen FP tensor are bit-identical to prequant-quantize's
    assert _frozen_tensors_differ(quantized.checkpoint, sst2.checkpoint, trainable) == []
    a, b = weights(quantized), weights(sst2)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".outlier"))  # the outliers did train
    loaded = checkpoints.load(sst2.checkpoint)  # the export is one low-bit model that reproduces what was evaluated
    result = evaluate_model(loaded.model, loaded.tokenizer, "sst2", cfg.data, cfg.evaluate, loaded.nbytes)
    assert round(100 * result.main, 2) == sst2.row["value"] and sst2.metrics["packed_bytes"] == loaded.nbytes


ALLOWED = {"lora": lambda n: "lora_" in n, "bitfit": lambda n: n.endswith(".bias"),
           "random": lambda n: n.endswith(".outlier"), "prequant": lambda n: n.endswith(".outlier")}


@pytest.mark.parametrize("method,quant,pooler,pooling", [
    ("lora", "w4", False, "cls"), ("bitfit", "w4", False, "cls"), ("random", "w4", False, "cls"),
    ("prequant", "w3a8", False, "cls"), ("prequant", "w4", True, "cls"), ("lora", "w4", True, "cls"),
    ("prequant", "w4", True, "mean")])
def test_methods_train_only_their_parameters_and_export_one_low_bit_model(tmp_path, separable_glue, cache_dir,
                                                                          method, quant, pooler, pooling):
    """The worker's pieces (build_model, calibrate_inputs, make_optimizer, export) without Ray's start-up
    cost; the Ray path they run in is the same for every method (test above).
    pooler: prequant.head_modules puts the pooler in the head (FP in the stored model, trained by every
    method); pooling: what the head reads (finetune.pooling), kept by the export."""
    head = ["prequant.head_modules=['*pooler*']"] if pooler else []
    cfg = tiny_cfg(tmp_path, separable_glue, cache_dir, f"prequant.quant=[{quant}]", *head)
    artefact = quantize(cfg, tmp_path / "models", method=method, quant=quant).checkpoint
    stored = load_file(f"{artefact}/{prequant.WEIGHTS_FILE}")
    assert ("bert.pooler.dense.weight" in stored) == pooler  # FP, not packed
    assert ("bert.pooler.dense.weight.packed" in stored) == (not pooler)
    tok = models.load_tokenizer("tiny-bert")
    model = prequant_model.build_model(artefact, 2, method, cfg.prequant, seed=0, pad_token_id=tok.pad_token_id,
                                       pooling=pooling)
    loader = make_loader(str(tokenized_split("sst2", "train", tok, cfg.data)), tok, 32, True, 0)
    if "a8" in quant:  # inputs quantized too: ranges from this task's data before training
        prequant_model.calibrate_inputs(model, loader, 2)
        assert all(bool(m.act_q.initialized) for _, m in prequant.outlier_modules(model))
    optimizer, _ = make_optimizer(model, dataclasses.replace(cfg.finetune, lr=1e-2), len(loader))
    model.train()
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path / "export"
    worker_cfg = {"prequant": dataclasses.asdict(cfg.prequant), "method": method, "quant": quant, "artefact": artefact}
    prequant_model.export(worker_cfg, model, tok, str(out), {"steps": len(loader)}, optimizer)

    meta = json.loads((out / checkpoints.META_FILE).read_text())
    trainable = set(meta["trainable_names"])
    assert meta["format"] == "prequant" and any(ALLOWED[method](n) for n in trainable)
    in_head = {n for n in trainable if n.startswith("classifier.") or (pooler and n.startswith("bert.pooler."))}
    assert all(ALLOWED[method](n) or n in in_head for n in trainable)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= trainable if pooler else True
    assert set(meta["optimizer_state_names"]) == trainable
    assert _frozen_tensors_differ(artefact, str(out), trainable) == []
    fresh = dict(prequant_model.build_model(artefact, 2, method, cfg.prequant, seed=0, pad_token_id=tok.pad_token_id,
                                            pooling=pooling).named_parameters())
    trained = dict(model.named_parameters())
    assert all(not torch.equal(fresh[n], trained[n]) for n in trainable if ALLOWED[method](n))  # all of them moved
    if method == "lora":
        pooler_params = sum(p.numel() for n, p in trained.items() if n.startswith("bert.pooler."))
        head_pct = 100 * pooler_params / meta["model_params"]
        assert abs(meta["trainable_pct"] - 0.5 - (head_pct if pooler else 0)) <= 0.05  # adapters: the same budget
    loaded = checkpoints.load(out)  # with its adapters
    assert isinstance(loaded.model.bert.pooler, models.MeanPooler) == (pooling == "mean")
    batch = tok(["a good film", "the awful plot and dull acting"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, model.eval()(**batch).logits)
    result = evaluate_model(loaded.model, loaded.tokenizer, "sst2", cfg.data, cfg.evaluate, loaded.nbytes)
    assert 0.0 <= result.main <= 1.0 and result.model_bytes == (out / prequant.WEIGHTS_FILE).stat().st_size
