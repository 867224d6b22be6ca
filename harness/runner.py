"""Runs a protocol end to end: prepare what the runs share, train and score each run, then results and report.

The flow: plan -> prepare (instance images, class-image pools, evaluation backbones, the real-image and
base-model reference rows) -> for each run: train, handing every pending snapshot to sampling + scoring -> CSVs ->
report. Every step skips what is already on disk, so running the same protocol again trains, generates and embeds
nothing new and only rebuilds the CSVs and the report. One failing run is recorded in its folder (error.json) and
the others go on; the exit status says whether any failed.

What this module does not hold: how any stage computes (each lives in its own module).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.backends import backend_of, load_components
from harness.caches import build_training_data
from harness.class_images import ensure_pool, pool_for
from harness.config import Protocol, SubjectSpec
from harness.data import folder_digest, list_instance_files, prepare_instances
from harness.embedders import EmbeddingCache, make_embedders
from harness.evaluator import Scorer, real_images_record, record_name, samples_record, write_record
from harness.fastpath import expect_study
from harness.grid import RunSpec
from harness.metrics import roles_for
from harness.models import Components
from harness.plan import Plan, make_plan
from harness.records import (
    ERROR_FILE,
    TRAIN_STAGE,
    ErrorRecord,
    failing_phase,
    read_train,
    write_error,
)
from harness.records import (
    snapshot_dir as record_snapshot_dir,
)
from harness.sampling import (
    SamplerSettings,
    base_samples_key,
    eval_requests,
    generate,
    missing,
    read_samples,
    sampler_settings,
    samples_key,
)
from harness.store import RunFolder, RunStore
from harness.timings import Timings
from harness.trainer import TrainingOutOfMemoryError, train, training_components

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# What the runs share


@dataclass
class Shared:
    """What every run of a protocol uses, prepared once."""

    protocol: Protocol
    device: torch.device
    store: RunStore
    cache_dir: Path
    timings: Timings
    scorer: Scorer | None = None
    instances: dict[tuple[str, int], list[Path]] = field(default_factory=dict)  # (subject, resolution) -> PNGs
    _base: Components | None = None

    def base_components(self) -> Components:
        """The untrained model, loaded once for class images and base-model samples."""
        if self._base is None:
            with self.timings.phase("load model"):
                self._base = load_components(self.protocol.model, dtype=self.inference_dtype)
        return self._base

    @property
    def inference_dtype(self) -> torch.dtype | None:
        return None if self.device.type == "cuda" else torch.float32

    def real_paths(self, subject: SubjectSpec) -> list[Path]:
        return list_instance_files(subject.instance_dir)

    def settings(self, resolution: int) -> SamplerSettings:
        return sampler_settings(self.protocol.eval, resolution)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(plan: Plan, shared: Shared, runs: list[RunSpec]) -> None:
    """Instance images, class-image pools, backbones and reference rows, each skipped when already on disk."""
    protocol = plan.protocol
    with shared.timings.phase("prepare instance images"):
        for run in runs:
            key = (run.subject.name, run.train.resolution)
            if key not in shared.instances:
                prepared = prepare_instances(run.subject, run.train.resolution, shared.cache_dir)
                shared.instances[key] = [p.path for p in prepared]
    with shared.timings.phase("class images"):
        for pool, n in plan.pools.items():
            if any(pool_for(r) == pool for r in runs):
                ensure_pool(pool, n, shared.cache_dir, shared.base_components, shared.device)
    with shared.timings.phase("load backbones"):
        embedders = make_embedders(protocol.eval.backbones, shared.device, roles=roles_for(protocol.eval.metrics))
        shared.scorer = Scorer(embedders, EmbeddingCache(shared.cache_dir), protocol.eval)
    for subject, resolution in sorted({(r.subject, r.train.resolution) for r in runs}, key=lambda x: x[0].name):
        score_real_images(shared, subject)
        score_base_model(shared, subject, resolution)


def real_record_path(shared: Shared, subject: SubjectSpec) -> Path:
    digest = folder_digest(subject.instance_dir)[:12]
    return shared.cache_dir / "references" / f"real-{digest}" / record_name(shared.protocol.eval)


def score_real_images(shared: Shared, subject: SubjectSpec) -> Path:
    path = real_record_path(shared, subject)
    if path.is_file():
        return path
    with shared.timings.phase("scoring"):
        record = real_images_record(shared.scorer, shared.real_paths(subject), subject, shared.protocol.name)
        write_record(path, record)
    return path


def base_samples_dir(shared: Shared, subject: SubjectSpec, resolution: int) -> Path:
    key = base_samples_key(shared.protocol.model, subject, shared.protocol.eval, shared.settings(resolution))
    return shared.cache_dir / "base_samples" / key


def score_base_model(shared: Shared, subject: SubjectSpec, resolution: int) -> Path:
    """Step 0: the untrained model on the same prompts and seeds as every snapshot, generated once."""
    folder = base_samples_dir(shared, subject, resolution)
    path = folder / record_name(shared.protocol.eval)
    if path.is_file():
        return path
    settings = shared.settings(resolution)
    requests = eval_requests(subject, shared.protocol.eval)
    started = time.perf_counter()
    if missing(folder, requests):
        with shared.timings.phase("sampling"):
            generate(shared.base_components(), requests, folder, settings, shared.device, shared.protocol.model.dtype,
                     meta={"run_key": None, "step": 0, "model": shared.protocol.model.id},
                     batch_size=shared.protocol.eval.batch_size, progress=f"base model {subject.name}")
    seconds = {"sampling": time.perf_counter() - started}
    with shared.timings.phase("scoring"):
        record = samples_record(shared.scorer, read_samples(folder, requests), shared.real_paths(subject), subject,
                                kind="base_model", protocol=shared.protocol.name, run_key=None, step=0,
                                sampler=_sampler_json(settings), seconds=seconds)
        write_record(path, record)
    return path


def _sampler_json(settings: SamplerSettings) -> dict[str, Any]:
    return {"name": settings.sampler, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
            "resolution": settings.resolution}


# --------------------------------------------------------------------------------------------------------------
# One run


def snapshot_dir(shared: Shared, folder: RunFolder, step: int) -> Path:
    run = folder.spec
    settings = shared.settings(run.train.resolution)
    return record_snapshot_dir(folder.path, samples_key(run.subject, shared.protocol.eval, settings), step)


def snapshot_record_path(shared: Shared, folder: RunFolder, step: int) -> Path:
    return snapshot_dir(shared, folder, step) / record_name(shared.protocol.eval)


def score_snapshot(shared: Shared, folder: RunFolder, step: int, sampling_seconds: float) -> None:
    run = folder.spec
    out = snapshot_dir(shared, folder, step)
    requests = eval_requests(run.subject, shared.protocol.eval)
    with shared.timings.phase("scoring"), failing_phase("score"):
        record = samples_record(shared.scorer, read_samples(out, requests), shared.real_paths(run.subject),
                                run.subject, kind="snapshot", protocol=shared.protocol.name, run_key=run.run_key,
                                step=step, sampler=_sampler_json(shared.settings(run.train.resolution)),
                                seconds={"sampling": sampling_seconds})
        write_record(snapshot_record_path(shared, folder, step), record)


def snapshot_callback(shared: Shared, folder: RunFolder) -> Callable[[int, torch.nn.Module, Components], None]:
    run = folder.spec

    def on_snapshot(step: int, unet: torch.nn.Module, components: Components) -> None:
        started = time.perf_counter()
        with shared.timings.phase("sampling"), failing_phase("sample"):
            generate(components, eval_requests(run.subject, shared.protocol.eval), snapshot_dir(shared, folder, step),
                     shared.settings(run.train.resolution), shared.device, shared.protocol.model.dtype,
                     meta={"run_key": run.run_key, "step": step, "model": shared.protocol.model.id},
                     batch_size=shared.protocol.eval.batch_size, unet=unet, progress=f"{run.run_key} step {step}")
        score_snapshot(shared, folder, step, time.perf_counter() - started)

    return on_snapshot


def training_data(shared: Shared, run: RunSpec, components: Components):
    pool = pool_for(run)
    class_paths = None
    if pool is not None:
        class_paths = ensure_pool(pool, run.train.num_class_images, shared.cache_dir, components, shared.device)
    return build_training_data(
        components, shared.instances[(run.subject.name, run.train.resolution)], run.subject.instance_text,
        run.train.resolution, shared.cache_dir, shared.device,
        class_paths=class_paths, class_prompt=run.subject.class_text if pool is not None else None,
    )


def execute_run(shared: Shared, run: RunSpec) -> str:
    """Trains and scores one run, doing only what is missing; returns a one-line summary."""
    folder = shared.store.open(run)
    with folder.lock():
        folder.file(ERROR_FILE).unlink(missing_ok=True)
        unscored = [s for s in run.snapshot_steps if not snapshot_record_path(shared, folder, s).is_file()]
        requests = eval_requests(run.subject, shared.protocol.eval)
        rendered = [s for s in unscored if not missing(snapshot_dir(shared, folder, s), requests)]
        for step in rendered:  # images complete but not scored (interrupted while scoring): no model needed
            score_snapshot(shared, folder, step, 0.0)
        to_sample = [s for s in unscored if s not in rendered]
        if to_sample or not folder.is_done(TRAIN_STAGE):
            with shared.timings.phase("load model"), failing_phase("prepare"):
                # fp32 master weights as published, restored in place into the last run's modules when it can
                components = training_components(run.model)
            with shared.timings.phase("caches (latents, text)"), failing_phase("prepare"):
                data = training_data(shared, run, components)
            with shared.timings.phase("training"), failing_phase("train"):
                train(run, folder, components, data, snapshot_callback(shared, folder), shared.device,
                      pending_snapshots=to_sample)
            del components, data
            if shared.device.type == "cuda":
                torch.cuda.empty_cache()
            state = f"trained{'' if not to_sample else f', sampled steps {to_sample}'}"
        else:
            state = "already done"
        result = read_train(folder.path)
    sec = f"{result.seconds_per_step:.3f} s/step" if result.seconds_per_step else "-"
    return f"{run.run_key} {run.subject.name} {dict(run.varied)}: {state} ({sec})"


def record_failure(shared: Shared, run: RunSpec, error: BaseException) -> None:
    folder = shared.store.open(run)
    write_error(folder.path, ErrorRecord.of(run.run_key, error))


# --------------------------------------------------------------------------------------------------------------
# The whole protocol


def record_paths(shared: Shared, runs: list[RunSpec]) -> tuple[list[Path], list[Path]]:
    """Run folders, and the score files of this protocol's settings (references and snapshots)."""
    folders, scores = [], []
    for run in runs:
        folder = shared.store.folder(run)
        folders.append(folder.path)
        scores += [p for s in run.snapshot_steps if (p := snapshot_record_path(shared, folder, s)).is_file()]
    for subject, resolution in {(r.subject, r.train.resolution) for r in runs}:
        scores += [p for p in (real_record_path(shared, subject),
                               base_samples_dir(shared, subject, resolution) / record_name(shared.protocol.eval))
                   if p.is_file()]
    return folders, scores


