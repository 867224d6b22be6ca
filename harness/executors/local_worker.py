"""Inside a worker process of the local executor: what it is given, how it starts, loads ahead and works.

A worker is started with `spawn` (a fresh interpreter: CUDA starts in the child), pinned to its GPU by the
environment its parent gives it. It sends its output to its log file, publishes its status for the command's view,
and loads the model while the command's process prepares the study. It then takes runs from the shared queue until
it reads its end marker: at once on a GPU of its own, and on the device the command prepares on either at once too
(when the GPU has room for both) or after the preparation. Ctrl-C or SIGTERM stops it where it is; it stops too
when its parent dies.

What this module does not hold: the pool of workers and the command's side (local.py), what a run is (execute.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.config import Protocol
    from harness.grid import RunSpec
    from harness.study import Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: its name in the view, the torch device it uses, and for a worker process the
    CUDA_VISIBLE_DEVICES value that pins it (None: no pinning)."""

    name: str
    device: str
    visible: str | None = None


@dataclass(frozen=True)
class WorkerOrder:
    """What a worker process needs (pickled to it): the protocol, the runs it may be handed, where it runs and
    where it reports."""

    protocol: Protocol
    runs: tuple[RunSpec, ...]
    slot: Slot
    status_path: Path
    log_path: Path
    after_preparation: bool = True  # it takes runs once preparation is done (it would share the preparing device)


class _QueueOfRuns:
    """The shared queue as execute.work sees it: run keys until this worker's end marker."""

    def __init__(self, queue: Any, runs: tuple[RunSpec, ...]):
        self.queue = queue
        self.runs = {r.run_key: r for r in runs}

    def take(self) -> RunSpec | None:
        key = self.queue.get()
        return None if key is None else self.runs[key]


def worker_main(order: WorkerOrder, queue: Any, prepared: Any) -> None:
    """A worker process: executes runs from the queue, publishing its status, until the queue says stop."""
    _stop_with_parent()
    _log_to(order.log_path)
    signal.signal(signal.SIGINT, _interrupt_once)  # Ctrl-C reaches the workers and the command alike
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        _work(order, queue, prepared)
    except KeyboardInterrupt:
        sys.exit(130)


def _interrupt_once(signum: int, frame: Any) -> None:
    """Stops the worker where it is, as Ctrl-C does; a second signal (the command passing Ctrl-C on) is ignored,
    so the clean-up of half-written files is not cut short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _work(order: WorkerOrder, queue: Any, prepared: Any) -> None:
    # CPU workers keep torch's default thread count: fewer threads would change the numbers' last bits.
    from harness.progress import Reporter, file_publisher, forward_logs, reporting

    reporter = Reporter(order.slot.name, order.slot.device, publish=file_publisher(order.status_path))
    reporter.activity("starting (loading libraries)")
    from harness.console import quiet_libraries

    quiet_libraries()
    from harness.execute import work
    from harness.study import Study

    study = Study.open(order.protocol, order.slot.device, reporter)
    from harness.fastpath import expect_study
    from harness.grid import estimate_work

    # compile: auto weighs compile time against the work this worker may be handed (the whole queue at most)
    expect_study(estimate_work(order.protocol, list(order.runs), {}))
    reporter.follow_timings(study.timings)
    forward_logs(reporter)
    with reporting(reporter):
        _load_ahead(study, order.runs)
        if order.after_preparation and not prepared.is_set():
            reporter.waiting("waiting for the preparation")
            prepared.wait()
        work(study, _QueueOfRuns(queue, order.runs))
    reporter.close()


def _load_ahead(study: Study, runs: tuple[RunSpec, ...]) -> None:
    """Loads the model of the first run that trains, while the command's process is still preparing, so the first
    run finds it loaded (harness/trainer/reuse.py keeps it). A model that cannot load is left for the run to
    report: the run's own load raises the same error in its place, with its phase and its ways out."""
    from harness.execute import needs_model, training_components

    run = next((r for r in runs if needs_model(study, r)), None)
    if run is None:
        return
    study.reporter.activity("load model")
    with study.timings.phase("load model"):
        try:
            training_components(run.model)
        except Exception:  # the run reports it
            log.debug("loading ahead failed", exc_info=True)


def _log_to(path: Path) -> None:
    """The worker's stdout and stderr (Python's and the libraries' own) go to its log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (the process's lifetime)
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    sys.stdout = sys.stderr = log_file


def _stop_with_parent() -> None:
    """Asks Linux to send this process SIGTERM when the command's process dies, so no worker is orphaned."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
