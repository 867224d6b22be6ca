"""The shared trainer: one loop for every fine-tuning method, with 8-bit AdamW, two memory modes and checkpoints.

- loop.py: the training session, a step, snapshots handed to sampling, the `train` entry point;
- optimizers.py: optimizers (AdamW8bit with its fallback), the learning-rate schedule, the memory modes;
- randomness.py: the data order, noise and timesteps as a pure function of (seed, step);
- checkpoints.py: the training state written atomically, so a run resumes mid-way.

Which parameters train and how the text conditioning is built belong to the method (harness/methods).
"""

from harness.trainer.loop import (
    Speedups,
    StepLoss,
    TrainingOutOfMemoryError,
    TrainingSession,
    advance,
    compute_loss,
    default_speedups,
    make_method,
    start_session,
    train,
)

__all__ = [
    "Speedups", "StepLoss", "TrainingOutOfMemoryError", "TrainingSession", "advance", "compute_loss",
    "default_speedups", "make_method", "start_session", "train",
]