def write_outputs(shared: Shared, plan: Plan) -> tuple[Path, Path]:
    from harness.report import write_report
    from harness.results import load_records, write_results

    runs = list(plan.runs)
    with shared.timings.phase("results and report"):
        folders, scores = record_paths(shared, runs)
        records = load_records(folders, scores)
        results = write_results(plan.protocol, runs, records, timings=dict(shared.timings.seconds))
        report = write_report(plan.protocol, results)
    return results, report


def run_protocol(protocol: Protocol, only: tuple[str, ...] = (), report_only: bool = False,
                 device: str | None = None) -> int:
    """Runs the protocol; returns the process exit status (0 when every selected run succeeded)."""
    started = time.perf_counter()
    plan = make_plan(protocol)
    expect_study(plan.work)  # lets `compile: auto` amortise compilation over the whole grid
    for note in plan.warnings:
        print(f"note: {note}")
    shared = Shared(protocol=protocol, device=pick_device(device), store=RunStore(protocol.output.runs_dir),
                    cache_dir=protocol.output.cache_dir, timings=Timings())
    runs = [r for r in plan.runs if not only or r.run_key in only]
    unknown = sorted(set(only) - {r.run_key for r in plan.runs})
    if unknown:
        print(f"error: --only {', '.join(unknown)}: no such run key in this protocol; --dry-run lists them.",
              file=sys.stderr)
        return 2
    print(f"{protocol.name}: {len(runs)} run(s) on {shared.device}"
          + ("  [tiny random model: pipeline check only]" if backend_of(protocol.model).random_weights else ""))
    failed: list[tuple[RunSpec, str]] = []
    if not report_only:
        prepare(plan, shared, runs)
        for i, run in enumerate(runs, 1):
            try:
                print(f"[{i}/{len(runs)}] {execute_run(shared, run)}", flush=True)
            except (TrainingOutOfMemoryError, Exception) as error:  # one failing run must not stop the others
                log.debug("run %s failed", run.run_key, exc_info=True)
                record_failure(shared, run, error)
                failed.append((run, f"{type(error).__name__}: {error}"))
                print(f"[{i}/{len(runs)}] {run.run_key} FAILED: {type(error).__name__}: {error}", flush=True)
    results, report = write_outputs(shared, plan)
    print(shared.timings.table())
    print(f"results: {results}\nreport:  {report}\nwall time: {time.perf_counter() - started:.1f} s")
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(f"{r.run_key} ({msg[:200]})" for r, msg in failed))
        return 1
    return 0
