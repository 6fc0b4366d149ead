"""Stage `pretrain`: a GPT-2-family LM trained from scratch with a quantization recipe.

Quantized weights / activations / gradients (quant/qtrain.py) and quantized AdamW states
(quant/qoptim.py), after Chitsaz et al. 2024. One run trains data-parallel on Ray Train
(`TorchTrainer`, GPU workers when the cluster has them), checkpoints every
`train.checkpoint_every` steps (model, optimizer incl. integer states, step, RNG state,
loss history; the data position is the step) and resumes from the last checkpoint.
The recipe sweep (a grid of recipes as parallel Ray tasks) is in pipelines/pretrain_sweep.py.

The loop (`train`) takes a `Session` that hides where it runs (Ray Train worker or a
plain process), so tests and sweep tasks call it directly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.config import ConfigError, from_dict, gpu_flag
from pipelines.lm_data import LMData, eval_windows, get_batch, prepare_corpus
from quant.qtrain import KINDS, Recipe, convert_qtrain, make_optimizer


# ------------------------------------------------------------------ config


@dataclass
class ModelSection:
    preset: str | None = None        # "tiny-gpt2" (pipelines.models); None = built from the fields below
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    block_size: int = 128            # context length
    dropout: float = 0.0


@dataclass
class DataSection:
    corpus: str = "tinyshakespeare"  # tinyshakespeare | wikitext2 | path to a text file
    vocab_size: int = 4096           # byte-level BPE trained on the training split
    val_fraction: float = 0.1        # the last 10% of the text is the validation split
    eval_windows: int = 64           # validation windows of block_size tokens
    cache_dir: str | None = None     # tokenizer + token ids; default ~/.cache/plmq/lm


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 16             # sequences per worker per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1        # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1             # Ray Train data-parallel workers
    use_gpu: str | bool = "auto"     # auto | true | false (YAML booleans accepted)
    cpus_per_worker: int = 1
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        self.use_gpu = gpu_flag(self.use_gpu)


@dataclass
class QuantSection:
    """`recipe` is a short name (quant/qtrain.py); a per-kind mapping updates (or switches on) that kind."""
    recipe: str = "fp"
    include_head: bool = True        # the paper quantizes lm_head too
    weight: dict[str, Any] | None = None
    act: dict[str, Any] | None = None
    grad_output: dict[str, Any] | None = None
    grad_input: dict[str, Any] | None = None
    grad_weight: dict[str, Any] | None = None
    opt_m: dict[str, Any] | None = None
    opt_v: dict[str, Any] | None = None

    def build(self) -> Recipe:
        try:
            recipe = Recipe.parse(self.recipe)
        except ValueError as err:
            raise ConfigError(f"quant.recipe={self.recipe!r}: {err}") from None
        try:
            return recipe.with_overrides({k: getattr(self, k) for k in KINDS})
        except ValueError as err:
            raise ConfigError(f"quant.{err}") from None


@dataclass
class SweepSection:
    recipes: list[str] = field(default_factory=list)  # recipe names (with ':' overrides); the quant section is not used
    corpora: list[str] = field(default_factory=list)  # empty = [data.corpus]
    seeds: list[int] = field(default_factory=list)    # empty = [train.seed]; several: mean/std over seeds
    max_parallel: int = 2


@dataclass
class PretrainRunConfig:
    output_dir: str = "runs/pretrain"
    experiment: str | None = None    # MLflow experiment; default plmq-pretrain
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    quant: QuantSection = field(default_factory=QuantSection)
    sweep: SweepSection = field(default_factory=SweepSection)

    @property
    def experiment_name(self) -> str:
        return self.experiment or "plmq-pretrain"

    def validate(self) -> None:
        m, d, t = self.model, self.data, self.train
        if m.preset not in (None, "tiny-gpt2"):
            raise ConfigError(f"model.preset={m.preset!r}: use tiny-gpt2 or null")
        if m.preset is None and (m.n_layer < 1 or m.n_embd < 8 or m.n_embd % m.n_head):
            raise ConfigError(f"model: n_layer >= 1 and n_embd divisible by n_head required "
                              f"(n_layer={m.n_layer}, n_embd={m.n_embd}, n_head={m.n_head})")
        if m.block_size < 8 or (m.preset == "tiny-gpt2" and m.block_size > 128):
            raise ConfigError(f"model.block_size={m.block_size}: expected 8..{128 if m.preset else 'n_positions'}")
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"model.dropout={m.dropout}: expected a value in [0, 1)")
        if not 257 <= d.vocab_size <= 2**20:
            raise ConfigError(f"data.vocab_size={d.vocab_size}: expected 257..1048576")
        if not 0 < d.val_fraction < 0.5 or d.eval_windows < 1:
            raise ConfigError("data.val_fraction must be in (0, 0.5) and data.eval_windows >= 1")
        for name in ("steps", "batch_size", "num_workers", "cpus_per_worker", "log_every", "eval_every",
                     "checkpoint_every"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
        if not 0 < t.lr < 1 or t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError(f"train: lr={t.lr} must be in (0, 1), warmup_steps >= 0, min_lr_ratio in [0, 1]")
        if t.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"train.use_gpu={t.use_gpu!r}: use auto, true or false")
        self.quant.build()
        for i, name in enumerate(self.sweep.recipes):
            try:
                Recipe.parse(name)
            except ValueError as err:
                raise ConfigError(f"sweep.recipes[{i}]={name!r}: {err}") from None
        seeds = self.sweep.seeds
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"sweep.seeds={seeds!r}: expected distinct integers, e.g. [0, 1, 2]")
        if self.sweep.max_parallel < 1:
            raise ConfigError(f"sweep.max_parallel={self.sweep.max_parallel}: must be >= 1")


def with_recipe(cfg: PretrainRunConfig, recipe: str, corpus: str | None = None,
                seed: int | None = None) -> PretrainRunConfig:
    """A copy of cfg that trains `recipe` (a complete recipe name) on `corpus` with `seed`."""
    return dataclasses.replace(cfg, quant=QuantSection(recipe=recipe, include_head=cfg.quant.include_head),
                               data=dataclasses.replace(cfg.data, corpus=corpus or cfg.data.corpus),
                               train=dataclasses.replace(cfg.train, seed=cfg.train.seed if seed is None else seed))


# ------------------------------------------------------------------ model, schedule


def build_model(m: ModelSection, vocab_size: int, seed: int) -> torch.nn.Module:
    """A randomly initialised GPT2LMHeadModel (initialisation fixed by `seed`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if m.preset:
        from pipelines.models import load_causal_lm
        model = load_causal_lm(m.preset, vocab_size=vocab_size)
    else:
        conf = GPT2Config(vocab_size=vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                          n_head=m.n_head, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                          bos_token_id=0, eos_token_id=0)  # id 0 is <|endoftext|> in our tokenizer
        model = GPT2LMHeadModel(conf)
    model.config.loss_type = "ForCausalLM"
    return model


def lr_at(step: int, t: TrainSection) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (incl. embeddings), not biases and LayerNorm (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: str = "cpu") -> float:
    """Mean next-token cross-entropy over fixed validation windows (nearest rounding)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


# ------------------------------------------------------------------ sessions


class LocalSession:
    """Runs the loop in this process; checkpoints are files in `ckpt_dir`."""

    rank, world_size = 0, 1

    def __init__(self, ckpt_dir: str | Path, device: str = "cpu", stop_at: int | None = None):
        self.ckpt = Path(ckpt_dir) / "train_state.pt"
        self.device, self.stop_at = device, stop_at

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def restore(self) -> dict | None:
        return torch.load(self.ckpt, map_location=self.device, weights_only=False) if self.ckpt.exists() else None

    def save(self, step: int, metrics: dict, state: dict) -> None:
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)  # a crash mid-write leaves the previous checkpoint intact


class RaySession:
    """A Ray Train worker: DDP model, checkpoints through ray.train.report."""

    def __init__(self):
        import ray.train
        from ray.train.torch import get_device

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device, self.stop_at = str(get_device()), None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from ray.train.torch import prepare_model
        return prepare_model(model)

    def restore(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            path = Path(d) / "train_state.pt"
            return torch.load(path, map_location=self.device, weights_only=False) if path.exists() else None

    def save(self, step: int, metrics: dict, state: dict | None, final_dir_fn=None) -> None:
        """Every rank must call report; rank 0 attaches the checkpoint."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                if state is not None:
                    torch.save(state, Path(tmp) / "train_state.pt")
                if final_dir_fn is not None:
                    final_dir_fn(tmp)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report({"step": step, **metrics}, checkpoint=ckpt)


# ------------------------------------------------------------------ the loop


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class TrainRun:
    """Everything the loop mutates (so helpers stay short)."""
    model: torch.nn.Module
    inner: torch.nn.Module
    optimizer: Any
    step: int = 0
    history: dict = field(default_factory=lambda: {"train": [], "val": []})
    step_times: list = field(default_factory=list)  # wall seconds per step
    step_cpu: list = field(default_factory=list)  # process CPU seconds per step (insensitive to a busy machine)
    diverged: bool = False


def _setup(cfg: PretrainRunConfig, data: LMData, session) -> tuple[TrainRun, Recipe, list[str]]:
    recipe = cfg.quant.build()
    model = build_model(cfg.model, data.vocab_size, cfg.train.seed)
    converted = convert_qtrain(model, recipe, include_head=cfg.quant.include_head)
    wrapped = session.prepare(model)
    t = cfg.train
    opt = make_optimizer(param_groups(model, t.weight_decay), recipe, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    run = TrainRun(wrapped, model, opt)
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        run.step, run.history, run.step_times = state["step"], state["history"], state["step_times"]
        run.step_cpu = state.get("step_cpu", [])
        _set_rng_state(state["rng"])
        if session.rank == 0:
            print(f"[pretrain] resumed from checkpoint at step {run.step}", flush=True)
    else:
        torch.manual_seed(t.seed + 1 + session.rank)  # stochastic rounding / dropout stream
    return run, recipe, converted


def _train_step(run: TrainRun, cfg: PretrainRunConfig, ids, session) -> float:
    t = cfg.train
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, t)
    x, y = get_batch(ids, t.batch_size, cfg.model.block_size, t.seed, run.step, session.rank)
    x, y = x.to(session.device), y.to(session.device)
    start, cpu = time.perf_counter(), time.process_time()
    logits = run.model(input_ids=x).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    run.step_times.append(time.perf_counter() - start)
    run.step_cpu.append(time.process_time() - cpu)
    run.step += 1
    run.history["train"].append((run.step, value))
    return value


def _state(run: TrainRun) -> dict:
    return {"model": run.inner.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
            "history": run.history, "step_times": run.step_times, "step_cpu": run.step_cpu,
            "rng": _rng_state()}


class Progress:
    """Per-step losses to MLflow (buffered: one log_batch per `every` steps) and progress lines;
    only rank 0 logs."""

    def __init__(self, tag: str, total: int, every: int, rank: int, uri: str | None, run_id: str | None):
        from mlflow import MlflowClient

        self.tag, self.total, self.every, self.rank = tag, total, every, rank
        self.client = MlflowClient(uri) if run_id and rank == 0 else None
        self.run_id, self.buffer, self.smooth = run_id, [], float("nan")
        self.tick, self.tick_step = time.time(), 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]

    def step(self, step: int, loss: float, lr: float, step_s: float) -> None:
        self.smooth = loss if math.isnan(self.smooth) else 0.9 * self.smooth + 0.1 * loss
        self.log({"train_loss": loss, "train_loss_smooth": self.smooth, "lr": lr, "step_s": step_s}, step)
        if step % self.every == 0 or step == self.total:
            rate = (step - self.tick_step) / max(time.time() - self.tick, 1e-9)
            if self.rank == 0:
                print(f"[pretrain {self.tag}] step {step}/{self.total} loss {self.smooth:.4f} lr {lr:.2e} "
                      f"({rate:.2f} it/s)", flush=True)
            self.tick, self.tick_step = time.time(), step
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            for i in range(0, len(self.buffer), 900):  # MLflow caps a batch at 1000 metrics
                self.client.log_batch(self.run_id, metrics=self.buffer[i:i + 900])
        self.buffer = []


