"""The tables of a study's results, as pure functions of the protocol, its runs and the records on disk.

`runs_table` (one row per run and snapshot step), `images_table` (one row per scored image), `references_table`
(the real-image and base-model rows per subject) and `results_metadata` (what the rows do not repeat: backbones,
metric scales and directions, versions, timings). Metric facts come from the metric registry, backend and backbone
facts from theirs.

What this module does not hold: reading records (harness/records.py), column order and CSV text (columns.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness import __version__
from harness.backbones import BACKBONES
from harness.backends import backend_of
from harness.config import GRID_SUBJECT_KEY, Protocol
from harness.grid import column_name
from harness.metrics import METRICS, metric_names
from harness.records import RecordError, RunFiles, ScoreRecord
from harness.results.columns import images_columns, references_columns, runs_columns, train_columns

if TYPE_CHECKING:
    from harness.grid import RunSpec

RUNS_CSV = "runs.csv"
IMAGES_CSV = "images.csv"
REFERENCES_CSV = "references.csv"
METADATA_FILE = "metadata.json"
REFERENCE_KINDS = ("real_images", "base_model")  # the order of reference rows in tables and reports
PROMPT_KINDS = ("subject", "class", "real")


@dataclass(frozen=True)
class Records:
    """Everything read from disk for one study: its scores records and its run folders' files."""

    scores: tuple[ScoreRecord, ...] = ()
    runs: Mapping[str, RunFiles] = field(default_factory=dict)


def _backbone_label(info: Any) -> str:
    """'open_clip:ViT-B-32/openai'; random weights are said, since their numbers mean nothing."""
    if not isinstance(info, Mapping):
        return str(info or "")
    tag = str(info.get("backbone") or info.get("tag") or info.get("model_id") or "")
    weights = str(info.get("pretrained") or "")
    return f"{tag} (random weights)" if "random" in weights.lower() else tag


def _setup_values(protocol: Protocol, record: ScoreRecord | None) -> dict[str, Any]:
    sampler = record.sampler if record else {}
    backbones = record.backbones if record else {}
    return {
        "clip_backbone": _backbone_label(backbones.get("clip")) if backbones.get("clip") else None,
        "dino_backbone": _backbone_label(backbones.get("dino")) if backbones.get("dino") else None,
        "lpips_backbone": _backbone_label(backbones.get("lpips")) if backbones.get("lpips") else None,
        "eval_sampler": sampler.get("name", protocol.eval.sampler),
        "eval_steps": sampler.get("steps", protocol.eval.steps),
        "eval_guidance_scale": sampler.get("guidance_scale", protocol.eval.guidance_scale),
        "eval_resolution": sampler.get("resolution"),
        "eval_seeds": " ".join(str(s) for s in protocol.eval.seeds),
        "model_id": protocol.model.id,
        "model_revision": protocol.model.revision,
        "harness_version": __version__,
    }


def _metric_values(record: ScoreRecord | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in metric_names():
        value = record.metrics.get(name) if record else None
        out[name] = value.mean if value else None
        out[f"{name}_ci_low"] = value.ci_low if value else None
        out[f"{name}_ci_high"] = value.ci_high if value else None
        out[f"{name}_n"] = value.n if value and value.mean is not None else None
    return out


def _unique(records: Iterable[ScoreRecord], key: Any, what: str) -> dict[Any, ScoreRecord]:
    out: dict[Any, ScoreRecord] = {}
    for record in records:
        k = key(record)
        if k in out:
            raise RecordError(record.path, f"is a second {what} record for {k} (the first is {out[k].path}); "
                                           "move the stale one away")
        out[k] = record
    return out


def _snapshot_index(records: Records) -> dict[tuple[str, int], ScoreRecord]:
    snapshots = [r for r in records.scores if r.kind == "snapshot"]
    return _unique(snapshots, lambda r: (r.run_key, r.step), "snapshot")


def _protocol_subjects(protocol: Protocol) -> tuple[str, ...]:
    return dict(protocol.grid).get(GRID_SUBJECT_KEY, tuple(s.name for s in protocol.subjects))


def reference_records(protocol: Protocol, records: Records) -> dict[tuple[str, str], ScoreRecord]:
    """(kind, subject) -> the reference record used; records written for this protocol win over others."""
    subjects = set(_protocol_subjects(protocol))
    candidates = [r for r in records.scores if r.kind in REFERENCE_KINDS and r.subject in subjects]
    chosen: list[ScoreRecord] = []
    for kind in REFERENCE_KINDS:
        for subject in sorted(subjects):
            group = [r for r in candidates if r.kind == kind and r.subject == subject]
            own = [r for r in group if r.protocol == protocol.name]
            chosen += own or group
    return _unique(chosen, lambda r: (r.kind, r.subject), "reference")


def _sortable(value: Any) -> tuple:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, "")
    if isinstance(value, (bool, int, float)):
        return (0, float(value), "")
    return (0, math.inf, str(value))


