"""When the compiled fast paths run: the `compile: auto|on|off` settings of training and sampling, resolved; and,
by the same reasoning, when a training run lets cuDNN time its convolution algorithms (`autotune_training`).

torch.compile costs minutes before it saves a second, so `auto` compiles only where the work ahead pays the
compilation back:
- never on a CPU (inductor's C++ kernels take minutes to build there and CUDA graphs do not exist);
- always where a module compiled for the same shapes already lives in this process (nothing left to pay);
- otherwise when (work ahead) x (seconds saved per unit) exceeds the compile time, with the figures measured on
  this GPU (benchmarks/throughput.json, harness/throughput.py) or, on an H100 or H200 without such figures, the
  defaults below, measured on an H100. Any other GPU without figures stays eager under `auto`: compiling pays back
  where launches, not the GPU, set the pace, which a slower GPU may not show (measure it, or set `true`).
The work ahead is the larger of the call's own work (a run's steps, a folder's images) and the study's, which the
runner announces once with `expect_study`, so a grid of short runs that share one compiled UNet still compiles.
The study's figure counts all of its work, done or not: a study resumed near its end may compile for little gain
(set `compile: false` there).

`true` compiles wherever the installed torch can (a CPU included: the tests do); `false` never does. A phase that
cannot compile (a method whose model changes shape, a torch without `torch.compiler.set_stance`) runs eager and says
why.

This module imports no torch at import time (the dry run uses it). What it does not hold: how a model is compiled
(harness/trainer/compiled.py, harness/inference.py) or the table of measured figures (harness/throughput.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Payback:
    """What compiling one kind of work costs and saves, per unit (an optimizer step or an image)."""

    eager_seconds: float
    compiled_seconds: float
    compile_seconds: float
    source: str

    @property
    def saving(self) -> float:
        return self.eager_seconds - self.compiled_seconds

    def break_even(self) -> float:
        """Units of work after which compiling has paid for itself (infinite when it saves nothing)."""
        return self.compile_seconds / self.saving if self.saving > 0 else float("inf")


# Measured on an H100 80GB (torch 2.11, full-size SD 1.5, 512 px): training `fast` with checkpointing, batch 1+1,
# bf16, AdamW8bit, eager 0.27 s/step against 0.131 with torch.compile(mode="reduce-overhead") after ~150 s of
# compilation (a probe of the UNet alone); class images (PNDM 50 steps, batch 32) eager 2.89 images/s against
# 3.88 compiled, which paid back from ~700 images, i.e. ~62 s of compilation. Evaluation sampling is assumed to
# gain the same ratio. benchmarks/throughput.json replaces these with the harness's own figures per GPU.
DEFAULT_GPUS = ("H100", "H200")  # the GPUs these defaults speak for (an H200 is an H100 with more memory)
DEFAULT_PAYBACK = {
    "training": Payback(0.27, 0.131, 150.0, "H100 probe (torch.compile reduce-overhead of the UNet)"),
    "sampling": Payback(1 / 3.6, 1 / (3.6 * 3.88 / 2.89), 62.0, "H100 class-image measurement, ratio 3.88/2.89"),
}


@dataclass(frozen=True)
class StudyWork:
    """The work a study will do in this process, as announced by the runner (0: not announced)."""

    training_steps: int = 0
    images: int = 0


_study = StudyWork()


def expect_study(work: Any) -> None:
    """Announces the study's work (a grid.WorkEstimate) so that `auto` amortises compilation over the whole grid."""
    global _study
    _study = StudyWork(training_steps=work.optimizer_steps, images=work.images)


def study_work() -> StudyWork:
    return _study


@dataclass(frozen=True)
class Decision:
    """Whether a phase compiles, and why (printed beside the phase)."""

    compile: bool
    reason: str


