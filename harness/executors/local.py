"""The local executor: a study's workers on this machine.

- Several workers: one process per GPU (execution.gpus, or every visible GPU; execution.workers asks for another
  number, e.g. two small runs per GPU or CPU processes), started with `spawn` and pinned to its GPU with
  CUDA_VISIBLE_DEVICES before torch is imported there.
- One worker (one GPU, no GPU, or --device): it runs in the command's own process, exactly as a study always ran.

The command's process starts the workers, prepares while they import the libraries and load the model (on the first
worker's device, then frees it), puts every selected run on one queue (longest first, except that the workers
taking runs during the preparation get runs without class images first; each run is taken once per invocation, and
the run store's lock keeps a run that another invocation holds from being worked on twice), draws one view of the
workers' status files, and collects at the end. The workers on the other GPUs take runs at once; those on the
preparing GPU too when it has room for both without changing a sampling batch (`room_to_share`), else after the
preparation.
A worker that dies (killed, out of host memory, a crash) has its run recorded as failed with the reason and the
path of its log; a new worker takes its place, and the next invocation resumes the run from its last snapshot or
checkpoint. Ctrl-C or SIGTERM stops every worker where it is (every file is written atomically), waits for them,
and ends the command with status 130; a worker whose parent dies stops too.

What this module does not hold: the worker process's side (local_worker.py), what a worker does with a run
(execute.py), the view (console.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.executors import ExecutionError, Executor, StudyJob, StudyOutcome
from harness.executors.local_worker import Slot, WorkerOrder, worker_main

if TYPE_CHECKING:
    from harness.config import ExecutionSpec, Protocol
    from harness.console import StudyView
    from harness.grid import RunSpec
    from harness.plan import Plan
    from harness.progress import WorkerStatus
    from harness.timings import Timings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
STOP_GRACE_SECONDS = 30.0  # after Ctrl-C, how long workers get to stop by themselves before SIGTERM, then SIGKILL
WORKERS_DIR = ".workers"  # under runs_dir: each invocation's worker status files and logs


def worker_slots(spec: ExecutionSpec, device: str | None) -> list[Slot]:
    """The workers of a study on this machine, from execution.gpus / execution.workers, or --device."""
    if device is not None:
        if spec.gpus is not None or (spec.workers or 1) > 1:
            raise ExecutionError("--device runs one worker in this process on that device; leave out --gpus and "
                                 "--workers (and execution.gpus / execution.workers), or leave out --device.")
        return [Slot(device.replace(":", ""), device)]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = list(spec.gpus) if spec.gpus is not None else list(range(count))
    unknown = [g for g in gpus if g >= count]
    if unknown:
        shown = f"GPUs 0-{count - 1}" if count > 1 else ("GPU 0" if count else "no GPU")
        raise ExecutionError(f"execution.gpus (--gpus): GPU {', '.join(map(str, unknown))} does not exist; this "
                             f"machine shows {shown} (nvidia-smi lists them; CUDA_VISIBLE_DEVICES renumbers them).")
    workers = spec.workers or max(len(gpus), 1)
    if not gpus:
        return [Slot("cpu" if workers == 1 else f"cpu{i}", "cpu") for i in range(workers)]
    if workers == 1:
        return [Slot(f"gpu{gpus[0]}", f"cuda:{gpus[0]}" if spec.gpus is not None else "cuda")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    chosen = [gpus[i % len(gpus)] for i in range(workers)]
    names = [f"gpu{g}" if chosen.count(g) == 1 else f"gpu{g}.{chosen[:i].count(g) + 1}"
             for i, g in enumerate(chosen)]
    return [Slot(name, "cuda:0", ids[g]) for name, g in zip(names, chosen, strict=True)]


class LocalExecutor(Executor):
    name = "local"

    def describe(self, plan: Plan, runs: tuple[RunSpec, ...]) -> list[str]:
        spec = plan.protocol.execution
        if spec.gpus is not None:
            where = f"GPUs {', '.join(map(str, spec.gpus))}"
        else:
            where = "every visible GPU (in this process when there is one GPU or none)"
        workers = f"{spec.workers} worker(s) on {where}" if spec.workers else f"one worker per GPU on {where}"
        return [f"Execution (local): {workers}; runs are taken longest first: "
                + ", ".join(r.run_key for r in runs)]

    def run(self, job: StudyJob) -> StudyOutcome:
        slots = worker_slots(job.plan.protocol.execution, job.device)
        if len(slots) == 1:
            return run_in_process(job, slots[0], explicit=job.device is not None
                                  or job.plan.protocol.execution.gpus is not None)
        return run_workers(job, slots)


EXECUTOR = LocalExecutor()


# --------------------------------------------------------------------------------------------------------------
# One worker, in this process


def _view(job: StudyJob) -> StudyView:
    from harness.console import StudyView
    from harness.progress import run_costs

    return StudyView(len(job.runs), run_costs(job.plan.protocol, job.runs))


def _header(protocol: Protocol, runs: int, where: str) -> str:
    from harness.backends import backend_of

    tiny = "  [tiny random model: pipeline check only]" if backend_of(protocol.model).random_weights else ""
    return f"{protocol.name}: {runs} run(s) on {where}{tiny}"


def run_in_process(job: StudyJob, slot: Slot, explicit: bool) -> StudyOutcome:
    from harness.collect import collect
    from harness.execute import RunQueue, work
    from harness.prepare import prepare
    from harness.progress import Reporter, reporting
    from harness.study import Study

    view = _view(job)
    protocol = job.plan.protocol
    reporter = Reporter(slot.name, slot.device, publish=view.update)
    study = Study.open(protocol, slot.device if explicit else None, reporter)
    with view.showing_logs(), reporting(reporter):
        view.print(_header(protocol, len(job.runs), str(study.device)))
        prepare(job.plan, study, job.runs)
        work(study, RunQueue(job.runs))
        results, report = collect(job.plan, study)
        reporter.close()
    return StudyOutcome(results, report, study.timings)


# --------------------------------------------------------------------------------------------------------------
# Several workers, in their own processes


def run_workers(job: StudyJob, slots: list[Slot]) -> StudyOutcome:
    from harness.collect import collect
    from harness.prepare import prepare
    from harness.progress import Reporter, reporting
    from harness.study import Study

    protocol = job.plan.protocol
    view = _view(job)
    first_gpu = next((s.visible for s in slots if s.visible is not None), None)
    parent_device = "cpu" if first_gpu is None else f"cuda:{_visible_index(first_gpu)}"
    folder = Path(protocol.output.runs_dir) / WORKERS_DIR / f"{socket.gethostname()}-{os.getpid()}"
    resolutions = {r.train.resolution for r in job.runs}
    shared = first_gpu is not None and room_to_share(_free_memory(parent_device), resolutions)
    if shared:
        log.info("the worker on GPU %s takes runs while the study is prepared on it (room for both)", first_gpu)
    pool = WorkerPool(job, slots, folder, view, preparing=first_gpu, shared=shared)

    def show_preparation(status: WorkerStatus) -> None:
        view.update(status)
        pool.poll(every=POLL_SECONDS)  # the workers that already run, while this process prepares

    reporter = Reporter("prepare", parent_device, publish=show_preparation)
    study = Study.open(protocol, parent_device, reporter)
    with view.showing_logs(), reporting(reporter), _terminate_as_interrupt():
        view.print(_header(protocol, len(job.runs), f"{len(slots)} workers ({', '.join(s.name for s in slots)})"))
        try:
            # The workers start now and load the model while this process prepares. Those on the other GPUs then
            # take runs at once (runs without class images first: a run that needs a class-image pool waits on the
            # pool's lock until it is grown); the preparing GPU's own workers too when it has room for both
            # (`shared`), else they wait until preparation is done.
            pool.start_all()
            prepare(job.plan, study, job.runs)
            study.release_models()  # the GPU goes to its workers
            reporter.close()
            pool.preparation_done()
            pool.run()
        except BaseException:
            pool.stop()  # Ctrl-C, or preparation failed: no worker outlives the command
            raise
        finally:
            pool.close()
        workers = pool.timings()
        study.timings.add(workers.seconds, workers.cpu_seconds, workers.work)
        study.reporter = Reporter("collect", "cpu", publish=view.update)
        results, report = collect(job.plan, study)
        study.reporter.close()
    if pool.clean:
        _remove_folder(folder)
    return StudyOutcome(results, report, study.timings)


def _visible_index(visible: str) -> int:
    """The index in this process of the GPU a worker sees as its only one."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in listed.split(",")] if listed else None
    return ids.index(visible) if ids else int(visible)


