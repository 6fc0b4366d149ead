"""`ModuleTrainer`: owns one MREM module partition and trains its quantized student.

A plain class (tests use it directly); `pipelines.mrem` makes it a Ray actor
with explicit resources. It holds an FP teacher copy and a quantized student of
its module, reads the teacher's input activations zero-copy from object-store
shards, and minimises the reconstruction error of every layer output of the
module (plus the logits in the last module) with Adam over weights and LSQ
step sizes. Inputs to the student come from the teacher (first module), from
the predecessor's pushes mixed by annealed teacher forcing (parallel MREM), or
from the predecessor's full outputs (sequential MREM).
"""
from __future__ import annotations

import collections
import math
import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import models
from pipelines.partition import PartSpec, masked_mse, part_forward, prune_to_part
from quant import QuantConfig, calibrate, quantize_model


@dataclass
class TrainerSettings:
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-5               # weights
    lr_quant: float = 1e-3         # quantizer step sizes
    teacher_forcing_steps: int = 250  # T0 of lambda_t = max(1 - t/T0, 0)
    checkpoint_every: int = 100
    queue_size: int = 8
    wait_s: float = 60.0           # MREM-P: longest wait for the predecessor's next outputs
    log_every: int = 25
    calib_batches: int = 8         # batches to initialise activation ranges
    eval_samples: int = 256
    seed: int = 0
    num_threads: int = 1
    student_dropout: bool = False  # off: the student matches the teacher's (eval-mode) outputs


def learnable(qcfg: QuantConfig) -> QuantConfig:
    """LSQ: the uniform weight/activation step sizes are trained with the weights."""
    out = QuantConfig.from_dict(qcfg.to_dict())
    for role in ("weight", "act", "embedding", "output"):
        spec = getattr(out, role)
        # per-token/per-group activation steps are recomputed on every call: nothing to learn
        dynamic = role in ("act", "output") and spec is not None and spec.granularity in ("token", "group")
        if spec is not None and spec.scheme == "uniform" and not dynamic:
            spec.learnable = True
    return out


