"""Collect: the CSVs and the report of a study, rebuilt from the records once its runs have executed, and the
account of what each run came to.

Only records that read back whole are used; a damaged one is named in the log and removed (the next invocation
that executes its run writes it again), so a damaged file never stops the tables: its run shows as missing.

What this module does not hold: how the tables and the report are built (harness/results, harness/report).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.grid import RunSpec
from harness.plan import Plan
from harness.prepare import reference_keys
from harness.records import ERROR_FILE, SPEC_FILE, RecordError, read_error, read_object, usable_scores, usable_train
from harness.store import discard
from harness.study import Study, shared_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunAccount:
    """What a run came to: ok (every snapshot scored), failed (error.json says why) or incomplete."""

    run: RunSpec
    status: str
    message: str = ""


def usable_run_folder(folder: Path) -> Path:
    """A run folder whose spec.json, train.json and error.json read back whole (damaged ones are removed)."""
    usable_train(folder)
    error_file, spec_file = folder / ERROR_FILE, folder / SPEC_FILE
    for path, read in ((error_file, lambda: read_error(folder)), (spec_file, lambda: read_object(spec_file))):
        if path.is_file():
            try:
                read()
            except RecordError as error:
                discard(error.problem, path)
    return folder


def record_paths(study: Study, runs: Sequence[RunSpec]) -> tuple[list[Path], list[Path]]:
    """Run folders, and the usable score files of this protocol's settings (references and snapshots)."""
    folders, scores = [], []
    for run in runs:
        folder = study.store.folder(run)
        if folder.path.is_dir():
            folders.append(usable_run_folder(folder.path))
        scores += [p for s in run.snapshot_steps
                   if usable_scores(p := study.snapshot_record_path(folder, s)) is not None]
    for subject, resolution in reference_keys(study, runs):
        scores += [p for p in (study.real_record_path(subject), study.base_record_path(subject, resolution))
                   if usable_scores(p) is not None]
    return folders, scores


def collect(plan: Plan, study: Study) -> tuple[Path, Path]:
    """Rebuilds results/<protocol>/ and reports/<protocol>/ from every run of the plan; returns their paths."""
    from harness.report import write_report
    from harness.results import load_records, write_results

    runs = list(plan.runs)
    study.reporter.activity("results and report")
    with study.timings.phase("results and report"), \
            shared_lock(plan.protocol.results_dir, "the results and the report", study.reporter):
        folders, scores = record_paths(study, runs)
        records = load_records(folders, scores)
        results = write_results(plan.protocol, runs, records, timings=dict(study.timings.seconds))
        report = write_report(plan.protocol, results)
    return results, report


def account(study: Study, runs: Sequence[RunSpec]) -> list[RunAccount]:
    """Each run's end state as the store holds it (the exit status and the closing summary come from here)."""
    accounts = []
    for run in runs:
        folder = study.store.folder(run)
        error = _error_message(folder.path)
        if error is not None:
            accounts.append(RunAccount(run, "failed", error))
        elif usable_train(folder.path) is not None and all(
                usable_scores(study.snapshot_record_path(folder, s)) is not None for s in run.snapshot_steps):
            accounts.append(RunAccount(run, "ok"))
        else:
            accounts.append(RunAccount(run, "incomplete", "not finished; run the same command again to resume it"))
    return accounts


def _error_message(folder: Path) -> str | None:
    if not (folder / ERROR_FILE).is_file():
        return None
    with contextlib.suppress(RecordError):
        data = read_error(folder)
        return f"{data.get('error_type', 'Error')}: {data.get('message', '')}"
    return "failed (its error.json is damaged)"
