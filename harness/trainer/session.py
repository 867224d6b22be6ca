"""The state of training in memory: what one run's loop carries from step to step.

What this module does not hold: what a step does (loop.py) or how the state is saved (checkpoints.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from harness.caches import TrainingData
from harness.config import TrainSpec
from harness.methods import Method
from harness.models import Components
from harness.trainer.optimizers import Updater


@dataclass
class StepLoss:
    step: int
    instance: float
    prior: float | None
    lr: float


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

    @property
    def trained_modules(self) -> list[torch.nn.Module]:
        return self.method.trained_modules(self.components)