def train(cfg: PretrainRunConfig, data: LMData, session, tag: str = "", run_id: str | None = None,
          tracking_uri: str | None = None) -> tuple[dict, TrainRun]:
    """Train (or resume) to cfg.train.steps; returns (result dict, the run: .inner is the model).
    Rank 0 logs to MLflow run `run_id`. With `session.stop_at`, returns after that checkpoint."""
    t = cfg.train
    run, recipe, converted = _setup(cfg, data, session)
    ids, windows = data.load("train"), eval_windows(data.load("val"), cfg.model.block_size, cfg.data.eval_windows)
    progress = Progress(tag, t.steps, t.log_every, session.rank, tracking_uri, run_id)
    progress.tick_step = run.step
    run.model.train()
    while run.step < t.steps:
        loss = _train_step(run, cfg, ids, session)
        if not math.isfinite(loss):
            run.diverged = True
            print(f"[pretrain {tag}] step {run.step}: loss is {loss}; stopping (diverged)", flush=True)
            break
        progress.step(run.step, loss, lr_at(run.step - 1, t), run.step_times[-1])
        if run.step % t.eval_every == 0 and run.step < t.steps:
            _log_val(run, windows, t.batch_size, session, progress)
        if run.step % t.checkpoint_every == 0 and run.step < t.steps:
            progress.flush()
            session.save(run.step, {"loss": loss}, _state(run))
            if session.stop_at is not None and run.step >= session.stop_at:
                return {"stopped_at": run.step, "history": run.history}, run
    val = _log_val(run, windows, t.batch_size, session, progress) if not run.diverged else float("nan")
    progress.flush()
    return _result(cfg, data, run, recipe, converted, val), run