def _remove_folder(folder: Path) -> None:
    for path in folder.glob("*"):
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


class WorkerPool:
    """The worker processes of one invocation, the queue they share, and what the view learns from them."""

    def __init__(self, job: StudyJob, slots: list[Slot], folder: Path, view: StudyView, preparing: str | None,
                 shared: bool = False):
        import multiprocessing

        self.job = job
        self.slots = slots
        self.folder = folder
        self.view = view
        self.preparing = preparing  # CUDA_VISIBLE_DEVICES id of the GPU this process prepares on (None: the CPU)
        self.shared = shared  # the preparing GPU's workers take runs during the preparation too
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA starts in the child
        self.queue = self.context.Queue()
        early = sum(not self.waits_for_preparation(s) for s in slots)
        for run in preparation_order(job.runs, early):
            self.queue.put(run.run_key)
        self.prepared = self.context.Event()
        self.processes: dict[str, Any] = {}
        self.slot_of: dict[str, Slot] = {}
        self.seen: dict[str, float] = {}
        self.started = 0
        self.polled = 0.0  # time.monotonic() of the last poll
        self.clean = True  # no worker died: the status folder can go

    def start_all(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for slot in self.slots:
            self.start(slot)

    def waits_for_preparation(self, slot: Slot) -> bool:
        """Whether a worker takes runs only once the preparation is done: on the device this process prepares on,
        unless that GPU has room for both; CPU workers always (they would share the cores)."""
        return slot.visible == self.preparing and not self.shared

    def preparation_done(self) -> None:
        """Lets the workers on the preparing device take runs."""
        self.prepared.set()

    def run(self) -> None:
        """Watches the workers until every one has ended, replacing those that die during a run."""
        while self.processes:
            time.sleep(POLL_SECONDS)
            self.poll()
            for name, process in list(self.processes.items()):
                if not process.is_alive():
                    process.join()
                    del self.processes[name]
                    self.ended(name, process)
            self.view.tick()

    def start(self, slot: Slot) -> None:
        self.started += 1
        name = slot.name if self.started <= len(self.slots) else f"{slot.name}#{self.started - len(self.slots)}"
        self.queue.put(None)  # this worker's end of the queue
        order = WorkerOrder(protocol=self.job.plan.protocol, runs=self.job.runs, slot=replace(slot, name=name),
                            status_path=self.folder / f"{name}.json", log_path=self.folder / f"{name}.log",
                            after_preparation=self.waits_for_preparation(slot))
        process = self.context.Process(target=worker_main, args=(order, self.queue, self.prepared),
                                       name=f"harness-{name}", daemon=False)
        with _environment(**worker_environment(slot, len(self.slots))):
            process.start()
        self.processes[name] = process
        self.slot_of[name] = order.slot

    def status_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def poll(self, every: float = 0.0) -> None:
        """Passes on to the view what each worker published since the last look (at most every `every` s)."""
        from harness.progress import read_status

        now = time.monotonic()
        if now - self.polled < every:
            return
        self.polled = now
        for name in self.slot_of:
            status = read_status(self.status_path(name))
            if status is not None and status.updated != self.seen.get(name):
                self.seen[name] = status.updated
                self.view.update(status)

    def ended(self, name: str, process: Any) -> None:
        from harness.progress import read_status

        self.poll()
        status = read_status(self.status_path(name))
        self.view.worker_gone(name)
        if process.exitcode == 0:
            return
        self.clean = False
        reason = _exit_reason(process.exitcode)
        log_path = self.folder / f"{name}.log"
        if status is not None and status.run_key:
            self.record_death(status, name, reason, log_path)
            self.start(self.slot_of[name])  # the queue may still hold runs
        else:
            self.view.print(f"worker {name} ended before it took a run ({reason}); its log: {log_path}\n"
                            + _tail(log_path))

    def record_death(self, status: WorkerStatus, name: str, reason: str, log_path: Path) -> None:
        """Records the run a dead worker was executing as failed (unless another process has it by now)."""
        from harness.records import ErrorRecord, write_error

        run = next(r for r in self.job.runs if r.run_key == status.run_key)
        message = (f"the worker process on {name} (pid {status.pid}) died ({reason}) during '{status.activity}'; "
                   f"its log: {log_path}. Run the same command again: the run resumes from its last snapshot or "
                   "checkpoint.")
        from harness.store import RunStore

        folder = RunStore(self.job.plan.protocol.output.runs_dir).folder(run)
        lock = folder.try_lock()
        if lock is not None:
            try:
                error = WorkerDiedError(message)
                error.harness_phase = _phase_of(status.activity)  # type: ignore[attr-defined]
                write_error(folder.path, ErrorRecord.of(run.run_key, error))
            finally:
                lock.release()
        self.view.print(f"{run.run_key} FAILED: {message}")

    def timings(self) -> Timings:
        """The phases of every worker, added up."""
        from harness.progress import read_status
        from harness.timings import Timings

        total = Timings()
        for name in self.slot_of:
            status = read_status(self.status_path(name))
            if status is not None:
                total.add(status.timings, status.cpu_timings, status.phase_work)
        return total

    def close(self) -> None:
        self.queue.close()
        self.queue.cancel_join_thread()  # end markers of workers that died stay unread

    def stop(self) -> None:
        """Stops every worker: SIGINT (each stops where it is), then SIGTERM, then SIGKILL for the stragglers."""
        alive = [p for p in self.processes.values() if p.is_alive()]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)
        deadline = time.time() + STOP_GRACE_SECONDS
        for process in alive:
            process.join(max(deadline - time.time(), 0.1))
        for process in alive:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes.clear()