def sort_runs(runs: Iterable[RunSpec]) -> list[RunSpec]:
    """Subject, then the grid values in grid order, then the key: the row order of every table."""
    return sorted(runs, key=lambda r: (r.subject.name, [_sortable(v) for _, v in r.varied], r.run_key))


def _error_fields(files: RunFiles | None) -> tuple[str | None, str | None]:
    if files is None or files.error is None:
        return None, None
    error = files.error
    kind = str(error.get("error_type") or "Error")
    message = " ".join(str(error.get("message") or "").split())
    return f"{kind}: {message}" if message else kind, error.get("phase")


def _train_values(files: RunFiles | None) -> dict[str, Any]:
    train = (files.train if files else None) or {}
    peak = train.get("peak_memory_bytes")
    return {
        "train_seconds": train.get("wall_seconds"),
        "seconds_per_step": train.get("seconds_per_step"),
        "peak_memory_gib": peak / 2**30 if isinstance(peak, (int, float)) else None,
        "trainable_params": train.get("trainable_params"),
        "artifact_bytes": train.get("artifact_bytes"),
        "device": train.get("device"),
        "optimizer_used": train.get("optimizer"),
    }


def _cell(value: Any) -> Any:
    """A setting as one CSV cell: a list setting (lora.target_modules) as its items separated by spaces."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def runs_table(protocol: Protocol, runs: Iterable[RunSpec], records: Records) -> pd.DataFrame:
    """One row per (run, snapshot step) of the protocol's runs, in runs_columns() order."""
    snapshots = _snapshot_index(records)
    varied = ",".join(dict.fromkeys(column_name(k) for k, _ in protocol.grid if k != "steps"))
    rows = []
    for run in sort_runs(runs):
        files = records.runs.get(run.run_key)
        error, phase = _error_fields(files)
        settings = {k: _cell(v) for k, v in {**asdict(run.method), **asdict(run.train)}.items()}
        for step in run.snapshot_steps:
            record = snapshots.get((run.run_key, step))
            status = "ok" if record else ("failed" if error else "missing")
            rows.append({
                "protocol": protocol.name, "subject": run.subject.name, "class_noun": run.subject.class_noun,
                "identifier": run.subject.identifier, "run_key": run.run_key, "method": run.train.method,
                "step": step, "run_steps": run.train.steps,
                "varied": varied, **{c: settings.get(c) for c in train_columns()}, **_metric_values(record),
                "status": status, "error": error if status == "failed" else None,
                "error_phase": phase if status == "failed" else None,
                **_train_values(files),
                "sampling_seconds": record.seconds.get("sampling") if record else None,
                "scoring_seconds": record.seconds.get("scoring") if record else None,
                **_setup_values(protocol, record),
            })
    return pd.DataFrame(rows, columns=runs_columns())


def references_table(protocol: Protocol, records: Records) -> pd.DataFrame:
    """One row per (subject, reference): real images first, then the base model."""
    chosen = reference_records(protocol, records)
    rows = []
    for (kind, subject), record in sorted(chosen.items(), key=lambda kv: (kv[0][1], REFERENCE_KINDS.index(kv[0][0]))):
        rows.append({
            "reference": kind, "protocol": protocol.name, "subject": subject, "class_noun": record.class_noun,
            "step": record.step, **_metric_values(record),
            "sampling_seconds": record.seconds.get("sampling"), "scoring_seconds": record.seconds.get("scoring"),
            **_setup_values(protocol, record),
        })
    return pd.DataFrame(rows, columns=references_columns())


def _shown_path(path: Path, folder: Path | None) -> str:
    """Relative to the CSV's folder when the image lies under the folder's grandparent (the directory holding
    results/ and runs/ in the default layout), so the pair can move together; absolute otherwise."""
    if folder is None:
        return str(path)
    folder = folder.resolve()
    try:
        if os.path.commonpath([path, folder.parent.parent]) != str(folder.parent.parent):
            return str(path)
        return os.path.relpath(path, folder)
    except ValueError:  # another drive on Windows
        return str(path)


_SOURCE_ORDER = {"real_images": 0, "base_model": 1, "snapshot": 2}


def images_table(protocol: Protocol, runs: Iterable[RunSpec], records: Records,
                 relative_to: Path | None = None) -> pd.DataFrame:
    """One row per scored image of the protocol's snapshots and references; paths relative to `relative_to`."""
    wanted = {(r.run_key, s) for r in runs for s in r.snapshot_steps}
    chosen = [r for r in _snapshot_index(records).values() if (r.run_key, r.step) in wanted]
    chosen += list(reference_records(protocol, records).values())
    rows = []
    for record in chosen:
        for image in record.images:
            rows.append({
                "source": record.kind, "protocol": protocol.name, "subject": record.subject,
                "run_key": record.run_key, "step": record.step, "prompt": image.prompt,
                "prompt_kind": image.prompt_kind, "seed": image.seed, "path": _shown_path(image.path, relative_to),
                **{m: image.scores.get(m) for m in metric_names()},
            })

    def order(row: dict[str, Any]) -> tuple:
        return (_SOURCE_ORDER[row["source"]], row["subject"], row["run_key"] or "", _sortable(row["step"]),
                PROMPT_KINDS.index(row["prompt_kind"]), row["prompt"], _sortable(row["seed"]), row["path"])

    return pd.DataFrame(sorted(rows, key=order), columns=images_columns())