def _log_val(run: TrainRun, windows: torch.Tensor, batch_size: int, session, progress: Progress) -> float:
    val = evaluate(run.inner, windows, batch_size, session.device)
    run.history["val"].append((run.step, val))
    progress.log({"val_loss": val, "val_ppl": math.exp(min(val, 50))}, run.step)
    return val


def _result(cfg: PretrainRunConfig, data: LMData, run: TrainRun, recipe: Recipe, converted: list[str],
            val: float) -> dict:
    timed = run.step_times[3:] or run.step_times  # the first steps include one-off allocation
    cpu = run.step_cpu[3:] or run.step_cpu
    diverged = run.diverged or not math.isfinite(val) or val >= math.log(data.vocab_size)
    return {"corpus": cfg.data.corpus, "recipe": str(recipe), "steps": run.step, "val_loss": val,
            "val_ppl": math.exp(min(val, 50)) if math.isfinite(val) else float("nan"), "diverged": diverged,
            "final_train_loss": run.history["train"][-1][1] if run.history["train"] else float("nan"),
            "opt_state_bytes": run.optimizer.state_bytes(), "step_s": sum(timed) / max(len(timed), 1),
            "step_cpu_s": sum(cpu) / max(len(cpu), 1),
            "params": sum(p.numel() for p in run.inner.parameters()), "quantized_layers": len(converted),
            "vocab_size": data.vocab_size, "history": run.history}


