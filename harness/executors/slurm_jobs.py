"""The callables Slurm runs for a study (pickled by submitit onto the nodes), and the submission that waits for them.

`StudyTask(phase, order)` is a submitit Checkpointable: when Slurm stops a task at its time limit or preempts it,
submitit requeues it with the same arguments, and the phase, which skips what is done, goes on where it stopped.
Every task first checks that its node sees the study's folders, publishes its status into the submission's status
folder (the command draws them), and sends its log records there too.

What this module does not hold: the settings, paths and checks (slurm_settings.py), the phases (prepare, execute,
collect).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from harness.executors import StudyFailedError, StudyJob, StudyOutcome
from harness.executors.slurm_settings import WAIT_POLL_SECONDS, sbatch_parameters, setup_lines

if TYPE_CHECKING:
    from harness.timings import Timings


@dataclass(frozen=True)
class TaskOrder:
    """What every job of one submission needs: the plan, the runs of the array (task i executes runs[i]), where
    statuses go, and the folders the node must see."""

    plan: Any
    selected: tuple[Any, ...]  # the runs of the command (prepare makes what they share)
    runs: tuple[Any, ...]  # the array's
    status_dir: Path
    folders: tuple[Path, ...]


class StudyTask(submitit.helpers.Checkpointable):
    """One phase of the study on a node: prepare, execute (one run of the array) or collect."""

    def __init__(self, phase: str, order: TaskOrder):
        self.phase = phase
        self.order = order

    def __call__(self, index: int | None = None) -> dict[str, Any] | None:
        missing = [str(f) for f in self.order.folders if not Path(f).is_dir()]
        if missing:
            raise FileNotFoundError(f"node {socket.gethostname()} does not see {', '.join(missing)}; these folders "
                                    "must be on a filesystem every node mounts at the same path.")
        from harness.console import quiet_libraries
        from harness.progress import Reporter, file_publisher, forward_logs, reporting
        from harness.study import Study

        quiet_libraries()
        name = self.phase if index is None else f"task{index}"
        reporter = Reporter(name, socket.gethostname(), publish=file_publisher(self.order.status_dir / f"{name}.json"))
        study = Study.open(self.order.plan.protocol, "cpu" if self.phase == "collect" else None, reporter)
        reporter.follow_timings(study.timings)
        forward_logs(reporter)
        with reporting(reporter):
            result = self._phase(study, index)
        reporter.close()
        return result

    def _phase(self, study: Any, index: int | None) -> dict[str, Any] | None:
        plan = self.order.plan
        if self.phase == "prepare":
            from harness.prepare import prepare

            prepare(plan, study, self.order.selected)
            return None
        if self.phase == "execute":
            from harness.execute import RunQueue, work
            from harness.fastpath import expect_study
            from harness.grid import estimate_work

            run = self.order.runs[index]
            expect_study(estimate_work(plan.protocol, [run], {}))  # compile: auto weighs this task's one run
            work(study, RunQueue([run]))
            return None
        from harness.collect import collect

        _add_phase_timings(study.timings, self.order.status_dir, but="collect")
        results, report = collect(plan, study)
        return {"results": str(results), "report": str(report), "timings": dict(study.timings.seconds)}


def _add_phase_timings(timings: Timings, status_dir: Path, but: str) -> None:
    """Adds the phases every task but `but` published to `timings`."""
    from harness.progress import read_status

    for path in sorted(status_dir.glob("*.json")):
        status = read_status(path)
        if status is not None and status.worker != but:
            timings.add(status.timings, status.cpu_timings, status.phase_work)


# --------------------------------------------------------------------------------------------------------------
# The submission, from the command's machine


def _executor(folder: Path, spec: Any, phase: str, name: str, **more: Any) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(job_name=f"{name}-{phase}", setup=setup_lines(spec), **sbatch_parameters(spec, phase),
                               **more)
    return executor


def _submit(what: str, submit: Any) -> Any:
    try:
        return submit()
    except submitit.core.utils.FailedSubmissionError as error:
        from harness.executors import ExecutionError

        raise ExecutionError(f"sbatch refused the {what}: {' '.join(str(error).split())[:600]}") from None


def submit_and_wait(job: StudyJob, submission: Path) -> StudyOutcome:
    """Submits the study's jobs and waits for the collect job, drawing the jobs' progress; with nothing left to
    compute, collects here instead."""
    from harness.collect import collect
    from harness.console import StudyView
    from harness.execute import run_state
    from harness.prepare import references_ready
    from harness.progress import run_costs
    from harness.study import Study, Timings

    plan = job.plan
    protocol, spec = plan.protocol, plan.protocol.execution
    study = Study.open(protocol, "cpu")
    todo = tuple(r for r in job.runs if not run_state(study, study.store.open(r)).complete)
    if not todo and references_ready(study, job.runs):
        print(f"{protocol.name}: every run is complete; collecting here, without a job")
        results, report = collect(plan, study)
        return StudyOutcome(results, report, study.timings)
    status_dir = submission / "status"
    status_dir.mkdir(parents=True, exist_ok=True)
    folders = (Path(protocol.output.runs_dir), Path(protocol.output.cache_dir), status_dir)
    order = TaskOrder(plan=plan, selected=job.runs, runs=todo, status_dir=status_dir, folders=folders)
    view = StudyView(len(todo), run_costs(protocol, todo))
    with view.showing_logs():
        prepare_job = _submit("prepare job", lambda: _executor(submission, spec, "prepare", protocol.name).submit(
            StudyTask("prepare", order)))
        array = []
        if todo:
            array = _submit("job array", lambda: _executor(
                submission, spec, "execute", protocol.name, dependency=f"afterok:{prepare_job.job_id}",
                array_parallelism=spec.slurm_array_parallelism or len(todo)).map_array(
                StudyTask("execute", order), list(range(len(todo)))))
        array_id = array[0].job_id.split("_")[0] if array else None
        collect_job = _submit("collect job", lambda: _executor(
            submission, spec, "collect", protocol.name,
            dependency=f"afterany:{array_id or prepare_job.job_id}").submit(StudyTask("collect", order)))
        ids = (f"prepare {prepare_job.job_id}" + (f", array {array_id} ({len(todo)} task(s))" if array_id else "")
               + f", collect {collect_job.job_id}")
        view.print(f"{protocol.name}: {len(todo)} run(s) to execute as Slurm jobs: {ids}; logs: {submission}")
        try:
            _wait(view, status_dir, prepare_job, collect_job)
        except KeyboardInterrupt:
            view.print(f"stopped waiting; the jobs go on (squeue shows them, scancel stops them). Job "
                       f"{collect_job.job_id} writes the CSVs and the report once the runs end; --report-only "
                       "rebuilds them at any time.")
            raise
    try:
        result = collect_job.result()
    except Exception as error:  # submitit raises the job's own error with its traceback, or that it never finished
        raise StudyFailedError(f"the collect job {collect_job.job_id} failed: {str(error)[-1500:]}\nIts log: "
                               f"{collect_job.paths.stderr}. Rebuild the CSVs and the report with --report-only."
                               ) from None
    return StudyOutcome(Path(result["results"]), Path(result["report"]), Timings(dict(result["timings"])))


def _wait(view: Any, status_dir: Path, prepare_job: Any, collect_job: Any) -> None:
    from harness.progress import read_status

    seen: dict[Path, float] = {}
    prepare_reported = False
    while True:
        for path in sorted(status_dir.glob("*.json")):
            status = read_status(path)
            if status is not None and seen.get(path) != status.updated:
                seen[path] = status.updated
                view.update(status)
        if not prepare_reported and prepare_job.done():
            prepare_reported = True
            error = prepare_job.exception()
            if error is not None:
                view.print(f"the prepare job {prepare_job.job_id} failed, so no run starts: "
                           f"{str(error).strip().splitlines()[-1][:500]}\nIts log: {prepare_job.paths.stderr}")
        if collect_job.done():
            return
        view.tick()
        time.sleep(WAIT_POLL_SECONDS)
