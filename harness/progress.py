"""Progress of a study's work as each worker sees it: what it is doing, how far it got, what it finished.

A worker (the command's own process, a worker process on one GPU, a Slurm task) keeps one `WorkerStatus` and
publishes it through its `Reporter`: straight to the console view when the work runs in the command's process, or
into a small JSON file, written atomically, that the command's view reads when the work runs elsewhere. Sampling
and class-image generation report through `bar`, which is a plain tqdm bar when no reporter is active (notebooks,
benchmarks). `run_cost` weighs a run in UNet passes, for the queue (longest runs first) and for the ETA.

What this module does not hold: drawing (console.py), or any decision about what runs where (executors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.store import atomic_write_json, read_json

PUBLISH_INTERVAL = 0.5  # seconds between two published updates of the same activity
MAX_MESSAGES = 200
TRAIN_PASSES = 3.0  # a training step costs about three UNet passes per image (forward, backward)
SAMPLING_PASSES = 2.0  # classifier-free guidance: two UNet passes per image and denoising step


@dataclass(frozen=True)
class RunCost:
    """A run's work in UNet passes at 512 px: one optimizer step, one evaluation image, the whole run."""

    step: float
    image: float
    total: float


def run_cost(run: Any, images_per_snapshot: int, eval_steps: int) -> RunCost:
    """The work of a run (grid.RunSpec): its steps (instance and class batches) and its snapshots' images."""
    scale = (run.train.resolution / 512) ** 2
    batches = 2 if run.train.uses_prior else 1
    step = TRAIN_PASSES * run.train.batch_size * batches * scale
    image = SAMPLING_PASSES * eval_steps * scale
    total = step * run.train.steps + image * images_per_snapshot * len(run.snapshot_steps)
    return RunCost(step=step, image=image, total=total)


def run_costs(protocol: Any, runs: Iterable[Any]) -> dict[str, RunCost]:
    """The cost of each run of a protocol (config.Protocol), by run key."""
    from harness.prompts import class_prompts, subject_prompts

    spec = protocol.eval
    costs = {}
    for run in runs:
        images = (len(subject_prompts(run.subject, spec)) + len(class_prompts(run.subject, spec))) * len(spec.seeds)
        costs[run.run_key] = run_cost(run, images, spec.steps)
    return costs


def longest_first(protocol: Any, runs: Iterable[Any]) -> list[Any]:
    """The runs in the order workers take them: the costliest first, so no long run starts last."""
    runs = list(runs)
    costs = run_costs(protocol, runs)
    return sorted(runs, key=lambda run: -costs[run.run_key].total)


@dataclass
class WorkerStatus:
    """What one worker is doing, as the view draws it. Lists only grow (finished runs, messages), so a reader that
    polls now and then misses nothing."""

    worker: str = "main"
    device: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    state: str = "starting"  # starting, running, waiting, finished
    run_key: str | None = None
    label: str = ""
    activity: str = ""
    done: int = 0
    total: int = 0
    unit: str = ""
    loss: float | None = None
    run_started: float | None = None
    run_cost: float = 0.0  # cost of the current run
    run_progress: float = 0.0  # of it, the part done (in cost units), resumed work included
    settled: float = 0.0  # full cost of the runs this worker finished
    work: float = 0.0  # cost of what this worker actually computed (for the throughput)
    finished: list[dict[str, Any]] = field(default_factory=list)  # {"run_key", "outcome", "summary", "seconds"}
    messages: list[str] = field(default_factory=list)
    message_count: int = 0  # messages ever sent (the list keeps the last MAX_MESSAGES)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    cpu_timings: dict[str, float] = field(default_factory=dict)  # CPU seconds per phase
    phase_work: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> unit -> amount (images, steps)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerStatus:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


Publish = Callable[[WorkerStatus], None]


