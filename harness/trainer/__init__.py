"""The shared trainer: one loop for every fine-tuning method, with 8-bit AdamW, two memory modes and checkpoints.

- loop.py: the training session, a step, snapshots handed to sampling, the `train` entry point;
- session.py: the state a run carries, its losses read from the device in batches, the step clock;
- compiled.py: the fast path, the UNet compiled for training, and when `train.compile` turns it on;
- reuse.py: the base model's components reused (weights restored in place) across the runs of a process;
- optimizers.py: optimizers (AdamW8bit with its fallback), the learning-rate schedule, the memory modes;
- randomness.py: the data order, noise and timesteps as a pure function of (seed, step);
- checkpoints.py: the training state written atomically, so a run resumes mid-way.

Which parameters train and how the text conditioning is built belong to the method (harness/methods).
"""

from harness.trainer.compiled import TrainingCompile
from harness.trainer.loop import (
    Speedups,
    TrainingOutOfMemoryError,
    advance,
    compute_loss,
    default_speedups,
    make_method,
    start_session,
    train,
)
from harness.trainer.reuse import training_components
from harness.trainer.session import PendingLoss, StepLoss, TrainingSession, read_losses

__all__ = [
    "PendingLoss", "Speedups", "StepLoss", "TrainingCompile", "TrainingOutOfMemoryError", "TrainingSession",
    "advance", "compute_loss", "default_speedups", "make_method", "read_losses", "start_session", "train",
    "training_components",
]