def decide(setting: str | bool, device_type: str, work: int, payback: Payback | None, unit: str = "units",
           warm: bool = False, unsupported: str | None = None, deterministic: bool = False) -> Decision:
    """Resolves a `compile` setting ("auto", True, False) for `work` units ("steps", "images") on a device of
    `device_type`. `payback`: the figures of this GPU (None: none measured). `warm`: a module compiled for these
    shapes already exists in this process. `unsupported`: why this phase cannot compile at all (None when it can).
    `deterministic`: execution.deterministic is on; `auto` is then eager, because a compiled path rounds otherwise
    than the eager one, and auto's choice depends on how much work a process is handed.
    """
    if setting != "auto" and not isinstance(setting, bool):
        raise ValueError(f"compile must be auto, true or false, not {setting!r}.")
    if setting is False:
        return Decision(False, "compile: false")
    if unsupported:
        return Decision(False, f"eager: {unsupported}")
    if setting is True:
        return Decision(True, "compile: true")
    if deterministic:
        return Decision(False, "auto: eager under execution.deterministic (the same path in every process)")
    if device_type != "cuda":
        return Decision(False, f"auto: eager on {device_type} (compiling pays back on a CUDA GPU only)")
    if warm:
        return Decision(True, "auto: a compiled model of these shapes is already in memory")
    if payback is None:
        return Decision(False, "auto: eager, no compile figures measured on this GPU (benchmarks/"
                               "bench_throughput.py measures them; compile: true compiles anyway)")
    needed = payback.break_even()
    if work >= needed:
        return Decision(True, f"auto: {work} {unit} pay back ~{payback.compile_seconds:.0f} s of compilation "
                              f"from ~{needed:.0f} ({payback.source})")
    return Decision(False, f"auto: eager, {work} {unit} are fewer than the ~{needed:.0f} that pay back "
                           f"~{payback.compile_seconds:.0f} s of compilation ({payback.source})")


# cuDNN's autotuning (torch.backends.cudnn.benchmark) times every convolution algorithm the first time it meets an
# input shape. Measured on an H200 (full-size SD 1.5, 512 px, bf16, checkpointing, eager, this process's first and
# second batch shapes): 21 and 13 s more for the first step of a new batch shape, for 0.006-0.027 s saved on every
# later step (benchmarks/README.md). One shape pays back after about 1,000 steps, and a study trains up to two
# (with and without class images), hence:
AUTOTUNE_PAYBACK_STEPS = 1500


def autotune_training(device_type: str, steps: int, compiled: bool, deterministic: bool) -> tuple[bool, str]:
    """Whether cuDNN times its algorithms for a training run, and why: `steps` is the larger of the run's and the
    study's (as for `compile`). Never on a CPU or under execution.deterministic (timing picks the algorithm, so two
    processes may pick differently); always for a compiled UNet, whose minutes of compilation dwarf the timing."""
    if device_type != "cuda":
        return (False, "no cuDNN here")
    if deterministic:
        return (False, "cuDNN not autotuned under execution.deterministic")
    if compiled:
        return (True, "cuDNN autotuned (compiled: the timing is small beside the compilation)")
    if steps >= AUTOTUNE_PAYBACK_STEPS:
        return (True, f"cuDNN autotuned: {steps} steps pay back its timing from ~{AUTOTUNE_PAYBACK_STEPS}")
    return (False, f"cuDNN not autotuned: {steps} steps are fewer than the ~{AUTOTUNE_PAYBACK_STEPS} that pay "
                   "back its timing of each new shape (~15 s)")


# --------------------------------------------------------------------------------------------------------------
# What the installed torch can do


@functools.lru_cache(maxsize=4)
def compiler_problem(device_type: str) -> str | None:
    """Why torch.compile cannot serve the fast paths here, or None. They need `torch.compiler.set_stance`
    (torch >= 2.6) to run a compiled model eagerly where it must, and triton on a CUDA GPU."""
    import torch

    if not hasattr(torch.compiler, "set_stance"):
        return f"torch {torch.__version__} lacks torch.compiler.set_stance (the fast paths need torch >= 2.6)"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (torch.compile needs it on a GPU)"
    return None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Runs every compiled module eagerly inside the block: a model compiled for training is called here for
    something else (eager snapshot sampling, a run with compile off) without compiling a second graph."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # nothing was compiled with such a torch (compiler_problem)
        yield
        return
    with set_stance("force_eager"):
        yield