def pipeline_check_reason(protocol: Protocol, records: Records) -> str | None:
    """Why the numbers say nothing about quality (random model or backbones), or None when they do."""
    reasons = []
    if backend_of(protocol.model).random_weights:
        reasons.append("the base model is the tiny random model")
    random_backbones = any("random" in str(info.get("pretrained", "")).lower()
                           for r in records.scores for info in r.backbones.values() if isinstance(info, Mapping))
    if BACKBONES.get(protocol.eval.backbones).random_weights or random_backbones:
        reasons.append("the metric backbones are tiny random networks")
    return " and ".join(reasons) if reasons else None


def scope_note(protocol: Protocol) -> str | None:
    """What the numbers are about when the model or the backbones are not about photographs, or None."""
    return backend_of(protocol.model).scope_note or BACKBONES.get(protocol.eval.backbones).scope_note


def _own_method_settings(protocol: Protocol) -> dict[str, Any]:
    """The settings of the protocol's own method (train.method), shown with the training settings."""
    methods = dict(protocol.methods)
    return asdict(methods[protocol.train.method]) if protocol.train.method in methods else {}


def _metric_metadata(name: str, backbone: str, backbones: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """How one metric's numbers were computed: the registry's recipe, and the backbone's weights and preprocessing
    as the backbone described itself when it scored."""
    metric = METRICS.get(name)
    details = backbones.get(metric.backbone)
    return {**metric.recipe(), "backbone": backbone or (_backbone_label(details) if details else ""),
            "backbone_details": dict(details) if isinstance(details, Mapping) else None, "notes": notes}


def results_metadata(protocol: Protocol, runs: Iterable[RunSpec], records: Records,
                     timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What the CSVs do not repeat on every row: backbones, metric scales and directions, versions, timings."""
    runs = list(runs)
    used = [*reference_records(protocol, records).values(),
            *(r for r in records.scores if r.kind == "snapshot" and r.run_key in {x.run_key for x in runs})]
    backbones: dict[str, Any] = {}
    for record in sorted(used, key=lambda r: str(r.path)):
        for name, info in record.backbones.items():
            backbones.setdefault(name, info)
    notes: dict[str, list[str]] = {m: [] for m in metric_names()}
    metric_backbone: dict[str, str] = {}
    for record in used:
        for name, value in record.metrics.items():
            if name in notes and value.note and value.note not in notes[name]:
                notes[name].append(value.note)
            if value.backbone:  # the evaluator names the backbone's role ("dino"); show which model that was
                role = record.backbones.get(value.backbone)
                metric_backbone.setdefault(name, _backbone_label(role) if role else value.backbone)
    for name in metric_names():
        if name not in protocol.eval.metrics:
            notes[name].insert(0, "not in eval.metrics; add it there to compute it")
    devices = sorted({str(f.train["device"]) for f in records.runs.values()
                      if f.train and f.train.get("device") and f.run_key in {r.run_key for r in runs}})
    reason = pipeline_check_reason(protocol, records)
    return {
        "harness_version": __version__,
        "protocol": protocol.name,
        "protocol_path": str(protocol.path),
        "description": protocol.description,
        "model": {"id": protocol.model.id, "revision": protocol.model.revision, "dtype": protocol.model.dtype},
        "pipeline_check_only": reason is not None,
        "pipeline_check_reason": reason,
        "scope_note": scope_note(protocol),
        "subjects": [{"name": s.name, "class_noun": s.class_noun, "identifier": s.identifier,
                      "instance_dir": str(s.instance_dir)} for s in protocol.subjects
                     if s.name in _protocol_subjects(protocol)],
        "grid": [[k, list(v)] for k, v in protocol.grid],  # a list: the grid's order survives sort_keys
        "train": json.loads(json.dumps({**asdict(protocol.train), **_own_method_settings(protocol)}, default=str)),
        "eval": json.loads(json.dumps(asdict(protocol.eval), default=str)),
        "backbones": {name: {"label": _backbone_label(info), "details": info} for name, info in backbones.items()},
        "metrics": {m: _metric_metadata(m, metric_backbone.get(m, ""), backbones, notes[m]) for m in metric_names()},
        "devices": devices,
        "timings": dict(timings) if timings else None,
        "columns": {RUNS_CSV: runs_columns(), IMAGES_CSV: images_columns(), REFERENCES_CSV: references_columns()},
    }
