"""Executors: where the runs of a study execute, and the registry of them.

An executor sees a planned study through its three phases, each with one owner: prepare once (instance images,
class-image pools, reference rows), execute every selected run once on some worker (harness/execute.py's `work`
loop, which skips what is done), collect once at the end (CSVs, report). `local` (the default) runs its workers on
this machine: one process per GPU pinned with CUDA_VISIBLE_DEVICES, or one worker in the command's own process when
there is one GPU or none. `slurm` submits a prepare job, a job array over the run keys and a collect job through
submitit. Adding an executor is one module with an `Executor` and one `EXECUTORS.register` line; the protocol's
`execution.executor` names it.

The protocol loader imports this module (to check `execution.executor`), so it imports nothing heavy and nothing of
the protocol's: below, `protocol` is a config Protocol, `plan` a plan.Plan, `runs` grid.RunSpecs, `timings` a
study.Timings, all written as Any. The executors themselves load on first use.

What this module does not hold: the phases themselves (prepare.py, execute.py, collect.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.registry import Registry


class ExecutionError(RuntimeError):
    """The execution settings cannot work here (no such GPU, no Slurm, a runs folder the nodes cannot see); the
    message says what to change. Raised before any work starts."""


class StudyFailedError(RuntimeError):
    """A phase failed where the command could not watch it (a Slurm job); the message says which and where its log
    is. The command ends with status 1, as for a failed run."""


@dataclass(frozen=True)
class StudyJob:
    """A planned study to see through: the selected runs (longest first) and, from --device, the one device of a
    single worker in the command's own process."""

    plan: Any
    runs: tuple[Any, ...]
    device: str | None = None


@dataclass(frozen=True)
class StudyOutcome:
    """Where collect wrote the CSVs and the report, and the seconds each phase took (over every worker)."""

    results: Path
    report: Path
    timings: Any


class Executor:
    """One way of running a study's workers. Subclasses override `run`, and `check` and `describe` as needed."""

    name: str = ""

    def check(self, protocol: Any) -> list[str]:
        """Problems with the execution settings, found without starting anything (the dry run shows them too)."""
        return []

    def describe(self, plan: Any, runs: tuple[Any, ...]) -> list[str]:
        """Lines for the dry run: where and how the runs would execute."""
        return [f"executor: {self.name}"]

    def run(self, job: StudyJob) -> StudyOutcome:
        """Prepares, executes and collects the study; raises KeyboardInterrupt after stopping cleanly on Ctrl-C."""
        raise NotImplementedError


EXECUTORS: Registry[Executor] = Registry("executor", lazy={
    "local": "harness.executors.local:EXECUTOR",
    "slurm": "harness.executors.slurm:EXECUTOR",
})