class Reporter:
    """Keeps a worker's status and publishes it: at once when the activity changes, at most every
    PUBLISH_INTERVAL seconds while it only advances. Without `publish` it only keeps the status."""

    def __init__(self, worker: str = "main", device: str = "", publish: Publish | None = None):
        self.status = WorkerStatus(worker=worker, device=device)
        self._publish = publish
        self._last = 0.0
        self._cost = RunCost(0.0, 0.0, 0.0)
        self._timings: Any = None

    def follow_timings(self, timings: Any) -> None:
        """Publishes the phases of `timings` (a study.Timings) with every status."""
        self._timings = timings

    def publish(self, force: bool = True) -> None:
        now = time.time()
        if self._publish is None or (not force and now - self._last < PUBLISH_INTERVAL):
            return
        self._last = now
        self.status.updated = now
        if self._timings is not None:
            self.status.timings = dict(self._timings.seconds)
            self.status.cpu_timings = dict(self._timings.cpu_seconds)
            self.status.phase_work = {phase: dict(units) for phase, units in self._timings.work.items()}
        self._publish(self.status)

    # -- runs --------------------------------------------------------------------------------------------------

    def start_run(self, run_key: str, label: str, cost: RunCost) -> None:
        s = self.status
        s.state, s.run_key, s.label, s.run_started = "running", run_key, label, time.time()
        s.run_cost, s.run_progress, s.loss = cost.total, 0.0, None
        self._cost = cost
        self.activity("starting")

    def finish_run(self, run_key: str, outcome: str, summary: str) -> None:
        s = self.status
        seconds = time.time() - s.run_started if s.run_started else 0.0
        s.finished.append({"run_key": run_key, "outcome": outcome, "summary": summary, "seconds": round(seconds, 1)})
        s.settled += s.run_cost
        s.state, s.run_key, s.label, s.activity, s.run_cost, s.run_progress = "running", None, "", "", 0.0, 0.0
        s.done = s.total = 0
        self.publish()

    # -- what is happening -------------------------------------------------------------------------------------

    def activity(self, name: str, total: int = 0, unit: str = "", done: int = 0) -> None:
        s = self.status
        s.activity, s.total, s.unit, s.done = name, total, unit, done
        self.publish()

    def waiting(self, text: str) -> None:
        self.status.state = "waiting"
        self.activity(text)
        self.status.state = "running"

    def train_step(self, step: int, end_step: int, loss: float | None) -> None:
        """Training reached `step` of `end_step`; only steps taken in this process count as work."""
        s = self.status
        if s.activity != "train":
            s.activity, s.unit, s.total, s.done = "train", "step", end_step, max(step - 1, 0)
        taken = max(step - s.done, 0)
        s.work += taken * self._cost.step
        s.run_progress = min(s.run_cost, s.run_progress + taken * self._cost.step)
        s.done, s.total, s.loss = step, end_step, loss
        self.publish(force=False)

    def images(self, n: int) -> None:
        s = self.status
        s.done += n
        s.work += n * self._cost.image
        s.run_progress = min(s.run_cost, s.run_progress + n * self._cost.image)
        self.publish(force=False)

    def message(self, text: str) -> None:
        s = self.status
        s.messages = [*s.messages[-(MAX_MESSAGES - 1):], text]
        s.message_count += 1
        self.publish()

    def close(self) -> None:
        self.status.state = "finished"
        self.status.activity = ""
        self.publish()


def file_publisher(path: Path) -> Publish:
    """Publishes a status into `path` (atomically: readers never see half a file)."""
    return lambda status: atomic_write_json(path, status.to_json())


def read_status(path: Path) -> WorkerStatus | None:
    """A published status, or None while it is not there or not readable yet."""
    try:
        return WorkerStatus.from_json(read_json(path))
    except (OSError, ValueError, TypeError):
        return None


class ReporterLogHandler(logging.Handler):
    """Log records as messages of a worker's status, so the command's view prints them."""

    def __init__(self, reporter: Reporter):
        super().__init__(level=logging.INFO)
        self.reporter = reporter
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reporter.message(self.format(record))
        except Exception:  # a log line must never stop the work
            self.handleError(record)


def forward_logs(reporter: Reporter) -> None:
    """The harness's log records (from INFO on) also go to the command's view, through the worker's status."""
    logging.getLogger("harness").addHandler(ReporterLogHandler(reporter))


# --------------------------------------------------------------------------------------------------------------
# The active reporter, for the generation loops


_active: Reporter | None = None


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Makes `reporter` the one `bar` reports to while the block runs."""
    global _active
    previous, _active = _active, reporter
    try:
        yield reporter
    finally:
        _active = previous


class _ReporterBar:
    """The part of tqdm's interface the generation loops use, reported to the active worker's status."""

    def __init__(self, reporter: Reporter, total: int, desc: str, unit: str):
        self.reporter = reporter
        reporter.activity(desc, total=total, unit=unit)

    def update(self, n: int = 1) -> None:
        self.reporter.images(n)

    def close(self) -> None:
        pass


def bar(total: int, desc: str, unit: str = "img", leave: bool = False) -> Any:
    """A progress bar for a generation loop: the active worker's status, or a tqdm bar outside a study."""
    if _active is not None:
        return _ReporterBar(_active, total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)