# ------------------------------------------------------------------ outputs


def stage_key(cfg: PretrainRunConfig) -> str:
    """Identifies a run by everything that changes its result."""
    train = {k: v for k, v in asdict(cfg.train).items()
             if k not in ("log_every", "eval_every", "checkpoint_every", "use_gpu", "cpus_per_worker")}
    ident = {"model": asdict(cfg.model), "data": {k: v for k, v in asdict(cfg.data).items() if k != "cache_dir"},
             "train": train, "recipe": str(cfg.quant.build()), "include_head": cfg.quant.include_head}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def run_dir(cfg: PretrainRunConfig) -> Path:
    slug = "".join(c if c.isalnum() or c == "." else "_" for c in str(cfg.quant.build()))
    return Path(cfg.output_dir).resolve() / Path(cfg.data.corpus).stem / f"{slug}-{stage_key(cfg)}"


def save_final(model: torch.nn.Module, data: LMData, result: dict, cfg: PretrainRunConfig, path: str | Path) -> None:
    """HF folder (FP master weights: GPT2LMHeadModel.from_pretrained loads it), tokenizer,
    the recipe to re-apply, and result.json."""
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    for f in Path(data.tokenizer_dir).iterdir():
        shutil.copy(f, path / f.name)
    meta = {"recipe": result["recipe"], "include_head": cfg.quant.include_head, "config_key": stage_key(cfg),
            "config": asdict(cfg)}
    (path / "plmq_meta.json").write_text(json.dumps(meta, indent=2))
    (path / "result.json").write_text(json.dumps(result, indent=1))


