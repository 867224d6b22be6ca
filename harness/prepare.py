"""Prepare: what the runs of a study share, made once before they execute.

- the subjects' instance images, squared and resized at each training resolution;
- the class-image pools, grown to the largest number of images any run asks of them;
- each subject's reference rows: its real photos scored against each other, and the base model's images (step 0)
  generated and scored.

Everything is checked before it is trusted (a damaged file is named in the log and made again, pixel for pixel) and
built under a lock on the shared filesystem, so two invocations on one study, or a Slurm prepare job and a local
command, never build the same thing twice or at once. The latent and text caches are filled by the runs themselves,
under their own lock (caches.py): their keys depend on the training model's precision, which only a run loads.

What this module does not hold: training and scoring of runs (execute.py), the CSVs and the report (collect.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from harness.class_images import PoolSpec, ensure_pool, pool_dir, pool_for
from harness.config import SubjectSpec
from harness.evaluator import real_images_record, samples_record, write_record
from harness.grid import RunSpec
from harness.plan import Plan
from harness.records import usable_scores
from harness.sampling import eval_requests, generate, missing, read_samples
from harness.study import Study, shared_lock


def prepare(plan: Plan, study: Study, runs: Sequence[RunSpec]) -> None:
    """Instance images, class-image pools and reference rows of `runs`, each skipped when already whole."""
    study.reporter.activity("prepare instance images")
    for run in runs:
        study.instance_paths(run.subject, run.train.resolution)
    with study.timings.phase("class images"):
        for pool, n in plan.pools.items():
            if any(pool_for(r) == pool for r in runs):
                grow_pool(study, pool, n)
    # The references use the protocol's subject: a method with its own token (Custom Diffusion) changes the runs'
    # prompts, not the base model's, so every subject keeps one base-model row.
    for subject, resolution in sorted(reference_keys(study, runs), key=lambda x: x[0].name):
        score_real_images(study, subject)
        score_base_model(study, subject, resolution)
    study.reporter.activity("prepared")


def references_ready(study: Study, runs: Sequence[RunSpec]) -> bool:
    """Whether every reference row of the runs is on disk and whole (then collect needs no preparation)."""
    for subject, resolution in reference_keys(study, runs):
        folder = study.base_samples_dir(subject, resolution)
        if (usable_scores(study.real_record_path(subject)) is None or usable_scores(folder / study.record_name) is None
                or missing(folder, eval_requests(subject, study.protocol.eval))):
            return False
    return True


def reference_keys(study: Study, runs: Sequence[RunSpec]) -> set[tuple[SubjectSpec, int]]:
    """(subject as the protocol states it, resolution) of every reference row the runs are compared with."""
    return {(study.protocol.subject(r.subject.name), r.train.resolution) for r in runs}


def grow_pool(study: Study, pool: PoolSpec, n: int) -> list[Path]:
    """The first n images of a class-image pool, generating (under the pool's lock) those missing or damaged,
    always with the base model in inference precision, so a repaired image equals the one it replaces."""
    with shared_lock(pool_dir(study.cache_dir, pool), f"class-image pool {pool.key}", study.reporter):
        return ensure_pool(pool, n, study.cache_dir, study.base_components, study.device)


def score_real_images(study: Study, subject: SubjectSpec) -> Path:
    """The "Real Images" reference row of a subject: its photos scored against each other."""
    path = study.real_record_path(subject)
    if usable_scores(path) is not None:
        return path
    with shared_lock(path.parent, f"the real images' scores of {subject.name}", study.reporter):
        if usable_scores(path) is None:
            study.reporter.activity(f"score real images of {subject.name}")
            with study.timings.phase("scoring"):
                record = real_images_record(study.scorer(), study.real_paths(subject), subject, study.protocol.name)
                write_record(path, record)
    return path


def score_base_model(study: Study, subject: SubjectSpec, resolution: int) -> Path:
    """Step 0: the untrained model on the same prompts and seeds as every snapshot, generated and scored once."""
    folder = study.base_samples_dir(subject, resolution)
    path = folder / study.record_name
    requests = eval_requests(subject, study.protocol.eval)
    if not missing(folder, requests) and usable_scores(path) is not None:
        return path
    with shared_lock(folder, f"the base model's images of {subject.name}", study.reporter):
        todo = missing(folder, requests)
        if not todo and usable_scores(path) is not None:
            return path  # another process made them while this one waited
        started = time.perf_counter()
        if todo:
            with study.timings.phase("sampling"):
                generate(study.base_components(), requests, folder, study.settings(resolution), study.device,
                         study.protocol.model.dtype,
                         meta={"run_key": None, "step": 0, "model": study.protocol.model.id},
                         batch_size=study.protocol.eval.batch_size, progress=f"base model {subject.name}",
                         compile=study.protocol.eval.compile)
        seconds = {"sampling": time.perf_counter() - started}
        study.reporter.activity(f"score base model of {subject.name}")
        with study.timings.phase("scoring"):
            record = samples_record(study.scorer(), read_samples(folder, requests), study.real_paths(subject),
                                    subject, kind="base_model", protocol=study.protocol.name, run_key=None, step=0,
                                    sampler=study.sampler_json(resolution), seconds=seconds)
            write_record(path, record)
    return path
