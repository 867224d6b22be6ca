"""Execute: one run at a time, on any worker, doing only what is missing.

`execute_run` trains a run and samples and scores its snapshots, skipping what is on disk after checking it: a
damaged score record or train.json, a missing or damaged image, is named in the log and made again. An image needs
the model at its step, so the run trains again up to that step; the trainer's randomness is a function of (seed,
step) and images render in aligned batches, so the image comes out as it was. `run_state` says what a run still
needs without doing it.

`work` is the loop every executor's workers run: it takes runs from a queue, skips a run another process holds
(and comes back to wait for it once the queue is empty: a run held elsewhere is not a failure), takes each run at
most once per invocation, records a failing run in its folder (error.json) and goes on, and reports as it goes.

What this module does not hold: where workers run (harness/executors), shared preparation (prepare.py), the CSVs and
the report (collect.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.backbones import BackboneUnavailableError
from harness.backends import ModelUnavailableError
from harness.class_images import pool_for
from harness.evaluator import samples_record, write_record
from harness.grid import RunSpec
from harness.prepare import grow_pool
from harness.progress import run_costs
from harness.records import (
    ERROR_FILE,
    TRAIN_STAGE,
    ErrorRecord,
    failing_phase,
    read_train,
    usable_scores,
    usable_train,
    write_error,
)
from harness.sampling import eval_requests, generate, missing, read_samples, sidecar
from harness.store import RunFolder
from harness.study import Study

if TYPE_CHECKING:
    import torch

    from harness.config import ModelSpec
    from harness.models import Components

log = logging.getLogger(__name__)

TRAINED, DONE, ELSEWHERE, FAILED = "trained", "done", "elsewhere", "failed"  # outcomes of a run in one invocation


@dataclass(frozen=True)
class RunState:
    """What a run folder holds: whether training finished, and per snapshot step what is still to do."""

    trained: bool
    scored: tuple[int, ...]  # images and scores whole
    unscored: tuple[int, ...]  # images whole, scores missing or damaged
    to_sample: tuple[int, ...]  # images missing or damaged (the model is needed at that step)

    @property
    def complete(self) -> bool:
        return self.trained and not self.unscored and not self.to_sample


def run_state(study: Study, folder: RunFolder) -> RunState:
    """Checks a run folder; damaged files are removed on the way (named in the log), so they count as missing."""
    run = folder.spec
    trained = folder.is_done(TRAIN_STAGE) and usable_train(folder.path) is not None
    if not trained:
        folder.clear(TRAIN_STAGE)  # a marker whose train.json is gone: train again to write it
    requests = eval_requests(run.subject, study.protocol.eval)
    scored, unscored, to_sample = [], [], []
    for step in run.snapshot_steps:
        if missing(study.snapshot_dir(folder, step), requests):
            to_sample.append(step)
        elif usable_scores(study.snapshot_record_path(folder, step)) is None:
            unscored.append(step)
        else:
            scored.append(step)
    return RunState(trained, tuple(scored), tuple(unscored), tuple(to_sample))


# --------------------------------------------------------------------------------------------------------------
# One run


def score_snapshot(study: Study, folder: RunFolder, step: int, sampling_seconds: float) -> None:
    run = folder.spec
    requests = eval_requests(run.subject, study.protocol.eval)
    study.reporter.activity(f"score step {step}")
    with study.timings.phase("scoring"), failing_phase("score"):
        record = samples_record(study.scorer(), read_samples(study.snapshot_dir(folder, step), requests),
                                study.real_paths(run.subject), run.subject, kind="snapshot",
                                protocol=study.protocol.name, run_key=run.run_key, step=step,
                                sampler=study.sampler_json(run.train.resolution),
                                seconds={"sampling": sampling_seconds})
        write_record(study.snapshot_record_path(folder, step), record)


def snapshot_callback(study: Study, folder: RunFolder) -> Callable[[int, torch.nn.Module, Components], None]:
    run = folder.spec

    def on_snapshot(step: int, unet: torch.nn.Module, components: Components) -> None:
        started = time.perf_counter()
        with study.timings.phase("sampling"), failing_phase("sample"):
            generate(components, eval_requests(run.subject, study.protocol.eval), study.snapshot_dir(folder, step),
                     study.settings(run.train.resolution), study.device, study.protocol.model.dtype,
                     meta={"run_key": run.run_key, "step": step, "model": study.protocol.model.id},
                     batch_size=study.protocol.eval.batch_size, unet=unet, progress=f"sample step {step}",
                     compile=study.protocol.eval.compile)
        score_snapshot(study, folder, step, time.perf_counter() - started)

    return on_snapshot


def step_callback(study: Study) -> Callable[[int, int, float | None], None]:
    return study.reporter.train_step


def training_data(study: Study, run: RunSpec, components: Components):
    pool = pool_for(run)
    class_paths = None
    if pool is not None:
        class_paths = grow_pool(study, pool, run.train.num_class_images)
    from harness.caches import build_training_data
    from harness.trainer import make_method

    return build_training_data(
        components, study.instance_paths(run.subject, run.train.resolution), run.subject.instance_text,
        run.train.resolution, study.cache_dir, study.device,
        class_paths=class_paths, class_prompt=run.subject.class_text if pool is not None else None,
        encoded_in_step={kind for kind in ("instance", "class") if make_method(run).encodes_in_step(kind)},
    )


def needs_model(study: Study, run: RunSpec) -> bool:
    """A guess, from file names only (nothing is checked or removed: another process may hold the run), whether
    executing `run` will load the model: it has not finished training, or a snapshot lacks an image."""
    folder = study.store.folder(run)
    if not folder.is_done(TRAIN_STAGE):
        return True
    requests = eval_requests(run.subject, study.protocol.eval)
    return any(not sidecar(study.snapshot_dir(folder, step) / f"{r.stem}.png").is_file()
               for step in run.snapshot_steps for r in requests)


def execute_run(study: Study, run: RunSpec) -> tuple[str, str]:
    """Trains and scores one run, doing only what is missing; returns (outcome, one-line summary). The caller
    holds the run's lock."""
    folder = study.store.open(run)
    folder.file(ERROR_FILE).unlink(missing_ok=True)
    folder.remove_leftovers()  # of a process killed while writing
    state = run_state(study, folder)
    for step in state.unscored:  # images whole but not scored (interrupted while scoring): no model needed
        score_snapshot(study, folder, step, 0.0)
    if state.to_sample or not state.trained:
        import torch  # only here: a run that is done loads neither torch nor the trainer

        study.reporter.activity("load model")
        with study.timings.phase("load model"), failing_phase("prepare"):
            # fp32 master weights as published, restored in place into the last run's modules when it can
            components = training_components(run.model)
        study.reporter.activity("caches (latents, text)")
        with study.timings.phase("caches (latents, text)"), failing_phase("prepare"):
            data = training_data(study, run, components)
        study.reporter.activity("train (starting)")  # the first step loads kernels (and may time cuDNN's)
        with study.timings.phase("training"), failing_phase("train"):
            train(run, folder, components, data, snapshot_callback(study, folder), study.device,
                  pending_snapshots=state.to_sample, on_step=step_callback(study))
        del components, data
        if study.device.type == "cuda":
            torch.cuda.empty_cache()
        outcome = TRAINED
        text = f"trained{'' if not state.to_sample else f', sampled steps {list(state.to_sample)}'}"
    else:
        outcome = DONE
        text = "already done" if not state.unscored else f"scored steps {list(state.unscored)}"
    result = read_train(folder.path)
    sec = f"{result.seconds_per_step:.3f} s/step" if result.seconds_per_step else "-"
    return outcome, f"{run.run_key} {run_label(run)}: {text} ({sec})"