class WorkerDiedError(RuntimeError):
    """A worker process died while it executed a run."""


def _phase_of(activity: str) -> str:
    for word, phase in (("train", "train"), ("sample", "sample"), ("score", "score")):
        if activity.startswith(word):
            return phase
    return "prepare"


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (often the out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {exitcode}"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


# What a training worker may hold beside the preparation on one GPU: SD 1.5 in `fast` mode, compiled, takes 11 GiB
# as nvidia-smi counts it, and sampling a snapshot's images (batch 32, 512 px) up to 20 GiB more for a moment
# (benchmarks/README.md); the worker's CUDA context comes on top.
SHARING_RESERVE_BYTES = 32 * 2**30


def room_to_share(free_bytes: float, resolutions: Iterable[int]) -> bool:
    """Whether the GPU the command prepares on can run a worker during the preparation: when `SHARING_RESERVE_BYTES`
    less free memory leaves every default sampling batch as it is. The batches decide the images bit for bit, so
    sharing changes no result; and a batch still at its largest leaves the worker its room."""
    from harness.sampling import batch_for_memory

    return all(batch_for_memory(free_bytes - SHARING_RESERVE_BYTES, r) == batch_for_memory(free_bytes, r)
               for r in resolutions)


def preparation_order(runs: Iterable[RunSpec], early: int) -> list[RunSpec]:
    """The queue's order: the runs as given (longest first), except that the first `early` runs, those the workers
    that start during the preparation take, are runs without class images where there are such, so they train at
    once instead of waiting for the preparation to grow the class-image pools."""
    from harness.class_images import pool_for

    runs = list(runs)
    first = [r for r in runs if pool_for(r) is None][:early]
    taken = {r.run_key for r in first}
    return [*first, *(r for r in runs if r.run_key not in taken)]


def _free_memory(device: str) -> int:
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free


def worker_environment(slot: Slot, workers: int) -> dict[str, str | None]:
    """The environment a worker process starts with: its GPU pinned, and, when several workers share this
    machine's CPU, idle OpenMP threads that sleep instead of spinning (unless OMP_WAIT_POLICY is set already).

    A spinning thread holds a core another worker's thread needs: with one busy process beside it, a 2-thread toy
    sampling pass measured 0.73 images/s spinning against 1.82 passive on a 2-core machine. Alone, spinning is the
    faster (3.0 against 2.1 images/s), so a single process keeps OpenMP's default. Scheduling only: which thread
    computes what, and so every number, is the same either way."""
    sharing = workers > 1 and not os.environ.get("OMP_WAIT_POLICY")
    return {"CUDA_VISIBLE_DEVICES": slot.visible, "OMP_WAIT_POLICY": "PASSIVE" if sharing else None}


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Environment variables set for a child started inside the block (spawn copies the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the study as Ctrl-C does (workers stopped, status 130)."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
