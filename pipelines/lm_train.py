"""The quantized pre-training loop: a GPT-2 or Llama LM trained from scratch under a recipe.

Quantized weights / activations / gradients (quant/qtrain.py) and quantized AdamW states
(quant/qoptim.py), after Chitsaz et al. 2024. The loop (`train`) takes a session that hides where
it runs: `RaySession` (a Ray Train worker: DDP, checkpoints through `ray.train.report`) or
`LocalSession` (this process, checkpoints in a folder). It checkpoints every
`train.checkpoint_every` steps (model, optimizer incl. integer states, step, RNG state, loss
history; the data position is the step) and resumes from the last checkpoint exactly. A train
state is plain tensors, numbers, lists and dicts, read with `io.load_tensors` (never unpickled).
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.nn.functional as F
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipelines import checkpoints, faults
from pipelines.io import atomic_dir, load_tensors, write_json_atomic
from pipelines.lm_data import LMData, check_windows, eval_windows, get_batch, hf_tokenizer, prepare_corpus
from pipelines.models import load_causal_lm
from pipelines.pretrain_config import ModelSection, PretrainRunConfig, TrainSection
from pipelines.tracking import RunLogger
from quant.qtrain import Recipe, convert_qtrain, make_optimizer

STATE_FILE = "train_state.pt"


# ------------------------------------------------------------------ model, schedule, data


def _gpt2(m: ModelSection, vocab_size: int) -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        n_inner=m.intermediate_size, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        bos_token_id=0, eos_token_id=0))  # id 0 is <|endoftext|> in our tokenizer


def _llama(m: ModelSection, vocab_size: int) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.n_embd, intermediate_size=m.ffn_size, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head or m.n_head,
        max_position_embeddings=m.block_size, tie_word_embeddings=m.tie_embeddings, attention_dropout=m.dropout,
        bos_token_id=0, eos_token_id=0))


BUILDERS = {"gpt2": _gpt2, "llama": _llama}  # model.arch -> a randomly initialised causal LM


def build_model(m: ModelSection, vocab_size: int, seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM of `m.arch` (or `m.preset`), initialisation fixed by `seed`."""
    torch.manual_seed(seed)
    model = load_causal_lm(m.preset, vocab_size=vocab_size) if m.preset else BUILDERS[m.arch](m, vocab_size)
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


def prepare(cfg: PretrainRunConfig) -> LMData:
    """cfg's corpus split and tokenized (cached); a DataError when a split is shorter than one window."""
    d = cfg.data
    data = prepare_corpus(d.corpus, d.vocab_size, d.val_fraction, d.cache_dir, d.eval_corpus)
    check_windows(data, cfg.model.block_size)  # before the workers start: their batches need a full window
    return data


def save_model(model: torch.nn.Module, data: LMData, result: dict, cfg: PretrainRunConfig, path: str | Path) -> None:
    """An FP checkpoint (the master weights: `checkpoints.load` reads it as the architecture's *ForCausalLM /
    *LMHeadModel) with its tokenizer, the recipe to re-apply in plmq_meta.json, and result.json, into `path`
    (a Ray Train checkpoint folder, which becomes the stage's model folder atomically)."""
    meta = {"recipe": result["recipe"], "include_head": cfg.quant.include_head, "corpus": cfg.data.corpus,
            "eval_corpus": cfg.data.eval_corpus, "config": asdict(cfg)}
    checkpoints.write(model, hf_tokenizer(data.tokenizer_dir), path, meta, fmt="fp")
    write_json_atomic(Path(path) / "result.json", result)


# ------------------------------------------------------------------ sessions


class LocalSession:
    """Runs the loop in this process; checkpoints are files in `ckpt_dir`."""

    rank, world_size = 0, 1

    def __init__(self, ckpt_dir: str | Path, device: str = "cpu", stop_at: int | None = None):
        self.dir, self.device, self.stop_at = Path(ckpt_dir), device, stop_at

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def restore(self) -> dict | None:
        path = self.dir / STATE_FILE
        return load_tensors(path, self.device) if path.exists() else None

    def save(self, step: int, metrics: dict, state: dict) -> None:
        with atomic_dir(self.dir) as tmp:  # a crash mid-write leaves the previous checkpoint intact
            torch.save(state, tmp / STATE_FILE)


class RaySession:
    """A Ray Train worker: DDP model, checkpoints through ray.train.report."""

    stop_at = None

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = str(get_device())

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(model)

    def restore(self) -> dict | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            path = Path(d) / STATE_FILE
            return load_tensors(path, self.device) if path.exists() else None

    def final_reported(self) -> bool:
        """When the run's last checkpoint is its final model (an earlier attempt finished), report it again."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            if not (Path(d) / "result.json").exists():
                return False
            self.save(-1, {}, None, lambda out: shutil.copytree(d, out, dirs_exist_ok=True))
        return True

    def save(self, step: int, metrics: dict, state: dict | None, final_dir_fn=None) -> None:
        """Every rank must call report; rank 0 attaches the checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                if state is not None:
                    torch.save(state, Path(tmp) / STATE_FILE)
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

    def state(self) -> dict:
        """What a checkpoint holds: tensors, numbers, lists and dicts only."""
        return {"model": self.inner.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "history": self.history, "step_times": self.step_times, "step_cpu": self.step_cpu,
                "rng": _rng_state()}

    def load(self, state: dict) -> None:
        self.inner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        self.step_times, self.step_cpu = state["step_times"], state["step_cpu"]
        _set_rng_state(state["rng"])


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
        run.load(state)
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


class Progress:
    """Per-step losses to the stage's MLflow run (buffered: one batch per `every` steps) and progress
    lines; only rank 0 logs."""

    def __init__(self, tag: str, total: int, every: int, rank: int, uri: str | None, run_id: str | None):
        self.tag, self.total, self.every, self.rank = tag, total, every, rank
        self.logger = RunLogger(uri, run_id if rank == 0 else None, buffer_steps=every)
        self.smooth, self.tick, self.tick_step = float("nan"), time.time(), 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log(metrics, step)

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
        self.logger.flush()


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
            session.save(run.step, {"loss": loss}, run.state())
            if session.stop_at is not None and run.step >= session.stop_at:
                return {"stopped_at": run.step, "history": run.history}, run
        faults.point(f"pretrain.rank{session.rank}", run.step)
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
    return {"corpus": cfg.data.corpus, "eval_corpus": cfg.data.eval_corpus, "recipe": str(recipe),
            "seed": cfg.train.seed, "steps": run.step,
            "val_loss": val, "val_ppl": math.exp(min(val, 50)) if math.isfinite(val) else float("nan"),
            "diverged": diverged,
            "final_train_loss": run.history["train"][-1][1] if run.history["train"] else float("nan"),
            "opt_state_bytes": run.optimizer.state_bytes(), "step_s": sum(timed) / max(len(timed), 1),
            "step_cpu_s": sum(cpu) / max(len(cpu), 1),
            "params": sum(p.numel() for p in run.inner.parameters()), "quantized_layers": len(converted),
            "device": str(next(run.inner.parameters()).device),
            "vocab_size": data.vocab_size, "history": run.history}