def train(*args: Any, **kwargs: Any) -> Any:
    """The trainer (harness.trainer.train), imported on first use: torch and diffusers load only when a run trains."""
    from harness.trainer import train as train_run

    return train_run(*args, **kwargs)


def training_components(model: ModelSpec) -> Components:
    """The model's float32 components for training (harness.trainer.reuse), imported on first use."""
    from harness.trainer import training_components as reused

    return reused(model)


def record_failure(study: Study, run: RunSpec, error: BaseException) -> str:
    folder = study.store.folder(run)  # not open(): the failure may be that the folder holds another run
    folder.path.mkdir(parents=True, exist_ok=True)
    write_error(folder.path, ErrorRecord.of(run.run_key, error))
    return f"{run.run_key} FAILED: {type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------------------------
# The worker loop


class RunQueue:
    """The runs a worker may take, each handed out once. Executors with several workers give each worker a view
    of one shared queue (`take` returns None when it is empty)."""

    def __init__(self, runs: Iterable[RunSpec]):
        self._runs = list(runs)

    def take(self) -> RunSpec | None:
        return self._runs.pop(0) if self._runs else None


def run_label(run: RunSpec) -> str:
    return f"{run.subject.name} {dict(run.varied)}"


def work(study: Study, queue: RunQueue) -> None:
    """Executes the runs of `queue` one by one; runs another process holds are done last, after waiting for
    them (they are usually finished by then, and then only reported)."""
    costs = {}
    held_elsewhere: list[RunSpec] = []
    while (run := queue.take()) is not None:
        costs.setdefault(run.run_key, run_costs(study.protocol, [run])[run.run_key])
        lock = study.store.folder(run).try_lock()
        if lock is None:
            held_elsewhere.append(run)
            continue
        try:
            attempt(study, run, costs[run.run_key])
        finally:
            lock.release()
    for run in held_elsewhere:
        folder = study.store.folder(run)
        study.reporter.start_run(run.run_key, run_label(run), costs[run.run_key])
        study.reporter.waiting(f"waiting for run {run.run_key}: another process is running it")
        with folder.lock(timeout=-1):
            attempt(study, run, costs[run.run_key], held=True)


def attempt(study: Study, run: RunSpec, cost, held: bool = False) -> str:
    """Executes one run (its lock held); a failure is recorded and reported, never raised (Ctrl-C is)."""
    study.reporter.start_run(run.run_key, run_label(run), cost)
    try:
        outcome, summary = execute_run(study, run)
    except (ModelUnavailableError, BackboneUnavailableError):
        raise  # the same for every run: a setup error, reported with its ways out (exit status 2)
    except Exception as error:  # one failing run (out of memory included) must not stop the others
        log.debug("run %s failed", run.run_key, exc_info=True)
        outcome, summary = FAILED, record_failure(study, run, error)
    if held and outcome == DONE:
        outcome, summary = ELSEWHERE, f"{run.run_key} {run_label(run)}: done by another process"
    study.reporter.finish_run(run.run_key, outcome, summary)
    return outcome
