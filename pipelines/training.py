"""The Ray Train loop shared by the stages that fine-tune a classifier (finetune, prequant-finetune).

The same loop runs on one CPU worker or data-parallel on GPU workers (`TorchTrainer`). It
checkpoints through Ray Train every epoch and resumes from the last checkpoint when a worker
fails; rank 0 writes the final model through the stage's `save` hook.
"""
from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from pipelines import faults
from pipelines.cluster import worker_resources, workers_need
from pipelines.config import FinetuneConfig
from pipelines.data import load_tokenized
from pipelines.io import atomic_dir, load_tensors
from pipelines.tracking import RunLogger

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = 7 * 24 * 3600  # resolve_resources checked that the workers fit: waiting for them is normal


def collate_fn(tokenizer):
    def collate(features: list[dict]) -> dict:
        batch = tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = batch.pop("label")
        return dict(batch)
    return collate


def make_loader(path: str, tokenizer, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    ds = load_tokenized(path)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn(tokenizer),
                      generator=gen)


def _restore(model, optimizer, scheduler) -> int | None:
    """Resume from Ray Train's latest checkpoint if this run has one; returns the step,
    or None when that checkpoint is already the final model (re-reported as is)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        if not (Path(d) / "train_state.pt").exists():  # the final model of an earlier attempt
            _report(-1, float("nan"), None, lambda out: shutil.copytree(d, out, dirs_exist_ok=True))
            return None
        state = load_tensors(Path(d) / "train_state.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank = ray.train.get_context().get_world_rank()
    if rank < len(state.get("rng", [])):  # dropout continues as in an uninterrupted run
        torch.set_rng_state(state["rng"][rank])
    print(f"[finetune] resumed from checkpoint at step {state['step']}")
    return state["step"]


def _report(step: int, loss: float, state: dict | None, model_dir_fn=None) -> None:
    """Rank 0 attaches a checkpoint; every rank must call report."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0 and (state is not None or model_dir_fn):
            if state is not None:
                torch.save(state, Path(tmp) / "train_state.pt")
            if model_dir_fn:
                model_dir_fn(tmp)
            ckpt = Checkpoint.from_directory(tmp)
        ray.train.report({"step": step, "loss": loss}, checkpoint=ckpt)


def rng_states() -> list[torch.Tensor]:
    """Every worker's torch RNG state (dropout), by rank: rank 0 writes them all into the checkpoint."""
    own = torch.get_rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [own]
    states: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, own)
    return states


def _set_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Each epoch's order depends on (seed, epoch) only, so a resume can skip done batches."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    elif getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed + epoch)


def make_optimizer(model: torch.nn.Module, ft: FinetuneConfig, total: int,
                   lr_of: Callable[[str], float | None] = lambda name: None):
    """AdamW over the parameters that require grad (weight decay on matrices only), linear warmup/decay.
    `lr_of(name)` gives a parameter its own lr (None: ft.lr), e.g. a task head's."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen ones get no optimizer state
            lr = lr_of(name.removeprefix("module.")) or ft.lr  # DDP's wrapper prefix
            groups.setdefault((lr, p.ndim >= 2), []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": ft.weight_decay if decay else 0.0}
                                   for (lr, decay), ps in groups.items()], lr=ft.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(ft.warmup_ratio * total), total)
    return optimizer, scheduler


def run_loop(cfg: dict, setup, save) -> None:
    """The training loop, shared with stages that build their own model (prequant-finetune).

    `setup(cfg, ft)` -> (tokenizer, model, loader, optimizer, scheduler, total steps);
    `save(model, tokenizer, directory, meta, optimizer)` writes the final model (rank 0).
    """
    torch.set_num_threads(cfg["cpus_per_worker"])
    ft = FinetuneConfig(**cfg["finetune"])
    rank = ray.train.get_context().get_world_rank()
    tokenizer, model, loader, optimizer, scheduler, total = setup(cfg, ft)
    inner = getattr(model, "module", model)
    step = _restore(inner, optimizer, scheduler)
    if step is None:
        return
    logger = RunLogger(cfg["tracking_uri"], cfg["run_id"] if rank == 0 else None)
    model.train()
    loss_avg, start, start_step = float("nan"), time.time(), step
    while step < total:
        epoch = step // len(loader)
        _set_epoch(loader, ft.seed, epoch)
        for i, batch in enumerate(loader):
            if i < step - epoch * len(loader):
                continue  # batches done before a resume
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            faults.point(f"finetune.rank{rank}", step)
            loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
            if step % ft.log_every == 0 or step == total:
                rate = (step - start_step) / max(time.time() - start, 1e-9)
                if rank == 0:
                    print(f"[{cfg.get('label', 'finetune')} {cfg['task']}] step {step}/{total} "
                          f"loss {loss_avg:.4f} ({rate:.2f} it/s)")
                logger.log({"train_loss": loss_avg, "lr": scheduler.get_last_lr()[0]}, step)
            if step >= total:
                break
        if step < total:  # epoch boundary: a resumable checkpoint
            _report(step, loss_avg, {"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "step": step, "rng": rng_states()})
    train_s = time.time() - start
    meta = {"task": cfg["task"], "base_model": cfg["model"], "num_labels": cfg["num_labels"], "steps": step,
            "train_examples": len(loader.dataset), "config_key": cfg["key"], "resumed_from_step": start_step,
            **memory_stats(optimizer),
            **throughput(inner, step - start_step, ft.batch_size, train_s)}
    _report(step, loss_avg, None, lambda d: save(inner, tokenizer, d, meta, optimizer))


def throughput(model: torch.nn.Module, steps: int, batch_size: int, train_s: float) -> dict:
    """Where the worker trained (its parameters' device, e.g. cuda:0) and how fast: examples per second over
    all workers (batch_size per worker and step), counting the steps of this attempt only."""
    examples = steps * batch_size * ray.train.get_context().get_world_size()
    return {"device": str(next(model.parameters()).device), "train_s": round(train_s, 2),
            "examples_per_s": round(examples / max(train_s, 1e-9), 1)}


def memory_stats(optimizer: torch.optim.Optimizer) -> dict:
    """This worker's optimizer state and peak memory (process RSS; CUDA when on a GPU)."""
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"optimizer_state_bytes": state_bytes,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
            "peak_cuda_mb": None if cuda is None else round(cuda, 1)}


def train_needs(cfg: FinetuneConfig) -> dict[str, float]:
    """What `fit_to_dir`'s workers hold together while they run (a stage's `needs`)."""
    return workers_need(worker_resources(cfg.use_gpu, cfg.cpus_per_worker), cfg.num_workers)


def fit_to_dir(loop, loop_cfg: dict, cfg: FinetuneConfig, output_dir: Path, name: str):
    """Run `loop` on Ray Train workers; its final checkpoint becomes output_dir/model atomically. The DAG starts
    the stage when its workers fit; should other work still hold their resources, Ray Train waits for them for
    START_TIMEOUT_S instead of logging a startup timeout each minute."""
    res = worker_resources(cfg.use_gpu, cfg.cpus_per_worker)
    os.environ.setdefault(START_TIMEOUT_ENV, str(START_TIMEOUT_S))  # Ray Train hands it to its controller
    trainer = TorchTrainer(
        loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.num_cpus}),
        run_config=RunConfig(name=name, storage_path=str(output_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    with atomic_dir(output_dir / "model") as tmp:
        result.checkpoint.to_directory(str(tmp))
    return result
