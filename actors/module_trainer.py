"""`ModuleTrainer`: owns one MREM module and trains its quantized student.

A plain class (tests use it directly); actors/fleet.py makes it a Ray actor with the resources
the stage asks for. It reads the teacher's input activations zero-copy from object-store shards
(ShardReader), takes its predecessor's pushes in parallel MREM (PredecessorQueue) and runs the
reconstruction loop of pipelines/reconstruction.py, checkpointing every `checkpoint_every` steps
so that a restarted actor resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import ray
import torch

from actors.predecessor_queue import PredecessorQueue
from actors.shard_reader import ShardReader
from pipelines import faults, part_loader
from pipelines import reconstruction as rc
from pipelines.partition import Layout, PartSpec, part_forward, part_state


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
    first_push_s: float = 120.0    # MREM-P: longest wait for the predecessor's first outputs
    log_every: int = 25
    calib_batches: int = 8         # batches to initialise activation ranges
    eval_samples: int = 256
    seed: int = 0
    num_threads: int = 1
    student_dropout: bool = False  # off: the student matches the teacher's (eval-mode) outputs
    converge: bool = False         # stop once the held-out loss stops improving (rc.Plateau); `steps` caps it
    min_steps: int = 0             # converge: never stop before (teacher forcing is over by then)
    check_every: int = 50          # converge: steps between held-out checks
    patience: int = 2              # converge: checks without improvement that make a plateau
    tolerance: float = 0.01        # converge: the relative improvement that counts
    lr_decay: float = 0.1          # converge: both learning rates' factor after the first plateau
    settle_steps: int = 0          # converge, MREM-P: the budget stretches until a fed module has trained this
                                   # many steps on its predecessor's final outputs (at most to twice `steps`)
    holdout: int = 0               # the last `holdout` calibration rows: never trained on, the stop test's data


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...


class ModuleTrainer:
    def __init__(self, spec: PartSpec, layout: Layout, checkpoint: str, quant: str, settings: TrainerSettings,
                 input_refs: list, token_refs: list, num_samples: int, shard_size: int, work_dir: str,
                 next_trainer=None, logger: MetricLogger | None = None, device: str = "cpu",
                 fed_by_predecessor: bool = False):
        """`device`: "cuda" for the GPU Ray gave this actor (Ray's GPUs may be logical, as in tests:
        without CUDA the tensors stay on the CPU); `logger` receives the loss curve."""
        self.started_at = time.time()  # when this actor got its resources (autoscaling figures)
        torch.set_num_threads(settings.num_threads)
        torch.manual_seed(settings.seed + spec.index)
        self.spec, self.s, self.next, self.logger = spec, settings, next_trainer, logger
        self.fed = fed_by_predecessor  # MREM-P: module k-1 pushes its outputs here
        self.device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        self.num_samples = num_samples
        self.n_train = num_samples - settings.holdout  # rows 0..n_train-1 train; the rest are held out
        self.tokens = ShardReader(token_refs, shard_size)
        self.inputs = self.tokens if spec.first else ShardReader(input_refs, shard_size)
        self.pred: ShardReader | None = None  # MREM-S: the predecessor's outputs for every sample
        part = part_loader.load_part(checkpoint, spec, layout)  # only the tensors this module runs
        student, teacher = rc.student_and_teacher(part, spec, quant, settings.student_dropout)
        self.student, self.teacher = student.to(self.device), teacher.to(self.device)
        # one calibration pass on a few samples gives Linears that read one tensor (q, k, v) one input quantizer
        # before the optimizer collects the steps; train() calibrates the ranges on more samples
        rc.init_ranges(self.student, spec, self._first_batches(min(8, num_samples), 8))
        self.optimizer = rc.optimizer(self.student, settings.lr, settings.lr_quant)
        self.queue = PredecessorQueue(settings.queue_size, settings.wait_s, settings.seed + spec.index)
        self.state_dir = Path(work_dir) / f"module{spec.index}"
        self.step, self.losses, self.pushed_bytes, self.initial_error = 0, [], 0, None
        self.plateau = rc.Plateau(settings.tolerance, settings.patience)
        self.lr_factor, self.curve, self.stop_reason, self.final_from = 1.0, [], None, None
        self.restarted = _was_restarted()
        self.resumed_from = self._restore()

    # ---- state -------------------------------------------------------------------------
    def _restore(self) -> int:
        state = rc.load_state(self.state_dir, self.device)
        if state is None:
            return 0
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses, self.initial_error = state["step"], state["losses"], state["initial_error"]
        self.plateau = rc.Plateau(**state["plateau"])
        self.lr_factor, self.curve = state["lr_factor"], state["curve"]
        self.stop_reason, self.final_from = state["stop_reason"], state["final_from"]
        torch.set_rng_state(state["rng"])  # dropout: the stream an uninterrupted run would have drawn
        print(f"[mrem module {self.spec.index}] resumed from {self.state_dir} at step {self.step}")
        return self.step

    def _checkpoint(self) -> None:
        rc.save_state(self.state_dir, {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                                       "step": self.step, "losses": self.losses, "initial_error": self.initial_error,
                                       "rng": torch.get_rng_state(), "plateau": dataclasses.asdict(self.plateau),
                                       "lr_factor": self.lr_factor, "curve": self.curve,
                                       "stop_reason": self.stop_reason, "final_from": self.final_from})

    # ---- data --------------------------------------------------------------------------
    def _batch(self, idx: np.ndarray) -> rc.Batch:
        """Token ids, mask, token types and the teacher's hidden states entering the module for rows
        `idx`, trimmed to their longest sequence."""
        mask = torch.from_numpy(self.tokens.rows(idx, "attention_mask"))
        length = int(mask.sum(1).max())
        ids = torch.from_numpy(self.tokens.rows(idx, "input_ids"))[:, :length].to(self.device)
        tt = None
        if self.tokens.has("token_type_ids"):
            tt = torch.from_numpy(self.tokens.rows(idx, "token_type_ids"))[:, :length].to(self.device)
        hidden = None
        if not self.spec.first:
            rows = self.inputs.rows(idx, "hidden")[:, :length]
            hidden = torch.tensor(rows, device=self.device)  # a copy: object-store arrays are read-only
        return ids, mask[:, :length].to(self.device), tt, hidden

    def _random_batches(self, count: int, rng: np.random.Generator) -> Iterator[rc.Batch]:
        for _ in range(count):
            yield self._batch(rng.choice(self.n_train, self.s.batch_size, replace=False))

    def _first_batches(self, n: int, size: int = 32) -> Iterator[rc.Batch]:
        for start in range(0, n, size):
            yield self._batch(np.arange(start, min(start + size, n)))

    def push(self, idx: np.ndarray, outputs: np.ndarray) -> None:
        """Called by the predecessor: its quantized outputs for sample rows `idx`."""
        self.queue.put((idx, outputs), outputs.nbytes)

    def predecessor_finished(self) -> None:
        """Called by the predecessor after its last step: stop waiting for more pushes."""
        self.queue.finish()

    def set_predecessor_outputs(self, refs: list) -> None:
        """The predecessor's final outputs for every calibration sample (shards): MREM-S's input from the start;
        in MREM-P (converge) the outputs a finished predecessor hands over, trained on from then on."""
        self.pred = ShardReader(list(refs), self.tokens.shard_size)

    def _next_input(self, rng: np.random.Generator):
        """(rows, predecessor output or None): sequential shards, else the predecessor's pushes
        in order, else (first module, or nothing pushed) a random batch of teacher inputs."""
        if self.pred is not None:
            if self.final_from is None:  # handed over: the held-out loss changes meaning from here on
                self.final_from = self.step
                self.plateau.restart()
            idx = rng.choice(self.n_train, self.s.batch_size, replace=False)
            return idx, self.pred.rows(idx, "hidden")
        item = self.queue.take() if self.fed else None
        return item if item is not None else (rng.choice(self.n_train, self.s.batch_size, replace=False), None)

    def lam(self, step: int) -> float:
        """The teacher's share of the student input (MREM-S: none, the predecessors' outputs only)."""
        return 0.0 if self.pred is not None else rc.teacher_forcing(step, self.s.teacher_forcing_steps)

    # ---- training ----------------------------------------------------------------------
    def _loss(self, idx: np.ndarray, pred: np.ndarray | None, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(idx)
        ids, hidden = batch[0], batch[3]
        if hidden is None:  # the first module starts from the token ids
            return rc.reconstruction_loss(self.student, self.teacher, self.spec, batch)
        p = None if pred is None else torch.tensor(pred[:, :ids.shape[1]], device=self.device)
        return rc.reconstruction_loss(self.student, self.teacher, self.spec, batch, rc.mix(hidden, p, lam))

    def _step(self, rng: np.random.Generator) -> None:
        # converging: the rates hold until a plateau lowers lr_factor; else a cosine decay over the steps
        factor = self.lr_factor if self.s.converge else rc.cosine(self.step, self.s.steps)
        for group, base in zip(self.optimizer.param_groups, (self.s.lr, self.s.lr_quant)):
            group["lr"] = base * factor
        idx, pred = self._next_input(rng)
        loss, s_out = self._loss(idx, pred, self.lam(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.losses.append(loss.item())
        if self.next is not None and not self.spec.last:
            out = s_out.detach().cpu().numpy()
            self.pushed_bytes += out.nbytes
            self.next.push.remote(idx, out)  # actor to actor: never through the driver

    def train(self) -> dict:
        """Train until `steps`; resumable. Returns this module's statistics."""
        start = time.time()
        if self.step == 0:
            rc.init_ranges(self.student, self.spec,
                           self._random_batches(self.s.calib_batches, np.random.default_rng(self.s.seed)))
            self.initial_error = self.reconstruction_error()
        if self.fed and self.pred is None:  # MREM-P warm-up: the predecessor's first outputs, not its end
            self.queue.first(self.s.first_push_s)
        while self._budget_left() and self.stop_reason is None:
            self._step(np.random.default_rng((self.s.seed, self.spec.index, self.step)))  # a resume draws the same
            if self._check_due() and self._converged():
                self.stop_reason = "converged"
            if self.step % self.s.log_every == 0 or self.step == self.s.steps or self.stop_reason:
                self._log(start)
            if self.step % self.s.checkpoint_every == 0 or self.stop_reason:
                self._checkpoint()
            faults.point(f"mrem.module{self.spec.index}", self.step)
        self.stop_reason = self.stop_reason or ("budget" if self.s.converge else "steps")
        if self.next is not None and not self.spec.last:
            if self.s.converge:  # MREM-P: the successor goes on training on this module's final outputs
                self.next.set_predecessor_outputs.remote(self.propagate())
            self.next.predecessor_finished.remote()
        return self.stats(time.time() - start)

    # ---- convergence -------------------------------------------------------------------
    def _budget_left(self) -> bool:
        """Within `steps`; past them, a fed MREM-P module goes on until it has trained `settle_steps` on its
        predecessor's final outputs (never beyond twice `steps`, should they not come)."""
        if self.step < self.s.steps:
            return True
        if not (self.fed and self.s.settle_steps) or self.step >= 2 * self.s.steps:
            return False
        return self.final_from is None or self.step < self.final_from + self.s.settle_steps

    def _check_due(self) -> bool:
        return self.s.converge and self.step >= self.s.min_steps and self.step % self.s.check_every == 0

    def _converged(self) -> bool:
        """One held-out check: a plateau first lowers the learning rates, the next one stops the module, but in
        MREM-P only once it trains on its predecessor's final outputs (which restart the judgement)."""
        loss = self.heldout_loss()
        self.curve.append([self.step, loss])
        event = self.plateau.update(loss)
        if event == "decay":
            self.lr_factor *= self.s.lr_decay
        if self.logger is not None:
            self.logger.log({"heldout_loss": loss, "lr_factor": self.lr_factor}, self.step)
        return event == "plateau" and (not self.fed or self.final_from is not None)

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """The reconstruction loss on the held-out rows, the student fed what it now trains on: its predecessor's
        final outputs once it trains on them, else the teacher's inputs."""
        rows = np.arange(self.n_train, self.num_samples)
        if len(rows) == 0:
            raise ValueError("converge needs held-out rows: set holdout >= 1")
        was_training, total = self.student.training, 0.0
        self.student.eval()
        for chunk in np.array_split(rows, math.ceil(len(rows) / 32)):
            batch = self._batch(chunk)
            student_in = None
            if self.final_from is not None and not self.spec.first:
                rows_in = self.pred.rows(chunk, "hidden")[:, :batch[0].shape[1]]
                student_in = torch.tensor(rows_in, device=self.device)
            loss, _ = rc.reconstruction_loss(self.student, self.teacher, self.spec, batch, student_in)
            total += float(loss) * len(chunk)
        self.student.train(was_training)
        return total / len(rows)

    def _log(self, start: float) -> None:
        recent, lam = float(np.mean(self.losses[-self.s.log_every:])), self.lam(self.step)
        if self.logger is not None:
            self.logger.log({"loss": recent, "lambda": lam}, self.step)
        per_step = (time.time() - start) / max(self.step - self.resumed_from, 1)
        print(f"[mrem module {self.spec.index}] step {self.step}/{self.s.steps} loss {recent:.5f} "
              f"lambda {lam:.2f} ({per_step:.2f} s/step)")

    def reconstruction_error(self) -> float:
        """Module-local error: student vs teacher on the same (teacher) inputs, first samples."""
        n = min(self.s.eval_samples, self.num_samples)
        return rc.module_error(self.student, self.teacher, self.spec, self._first_batches(n))

    def stats(self, wall_s: float) -> dict:
        steps_done = self.step - self.resumed_from
        return {"module": self.spec.index, "layers": [self.spec.start, self.spec.end], "steps": self.step,
                "max_steps": self.s.steps, "stop_reason": self.stop_reason, "heldout_curve": self.curve,
                "final_outputs_from_step": self.final_from, "lr_factor": self.lr_factor,
                "initial_error": self.initial_error, "final_error": self.reconstruction_error(),
                "wall_s": wall_s, "s_per_step": wall_s / max(steps_done, 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "model_mb": sum(part_loader.resident_bytes(m) for m in (self.student, self.teacher)) / 2**20,
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None,
                "restarted": self.restarted, "resumed_from_step": self.resumed_from,
                "pushed_bytes": self.pushed_bytes, "pulled_bytes": self.queue.bytes,
                "repeated_batches": self.queue.repeats, "waited_for_predecessor_s": round(self.queue.waited_s, 1),
                "started_at": self.started_at, **self.placement(),
                "final_loss": float(np.mean(self.losses[-10:])) if self.losses else None}

    # ---- after training ----------------------------------------------------------------
    @torch.no_grad()
    def _outputs(self, idx: np.ndarray) -> np.ndarray:
        """Quantized outputs for rows `idx` (full length), fed by the predecessor's outputs in MREM-S."""
        mask = torch.from_numpy(self.tokens.rows(idx, "attention_mask")).to(self.device)
        ids = torch.from_numpy(self.tokens.rows(idx, "input_ids")).to(self.device)
        tt = None
        if self.tokens.has("token_type_ids"):
            tt = torch.from_numpy(self.tokens.rows(idx, "token_type_ids")).to(self.device)
        hidden = None
        if not self.spec.first:
            source = self.pred if self.pred is not None else self.inputs
            hidden = torch.from_numpy(np.ascontiguousarray(source.rows(idx, "hidden"))).to(self.device)
        return part_forward(self.student, self.spec, ids, mask, tt, hidden)[0].float().cpu().numpy()

    def propagate(self) -> list:
        """MREM-S: this module's quantized outputs for every sample, as shards like the inputs'."""
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
        return {k: v.detach().cpu() for k, v in part_state(self.student, self.spec).items()}

    def placement(self) -> dict:
        """Where this actor runs: node id, Ray GPU ids, torch device."""
        if not ray.is_initialized():
            return {"node_id": None, "gpu_ids": [], "device": self.device}
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device}

    def progress(self) -> int:
        return self.step


def _was_restarted() -> bool:
    """Whether Ray restarted this actor after a failure (False outside an actor)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray warns about its own use of a deprecated id accessor
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