def _finished(model_dir: Path, key: str) -> dict | None:
    meta, res = model_dir / "plmq_meta.json", model_dir / "result.json"
    if meta.exists() and res.exists() and json.loads(meta.read_text()).get("config_key") == key:
        return json.loads(res.read_text())
    return None


def _install(src: Path, final: Path) -> None:
    """Move a finished model folder into place atomically (a reader sees old or new)."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / "train_state.pt").unlink(missing_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _prepare(cfg: PretrainRunConfig, corpus: str | None = None) -> LMData:
    d = cfg.data
    return prepare_corpus(corpus or d.corpus, d.vocab_size, d.val_fraction, d.cache_dir)


# ------------------------------------------------------------------ one run on Ray Train


def _ray_loop(loop_cfg: dict) -> None:
    """Runs on each Ray Train worker; `loop_cfg` is plain data."""
    torch.set_num_threads(loop_cfg["threads"])
    cfg = from_dict(PretrainRunConfig, loop_cfg["config"])
    data = LMData(**loop_cfg["data"])
    session = RaySession()
    result, run = train(cfg, data, session, loop_cfg["tag"], loop_cfg["run_id"], loop_cfg["tracking_uri"])
    metrics = {k: result[k] for k in ("val_loss", "diverged", "opt_state_bytes", "step_s")}
    # The final report carries the train state too, so a restarted attempt finds step == steps.
    session.save(result["steps"], metrics, _state(run), lambda d: save_final(run.inner, data, result, cfg, d))


def pretrain(cfg: PretrainRunConfig, run_id: str | None = None, tracking_uri: str | None = None) -> dict:
    """Train cfg's recipe with Ray Train; the model and result.json go to run_dir(cfg)/model."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster import ensure_ray, worker_resources

    cfg.validate()
    out, key, tag = run_dir(cfg), stage_key(cfg), f"{Path(cfg.data.corpus).stem} {cfg.quant.build()}"
    done = _finished(out / "model", key)
    if done:
        print(f"[pretrain {tag}] {out / 'model'} is up to date (key {key}); skipping", flush=True)
        return {**done, "checkpoint": str(out / "model"), "wall_s": 0.0}
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    start = time.time()
    data = _prepare(cfg)
    ensure_ray()
    t = cfg.train
    res = worker_resources(t.use_gpu, t.cpus_per_worker)
    loop_cfg = {"config": asdict(cfg), "data": asdict(data), "threads": t.cpus_per_worker, "tag": tag,
                "run_id": run_id, "tracking_uri": tracking_uri}
    trainer = TorchTrainer(
        _ray_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.num_cpus}),
        run_config=RunConfig(name=f"pretrain-{key}", storage_path=str(out / "ray_train"),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    fit = trainer.fit()
    with fit.checkpoint.as_directory() as d:
        _install(Path(d), out / "model")
    result = json.loads((out / "model" / "result.json").read_text())
    return {**result, "checkpoint": str(out / "model"), "wall_s": time.time() - start}


# ------------------------------------------------------------------ CLI entry points


def run_pretrain_stage(cfg: PretrainRunConfig) -> dict:
    """`plmq pretrain`: one MLflow parent run with the stage run nested under it."""
    import mlflow

    from pipelines import tracking

    recipe = str(cfg.quant.build())
    with tracking.parent_run(cfg.experiment_name, f"pretrain-{recipe}", asdict(cfg)):
        tags = {"plmq.stage": "pretrain", "plmq.recipe": recipe, "plmq.corpus": cfg.data.corpus}
        with tracking.stage_run(f"pretrain/{Path(cfg.data.corpus).stem}/{recipe}", {"recipe": recipe}, tags) as run_id:
            result = pretrain(cfg, run_id=run_id, tracking_uri=tracking.tracking_uri())
            mlflow.log_metrics({k: float(result[k]) for k in ("val_loss", "opt_state_bytes", "step_s", "wall_s")
                                if math.isfinite(float(result[k]))})
            mlflow.log_dict({k: v for k, v in result.items() if k != "history"}, "pretrain_result.json")
    return result
