"""The command's console: one view of a whole study's progress, wherever its workers run.

`StudyView` draws what the workers publish (progress.WorkerStatus):
- permanent lines: a run starting, a run ending (its one-line summary), and the workers' messages (a damaged file
  made again, a warning);
- on a terminal, a live block under them, redrawn in place: the study (runs done of total, time spent, an ETA) and
  one line per worker (its run, what it is doing, a bar, the loss);
- elsewhere (a log file, CI), instead of the block, one progress line every LINE_EVERY seconds while anything moves.
While the view is open, log records of the command's own process are printed through it, so they never tear the
live block. `quiet_libraries` keeps the libraries' informational chatter out of the console.

What this module does not hold: what the workers do (execute.py) or where they run (harness/executors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TextIO

from harness.progress import RunCost, WorkerStatus

LINE_EVERY = 30.0  # seconds between two progress lines when the output is not a terminal
REDRAW_EVERY = 0.2  # seconds between two redraws of the live block
BAR_WIDTH = 20
ETA_AFTER = 5.0  # seconds of measured work before an ETA is shown


def quiet_libraries() -> None:
    """Keeps the libraries' informational chatter (dtype casts, deprecations) out of the progress output without
    importing them (diffusers alone takes seconds): they read their verbosity from the environment when they load."""
    import warnings

    for library in ("diffusers", "transformers"):
        if library in sys.modules:  # already loaded (a notebook, a test): its setting is no longer read
            sys.modules[library].utils.logging.set_verbosity_error()
        else:
            os.environ.setdefault(f"{library.upper()}_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(logging.INFO)
    for name in ("huggingface_hub", "timm", "open_clip", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = int(width * min(done / total, 1.0)) if total > 0 else 0
    return "█" * filled + "░" * (width - filled)


class StudyView:
    """The progress of one study, drawn on `stream`. `update` takes a worker's status (call it as often as
    statuses arrive); `print` adds a permanent line; `tick` redraws when due (call it while waiting)."""

    def __init__(self, total_runs: int, costs: Mapping[str, RunCost], stream: TextIO | None = None,
                 live: bool | None = None, clock: Callable[[], float] = time.time):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total_runs = total_runs
        self.total_cost = sum(c.total for c in costs.values())
        self.clock = clock
        self.started = clock()
        self.workers: dict[str, WorkerStatus] = {}
        self.gone: set[str] = set()  # workers that ended: left out of the live block
        self.runs_done = 0
        self._index: dict[str, int] = {}  # run key -> its number in the [i/N] lines
        self._announced: set[str] = set()
        self._finished_seen: dict[str, int] = {}
        self._messages_seen: dict[str, int] = {}
        self._work_started: float | None = None
        self._drawn = 0
        self._last_draw = 0.0
        self._last_line = clock()
        self._moved = False  # a status arrived since the last progress line

    # -- input ----------------------------------------------------------------------------------------------------

    def update(self, status: WorkerStatus) -> None:
        worker = status.worker
        previous = self.workers.get(worker)
        if previous is not None and (previous.pid, previous.host) != (status.pid, status.host):
            self._finished_seen[worker] = self._messages_seen[worker] = 0  # the same worker started again
        self.workers[worker] = status
        self._moved = True
        self._print_messages(status)
        for entry in status.finished[self._finished_seen.get(worker, 0):]:
            self.runs_done += 1
            self.print(f"[{self._number(entry['run_key'])}/{self.total_runs}] {entry['summary']}")
        self._finished_seen[worker] = len(status.finished)
        if status.run_key and status.activity not in ("", "starting") and status.run_key not in self._announced:
            self._announced.add(status.run_key)
            self._work_started = self._work_started or self.clock()
            self.print(f"[{self._number(status.run_key)}/{self.total_runs}] {status.run_key} {status.label}: "
                       f"started{self._where(status)}")
        if status.state == "finished":
            self.gone.add(worker)
        self.tick()

    def worker_gone(self, worker: str) -> None:
        self.gone.add(worker)
        self.tick(force=True)

    def _print_messages(self, status: WorkerStatus) -> None:
        new = status.message_count - self._messages_seen.get(status.worker, 0)
        if new > 0:
            prefix = f"{status.worker}: " if len(self.workers) > 1 else ""
            for text in status.messages[-new:]:
                self.print(prefix + text)
        self._messages_seen[status.worker] = status.message_count

    def _number(self, run_key: str) -> int:
        return self._index.setdefault(run_key, len(self._index) + 1)

    def _where(self, status: WorkerStatus) -> str:
        return f" on {status.worker}" if len(self.workers) > 1 else ""

    # -- output ---------------------------------------------------------------------------------------------------

    def print(self, text: str) -> None:
        """A permanent line (above the live block)."""
        self._clear()
        self.stream.write(text + "\n")
        self._draw()

    def tick(self, force: bool = False) -> None:
        now = self.clock()
        if self.live:
            if force or now - self._last_draw >= REDRAW_EVERY:
                self._clear()
                self._draw()
            return
        if now - self._last_line >= LINE_EVERY:
            if self._moved:
                self.stream.write(self.progress_line() + "\n")
                self.stream.flush()
                self._moved = False
            self._last_line = now

    def close(self) -> None:
        self._clear()
        self.stream.flush()

    def study_line(self) -> str:
        now = self.clock()
        parts = [f"{self.runs_done}/{self.total_runs} runs done", f"{duration(now - self.started)} spent"]
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        return ", ".join(parts)

    def worker_line(self, status: WorkerStatus, bars: bool = True) -> str:
        name = (f"{status.worker:<7} " if bars else f"{status.worker}: ") if len(self.workers) > 1 else ""
        if not status.activity:
            return f"{name}idle"
        text = f"{name}{status.run_key + ' ' if status.run_key else ''}{status.activity}"
        if status.total:
            text += f" {progress_bar(status.done, status.total)}" if bars else ""
            text += f" {status.done}/{status.total}"
            text += f" {status.unit}" if status.unit and status.unit != "step" else ""
        if status.loss is not None and status.activity == "train":
            text += f" loss {status.loss:.4f}"
        return text

    def progress_line(self) -> str:
        active = [self.worker_line(s, bars=False) for w, s in self.workers.items() if w not in self.gone and s.activity]
        return "  .. " + "; ".join([self.study_line(), *active])

    def eta(self) -> float | None:
        """Seconds left for the runs, from the work done so far in this invocation (None until measurable)."""
        if self._work_started is None:
            return None
        elapsed = self.clock() - self._work_started
        work = sum(s.work for s in self.workers.values())
        if elapsed < ETA_AFTER or work <= 0:
            return None
        progressed = sum(s.settled + s.run_progress for s in self.workers.values())
        return max(self.total_cost - progressed, 0.0) / (work / elapsed)

    def _block(self) -> list[str]:
        width = shutil.get_terminal_size((120, 24)).columns - 1
        lines = [f"  {self.study_line()}"]
        lines += [f"  {self.worker_line(s)}" for w, s in self.workers.items() if w not in self.gone]
        return [line[:width] for line in lines]

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\x1b[1A\x1b[2K" * self._drawn)
            self._drawn = 0

    def _draw(self) -> None:
        if not self.live:
            self.stream.flush()
            return
        lines = self._block()
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)
        self._last_draw = self.clock()

    # -- log records of this process ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def showing_logs(self) -> Iterator[StudyView]:
        """While open, the root logger's records are printed through the view."""
        root = logging.getLogger()
        saved = root.handlers[:]
        handler = _ViewHandler(self)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.handlers = [handler]
        try:
            yield self
        finally:
            root.handlers = saved
            self.close()


class _ViewHandler(logging.Handler):
    def __init__(self, view: StudyView):
        super().__init__()
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.view.print(self.format(record))
        except Exception:  # a log line must never stop the study
            self.handleError(record)