class ShardReader:
    """Random access to rows of object-store shards (numpy, zero-copy)."""

    def __init__(self, refs: list, shard_size: int):
        import ray

        self.shards = ray.get(list(refs)) if refs else []
        self.shard_size = shard_size

    def rows(self, idx: np.ndarray, key: str) -> np.ndarray:
        return np.stack([self.shards[i // self.shard_size][key][i % self.shard_size] for i in idx])


class PredecessorQueue:
    """The outputs module k-1 pushes in MREM-P, taken in order by module k.

    While the predecessor trains, take() waits (at most wait_s) for its next push instead of
    re-using an old one: a successor that ran ahead would repeat stale batches and finish
    before it saw the predecessor's last, best-trained outputs. Once the predecessor has
    finished (or on a timeout, e.g. while it restarts) take() returns one of the recent items.
    """

    def __init__(self, maxlen: int, wait_s: float, seed: int = 0):
        self.items: collections.deque = collections.deque(maxlen=maxlen)
        self.recent: collections.deque = collections.deque(maxlen=maxlen)
        self.cond = threading.Condition()
        self.finished, self.wait_s = False, wait_s
        self.repeats, self.waited_s, self.bytes = 0, 0.0, 0
        self.rng = np.random.default_rng(seed)

    def put(self, item, nbytes: int = 0) -> None:
        with self.cond:
            self.items.append(item)
            self.bytes += nbytes
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def first(self, timeout_s: float) -> bool:
        """Wait for the first push; False on a timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.items or self.recent or self.finished, timeout_s)

    def take(self):
        """The next push (waited for while the predecessor trains), else a recent one, else None."""
        with self.cond:
            if not self.items and self.recent and not self.finished:
                start = time.time()
                self.cond.wait_for(lambda: self.items or self.finished, self.wait_s)
                self.waited_s += time.time() - start
            if self.items:
                self.recent.append(self.items.popleft())
                return self.recent[-1]
            if not self.recent:
                return None
            self.repeats += 1
            return self.recent[int(self.rng.integers(len(self.recent)))]


class ModuleTrainer:
    def __init__(self, spec: PartSpec, checkpoint: str, quant: str, settings: TrainerSettings,
                 input_refs: list, token_refs: list, num_samples: int, shard_size: int,
                 work_dir: str, next_trainer=None, run_id: str | None = None, tracking_uri: str | None = None,
                 device: str | None = None, fed_by_predecessor: bool = False):
        from pipelines.cluster import actor_device

        self.started_at = time.time()  # when this actor got its resources (autoscaling figures)
        torch.set_num_threads(settings.num_threads)
        torch.manual_seed(settings.seed + spec.index)
        self.spec, self.s, self.next = spec, settings, next_trainer
        self.fed = fed_by_predecessor  # MREM-P: module k-1 pushes its outputs here
        self.device = device or actor_device()
        self.num_samples = num_samples
        self.tokens = ShardReader(token_refs, shard_size)
        self.inputs = self.tokens if spec.first else ShardReader(input_refs, shard_size)
        self.qcfg = learnable(QuantConfig.parse(quant))
        self.teacher, self.student = self._build(checkpoint)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        self.queue = PredecessorQueue(settings.queue_size, settings.wait_s, settings.seed + spec.index)
        self.pred_refs: list | None = None
        self.ckpt_path = Path(work_dir) / f"module{spec.index}.pt"
        self.step, self.losses, self.pushed_bytes = 0, [], 0
        self.restarted = self._was_restarted()
        self.initial_error = None
        self.resumed_from = self._restore()
        from pipelines.tracking import RunLogger
        self.logger = RunLogger(tracking_uri, run_id) if tracking_uri else RunLogger("", None)

    # ---- setup -------------------------------------------------------------------------
    def _build(self, checkpoint: str):
        full, _, _ = models.load_checkpoint(checkpoint)
        quantize_model(full, self.qcfg)  # on the full model: names and embeddings as in export
        student = prune_to_part(full, self.spec).to(self.device)
        teacher_full, _, _ = models.load_checkpoint(checkpoint)
        teacher = prune_to_part(teacher_full, self.spec).to(self.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student.train()  # quantizers train (stochastic rounding, LSQ); dropout only if asked for
        if not self.s.student_dropout:
            for m in student.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0  # HF attention reads its dropout probability from these modules too
        return teacher, student

    def _optimizer(self) -> torch.optim.Optimizer:
        quant = [p for n, p in self.student.named_parameters() if p.requires_grad and _is_quant_param(n)]
        weights = [p for n, p in self.student.named_parameters() if p.requires_grad and not _is_quant_param(n)]
        return torch.optim.Adam([{"params": weights, "lr": self.s.lr}, {"params": quant, "lr": self.s.lr_quant}])

    @staticmethod
    def _was_restarted() -> bool:
        import warnings

        try:
            import ray
            with warnings.catch_warnings():  # Ray warns about its own use of a deprecated id accessor
                warnings.simplefilter("ignore")
                return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # not running as an actor
            return False

    def _restore(self) -> int:
        if not self.ckpt_path.exists():
            return 0
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses, self.initial_error = state["step"], state["losses"], state["initial_error"]
        print(f"[mrem module {self.spec.index}] resumed from {self.ckpt_path} at step {self.step}")
        return self.step

    def _checkpoint(self) -> None:
        state = {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "losses": self.losses, "initial_error": self.initial_error}
        tmp = self.ckpt_path.with_suffix(".tmp")
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)  # atomic: never a half-written checkpoint

    # ---- data --------------------------------------------------------------------------
    def _batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Teacher input, mask and token types for rows `idx`, trimmed to their longest sequence."""
        mask = torch.from_numpy(self.tokens.rows(idx, "attention_mask"))
        length = int(mask.sum(1).max())
        key = "input_ids" if self.spec.first else "hidden"
        x = torch.from_numpy(self.inputs.rows(idx, key))[:, :length]
        tt = None
        if self.spec.first and "token_type_ids" in self.tokens.shards[0]:
            tt = torch.from_numpy(self.tokens.rows(idx, "token_type_ids"))[:, :length].to(self.device)
        return x.to(self.device), mask[:, :length].to(self.device), tt, length

    def push(self, idx: np.ndarray, outputs: np.ndarray) -> None:
        """Called by the predecessor: its quantized outputs for sample rows `idx`."""
        self.queue.put((idx, outputs), outputs.nbytes)

    def predecessor_finished(self) -> None:
        """Called by the predecessor after its last step: stop waiting for more pushes."""
        self.queue.finish()

    def _next_input(self, rng: np.random.Generator):
        """(rows, predecessor output or None): sequential shards, else the predecessor's pushes
        in order, else (first module, or nothing pushed) a random batch of teacher inputs."""
        if self.pred_refs is not None:  # sequential: predecessor outputs for every sample
            idx = rng.choice(self.num_samples, self.s.batch_size, replace=False)
            return idx, self.pred.rows(idx, "hidden")
        item = self.queue.take() if self.fed else None
        return item if item is not None else (rng.choice(self.num_samples, self.s.batch_size, replace=False), None)

    def lam(self, step: int) -> float:
        if self.pred_refs is not None:
            return 0.0  # MREM-S: the quantized predecessors' outputs, no teacher forcing
        return max(1.0 - step / self.s.teacher_forcing_steps, 0.0) if self.s.teacher_forcing_steps > 0 else 0.0

    # ---- training ----------------------------------------------------------------------
    def _loss(self, idx: np.ndarray, pred: np.ndarray | None, lam: float):
        x, mask, tt, length = self._batch(idx)
        with torch.no_grad():
            t_out, t_layers = part_forward(self.teacher, self.spec, x, mask, tt)
        s_in = x
        if pred is not None and not self.spec.first:
            p = torch.tensor(pred[:, :length], device=self.device)  # a copy: object-store arrays are read-only
            s_in = lam * x + (1 - lam) * p
        s_out, s_layers = part_forward(self.student, self.spec, s_in, mask, tt)
        loss = sum(masked_mse(s, t, mask) for s, t in zip(s_layers, t_layers))
        if self.spec.last:
            loss = loss + torch.nn.functional.mse_loss(s_out, t_out)
        return loss, s_out, mask

    def _init_ranges(self) -> None:
        """Activation quantizers start from min-max ranges of teacher inputs (as RTN does)."""
        rng = np.random.default_rng(self.s.seed)
        with torch.no_grad(), calibrate(self.student):
            for _ in range(self.s.calib_batches):
                x, mask, tt, _ = self._batch(rng.choice(self.num_samples, self.s.batch_size, replace=False))
                part_forward(self.student, self.spec, x, mask, tt)

    def set_predecessor_outputs(self, refs: list) -> None:
        """MREM-S: the predecessor's outputs for every calibration sample (shards)."""
        self.pred_refs = list(refs)
        self.pred = ShardReader(self.pred_refs, self.tokens.shard_size)

    def train(self) -> dict:
        """Train until `steps`; resumable. Returns this module's statistics."""
        start = time.time()
        if self.step == 0:
            self._init_ranges()
            self.initial_error = self.reconstruction_error()
        self._warm_up()
        rng = np.random.default_rng(self.s.seed * 1000 + self.spec.index * 7919 + self.step)
        sched = lambda step: 0.5 * (1 + math.cos(math.pi * step / self.s.steps))  # noqa: E731
        while self.step < self.s.steps:
            for group, base in zip(self.optimizer.param_groups, (self.s.lr, self.s.lr_quant)):
                group["lr"] = base * sched(self.step)
            idx, pred = self._next_input(rng)
            loss, s_out, _ = self._loss(idx, pred, self.lam(self.step))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.losses.append(loss.item())
            if self.next is not None and not self.spec.last:
                out = s_out.detach().cpu().numpy()
                self.pushed_bytes += out.nbytes
                self.next.push.remote(idx, out)  # actor to actor: never through the driver
            if self.step % self.s.log_every == 0 or self.step == self.s.steps:
                recent = float(np.mean(self.losses[-self.s.log_every:]))
                self.logger.log({"loss": recent, "lambda": self.lam(self.step)}, self.step)
                print(f"[mrem module {self.spec.index}] step {self.step}/{self.s.steps} loss {recent:.5f} "
                      f"lambda {self.lam(self.step):.2f} ({(time.time() - start) / max(self.step - self.resumed_from, 1):.2f} s/step)")
            if self.step % self.s.checkpoint_every == 0:
                self._checkpoint()
        if self.next is not None and not self.spec.last:
            self.next.predecessor_finished.remote()
        return self.stats(time.time() - start)

    def _warm_up(self, timeout_s: float = 120.0) -> None:
        """MREM-P warm-up: wait for the predecessor's first outputs (not for it to finish)."""
        if self.fed and self.pred_refs is None:
            self.queue.first(timeout_s)

    def stats(self, wall_s: float) -> dict:
        steps_done = self.s.steps - self.resumed_from
        return {"module": self.spec.index, "layers": [self.spec.start, self.spec.end], "steps": self.step,
                "initial_error": self.initial_error, "final_error": self.reconstruction_error(),
                "wall_s": wall_s, "s_per_step": wall_s / max(steps_done, 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "restarted": self.restarted, "resumed_from_step": self.resumed_from,
                "pushed_bytes": self.pushed_bytes, "pulled_bytes": self.queue.bytes,
                "repeated_batches": self.queue.repeats, "waited_for_predecessor_s": round(self.queue.waited_s, 1),
                "started_at": self.started_at, **self.placement(), "final_loss": float(np.mean(self.losses[-10:])) if self.losses else None}

    @torch.no_grad()
    def reconstruction_error(self) -> float:
        """Module-local error: student vs teacher on the same (teacher) inputs, first samples."""
        self.student.eval()
        n = min(self.s.eval_samples, self.num_samples)
        errs = []
        for start in range(0, n, 32):
            idx = np.arange(start, min(start + 32, n))
            x, mask, tt, _ = self._batch(idx)
            t_out, t_layers = part_forward(self.teacher, self.spec, x, mask, tt)
            s_out, s_layers = part_forward(self.student, self.spec, x, mask, tt)
            errs.append(float(sum(masked_mse(s, t, mask) for s, t in zip(s_layers, t_layers))))
        self.student.train()
        return float(np.mean(errs))

    @torch.no_grad()
    def _outputs(self, idx: np.ndarray) -> np.ndarray:
        """Quantized outputs for rows `idx`, fed by the predecessor's outputs in MREM-S."""
        mask = torch.from_numpy(self.tokens.rows(idx, "attention_mask")).to(self.device)
        key = "input_ids" if self.spec.first else "hidden"
        source = self.pred if (self.pred_refs is not None and not self.spec.first) else self.inputs
        x = torch.from_numpy(np.ascontiguousarray(source.rows(idx, key))).to(self.device)
        tt = None
        if self.spec.first and "token_type_ids" in self.tokens.shards[0]:
            tt = torch.from_numpy(self.tokens.rows(idx, "token_type_ids")).to(self.device)
        return part_forward(self.student, self.spec, x, mask, tt)[0].float().cpu().numpy()

    def propagate(self) -> list:
        """MREM-S: this module's quantized outputs for every sample, as shards like the inputs'."""
        import ray

        self.student.eval()
        refs, size = [], self.tokens.shard_size
        for first in range(0, self.num_samples, size):
            rows = np.arange(first, min(first + size, self.num_samples))
            chunks = [self._outputs(rows[i:i + 64]) for i in range(0, len(rows), 64)]
            refs.append(ray.put({"hidden": np.concatenate(chunks)}))
        self.student.train()
        return refs

    def export(self) -> dict[str, torch.Tensor]:
        """The trained student module's state (full-model key names), on the CPU."""
        return {k: v.detach().cpu() for k, v in self.student.state_dict().items()}

    def placement(self) -> dict:
        """Where this actor runs: node id, Ray GPU ids, torch device."""
        import ray

        if not ray.is_initialized():
            return {"node_id": None, "gpu_ids": [], "device": self.device}
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device}

    def progress(self) -> int:
        return self.step


def _is_quant_param(name: str) -> bool:
    """Quantizer parameters (LSQ steps, offsets) live in `*.weight_q` / `*.act_q` submodules."""
    parts = name.split(".")
    return len(parts) > 1 and parts[-2].endswith("_q")
