"""The state of training in memory: what one run's loop carries from step to step.

Also how the loop reads the device without waiting on it every step: a step's losses stay on the device
(`PendingLoss`) until `read_losses` fetches many at once, and `StepClock` times steps between the synchronisations
the loop makes anyway, so that the seconds per step include the GPU work the CPU queued.

What this module does not hold: what a step does (loop.py) or how the state is saved (checkpoints.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.caches import TrainingData
from harness.config import TrainSpec
from harness.methods import Method
from harness.models import Components
from harness.trainer.compiled import TrainingCompile
from harness.trainer.optimizers import Updater


@dataclass
class StepLoss:
    step: int
    instance: float
    prior: float | None
    lr: float


@dataclass(frozen=True)
class PendingLoss:
    """A step's losses still on the device: reading them waits for the GPU, so the loop reads many at once."""

    step: int
    instance: torch.Tensor
    prior: torch.Tensor | None
    lr: float

    def read(self) -> StepLoss:
        return read_losses([self])[0]


def read_losses(pending: Sequence[PendingLoss]) -> list[StepLoss]:
    """The losses of many steps with one device-to-host copy (one wait for the GPU)."""
    if not pending:
        return []
    values = torch.stack([p.instance for p in pending] + [p.prior for p in pending if p.prior is not None])
    numbers = values.float().tolist()
    instance, priors = numbers[: len(pending)], iter(numbers[len(pending):])
    return [StepLoss(step=p.step, instance=value, prior=None if p.prior is None else next(priors), lr=p.lr)
            for p, value in zip(pending, instance, strict=True)]


class StepClock:
    """Seconds per step after the warm-up steps, measured between device synchronisations.

    The CPU runs ahead of the GPU, so a step's wall time is only known at a synchronisation: the loop calls `lap`
    right after one (reading the losses) and `restart` after work that is not training (a snapshot, a checkpoint).
    The warm-up steps (compilation, CUDA-graph capture, allocator growth) are timed apart, as `warmup_seconds`.
    """

    def __init__(self, device: torch.device, start_step: int, warmup_steps: int):
        self.device = device
        self.warm_at = start_step + warmup_steps
        self.began = time.perf_counter()
        self.mark: float | None = None
        self.mark_step = start_step
        self.seconds = 0.0
        self.steps = 0
        self.warmup_seconds: float | None = None
        self.paused = 0.0  # time in snapshots and checkpoints during the warm-up

    def lap(self, step: int) -> None:
        """Called at `step` right after the device finished all queued work."""
        now = time.perf_counter()
        if self.mark is not None:
            self.seconds += now - self.mark
            self.steps += step - self.mark_step
        elif step >= self.warm_at and self.warmup_seconds is None:
            self.warmup_seconds = now - self.began - self.paused
        self.mark, self.mark_step = (now, step) if step >= self.warm_at else (None, step)

    def pause(self) -> float:
        """Training stops being timed (right after a `lap`); returns the time `restart` measures from."""
        self.mark = None
        return time.perf_counter()

    def restart(self, step: int, paused_at: float) -> None:
        now = time.perf_counter()
        if step < self.warm_at:
            self.paused += now - paused_at
        self.mark, self.mark_step = (now, step) if step >= self.warm_at else (None, step)

    def seconds_per_step(self, total_steps: int) -> float | None:
        """The mean after warm-up; a run too short to have any uses its whole time, warm-up included."""
        if self.steps:
            return self.seconds / self.steps
        if total_steps and self.warmup_seconds is not None:
            return self.warmup_seconds / total_steps
        return None


@dataclass
class TrainingSession:
    """The state of training in memory. `advance` takes one optimizer step."""

    spec: TrainSpec
    method: Method
    components: Components
    data: TrainingData
    device: torch.device
    updater: Updater
    optimizer_label: str
    noise_scheduler: Any
    scaler: torch.amp.GradScaler | None
    # Per prompt kind ("instance", "class"): its cached embedding on the device, or its token ids when the method
    # runs it through the text encoder in every step.
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    trainable_params: int = 0  # elements of the parameters the method trains
    compiled: TrainingCompile | None = None  # how the UNet runs compiled in this session; None: eager
    eager_unet: bool = False  # the UNet is compiled (for an earlier run) but this session runs it eagerly
    math_attention: bool = False  # execution.deterministic on a GPU: attention trains with the plain kernel

    @property
    def trained_modules(self) -> list[torch.nn.Module]:
        return self.method.trained_modules(self.components)
