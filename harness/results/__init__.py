"""Tidy CSVs of a protocol's results, rebuilt from the records in the run folders on every invocation.

`load_records` reads the records the other stages leave behind (harness/records.py names and validates them);
tables.py builds the tables as pure functions of the protocol, its runs and the records; `write_results` writes,
atomically,

    results/<protocol>/runs.csv        one row per (run, snapshot step)
    results/<protocol>/images.csv      one row per scored image (generated, base model, real)
    results/<protocol>/references.csv  one row per reference (real images, base model) and subject
    results/<protocol>/metadata.json   backbones, metric scales and directions, versions, timings

The CSVs load with a plain `pandas.read_csv`; their column order is fixed (columns.py, shown in the README by
`columns_markdown`); identical inputs give byte-identical files (sorted rows, fixed float format, no timestamps).
This package computes no metric and draws nothing (harness/report draws).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from harness.config import Protocol
from harness.records import SCORES_GLOB, read_run_files, read_scores
from harness.results.columns import (
    columns_markdown,
    csv_text,
    images_columns,
    images_columns_doc,
    references_columns,
    references_columns_doc,
    runs_columns,
    runs_columns_doc,
    train_columns,
)
from harness.results.tables import (
    IMAGES_CSV,
    METADATA_FILE,
    REFERENCES_CSV,
    RUNS_CSV,
    Records,
    images_table,
    reference_records,
    references_table,
    results_metadata,
    runs_table,
    sort_runs,
)
from harness.store import atomic_write_text

if TYPE_CHECKING:
    from harness.grid import RunSpec

__all__ = [
    "IMAGES_CSV", "METADATA_FILE", "REFERENCES_CSV", "RUNS_CSV", "Records", "columns_markdown", "csv_text",
    "images_columns", "images_columns_doc", "images_table", "load_records", "reference_records",
    "references_columns", "references_columns_doc", "references_table", "results_metadata", "runs_columns",
    "runs_columns_doc", "runs_table", "sort_runs", "train_columns", "write_results",
]


def _score_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.rglob(SCORES_GLOB)) if path.is_dir() else []


def load_records(run_folders: Iterable[Path], score_paths: Iterable[Path] = ()) -> Records:
    """The run folders' spec/train/error files, and the scores records given (files, or folders searched for
    scores*.json at any depth). Missing paths are skipped (a run not started has no folder); a corrupt file raises
    RecordError naming it. Score files are given explicitly because a folder may hold records of other settings.
    """
    runs = {}
    for folder in sorted({Path(f) for f in run_folders}):
        if folder.is_dir():
            runs[folder.name] = read_run_files(folder)
    files = sorted({f.resolve() for path in score_paths for f in _score_files(Path(path))})
    return Records(scores=tuple(read_scores(f) for f in files), runs=runs)


def write_results(protocol: Protocol, runs: Iterable[RunSpec], records: Records, out_dir: Path | None = None,
                  timings: Mapping[str, float] | None = None) -> Path:
    """Rebuilds results/<protocol>/ (or `out_dir`) from the records, each file replaced atomically; returns the
    folder. `timings` (phase -> seconds) goes to metadata.json and the report."""
    runs = list(runs)
    folder = Path(out_dir) if out_dir is not None else protocol.results_dir
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RUNS_CSV, csv_text(runs_table(protocol, runs, records)))
    atomic_write_text(folder / IMAGES_CSV, csv_text(images_table(protocol, runs, records, relative_to=folder)))
    atomic_write_text(folder / REFERENCES_CSV, csv_text(references_table(protocol, records)))
    metadata = results_metadata(protocol, runs, records, timings)
    atomic_write_text(folder / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return folder
