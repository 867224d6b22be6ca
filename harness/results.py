"""Tidy CSVs of a protocol's results, rebuilt from the records in the run folders on every invocation.

Reading: `load_records` reads and validates the JSON records the other stages leave behind (scores.json per
snapshot, base model and real images; spec.json, train.json and error.json per run) and names the file of any
corrupt record. Building: `runs_table`, `images_table`, `references_table` and `results_metadata` are pure
functions of the protocol, its runs and the records. Writing: `write_results` writes, atomically,

    results/<protocol>/runs.csv        one row per (run, snapshot step)
    results/<protocol>/images.csv      one row per scored image (generated, base model, real)
    results/<protocol>/references.csv  one row per reference (real images, base model) and subject
    results/<protocol>/metadata.json   backbones, metric scales and directions, versions, timings

The CSVs load with a plain `pandas.read_csv`; their column order is fixed (`RUNS_COLUMNS_DOC` and friends, shown in
the README by `columns_markdown`); identical inputs give byte-identical files (sorted rows, fixed float format, no
timestamps). This module computes no metric and draws nothing (report.py draws).
"""

from __future__ import annotations

import json
import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness import __version__
from harness.config import GRID_SUBJECT_KEY, Protocol, TrainSpec
from harness.metrics import METRICS

if TYPE_CHECKING:
    from harness.grid import RunSpec

SCHEMA_VERSION = 1
SCORES_GLOB = "scores*.json"  # the evaluator names records scores-<settings hash>.json
SPEC_FILE = "spec.json"
TRAIN_FILE = "train.json"
ERROR_FILE = "error.json"
RUNS_CSV = "runs.csv"
IMAGES_CSV = "images.csv"
REFERENCES_CSV = "references.csv"
METADATA_FILE = "metadata.json"

KINDS = ("snapshot", "base_model", "real_images")
REFERENCE_KINDS = ("real_images", "base_model")  # the order of reference rows in tables and reports
PROMPT_KINDS = ("subject", "class", "real")
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
METRIC_FIELDS = ("mean", "ci_low", "ci_high")

# Used only where the metric registry does not (yet) say it; the records' own "higher_is_better" wins over these.
_FALLBACK_LOWER_IS_BETTER = frozenset({"pres"})
_FALLBACK_DESCRIPTIONS = {
    "dino": "subject fidelity: DINO cosine between subject-prompt images and the real subject images",
    "clip_i": "subject fidelity: CLIP image cosine between subject-prompt images and the real subject images",
    "clip_t": "prompt fidelity: CLIP cosine between each image and its prompt (identifier removed)",
    "pres": "language drift: DINO cosine between class-prompt images and the real subject images",
    "div_subject": "diversity: 1 - DINO cosine among seeds of the same subject prompt",
    "div_class": "diversity: 1 - DINO cosine among seeds of the same class prompt",
    "div_lpips": "diversity: LPIPS distance among seeds of the same prompt",
}
METRIC_SCALES = {
    "dino": "raw cosine",
    "clip_i": "raw cosine",
    "clip_t": "raw cosine (not x100, not x2.5)",
    "pres": "raw cosine",
    "div_subject": "1 - raw cosine",
    "div_class": "1 - raw cosine",
    "div_lpips": "LPIPS distance",
}


class RecordError(ValueError):
    """A record on disk that cannot be used; the message names the file and how to get a good one."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        super().__init__(
            f"{path}: {problem}. The file is damaged or was written by another version of the harness; delete it "
            "(and the DONE marker of the stage that wrote it) and run the protocol again to rewrite it."
        )


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class MetricValue:
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int | None
    n_groups: int | None
    higher_is_better: bool | None
    backbone: str
    note: str


@dataclass(frozen=True)
class ImageScore:
    path: Path
    prompt: str
    prompt_kind: str
    seed: int | None
    scores: Mapping[str, float]


@dataclass(frozen=True)
class ScoreRecord:
    """One scores.json: the metrics of a snapshot, of the base model or of the real images."""

    path: Path
    kind: str
    protocol: str
    subject: str
    class_noun: str | None
    identifier: str | None
    run_key: str | None
    step: int | None
    metrics: Mapping[str, MetricValue]
    backbones: Mapping[str, Any]
    sampler: Mapping[str, Any]
    images: tuple[ImageScore, ...]
    seconds: Mapping[str, float]


@dataclass(frozen=True)
class RunFiles:
    """What a run folder holds besides its scores: spec.json, train.json, error.json (each may be absent)."""

    run_key: str
    folder: Path
    spec: Mapping[str, Any] | None
    train: Mapping[str, Any] | None
    error: Mapping[str, Any] | None


@dataclass(frozen=True)
class Records:
    scores: tuple[ScoreRecord, ...] = ()
    runs: Mapping[str, RunFiles] = field(default_factory=dict)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecordError(path, f"cannot be read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise RecordError(path, f"must hold a JSON object, found {type(data).__name__}")
    return data


def _number(path: Path, where: str, value: Any, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(path, f"{where} must be a finite number{' or null' if optional else ''}, got {value!r}")
    return float(value)


def _integer(path: Path, where: str, value: Any, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(path, f"{where} must be an integer{' or null' if optional else ''}, got {value!r}")
    return value


def _parse_metric(path: Path, name: str, raw: Any) -> MetricValue:
    where = f"metrics.{name}"
    if not isinstance(raw, dict):
        raise RecordError(path, f"{where} must be an object with mean, ci_low, ci_high and n, got {raw!r}")
    missing = [k for k in ("mean", "ci_low", "ci_high", "n") if k not in raw]
    if missing:
        raise RecordError(path, f"{where} lacks {', '.join(missing)}")
    mean, low, high = (_number(path, f"{where}.{k}", raw[k]) for k in METRIC_FIELDS)
    if mean is not None and low is not None and high is not None and not low - 1e-9 <= mean <= high + 1e-9:
        raise RecordError(path, f"{where}: the interval [{low}, {high}] does not contain the mean {mean}")
    direction = raw.get("higher_is_better")
    if direction is not None and not isinstance(direction, bool):
        raise RecordError(path, f"{where}.higher_is_better must be true, false or null, got {direction!r}")
    return MetricValue(
        mean=mean, ci_low=low, ci_high=high,
        n=_integer(path, f"{where}.n", raw["n"]), n_groups=_integer(path, f"{where}.n_groups", raw.get("n_groups")),
        higher_is_better=direction, backbone=str(raw.get("backbone") or ""), note=str(raw.get("note") or ""),
    )


def _resolve_image(record: Path, image: Path) -> Path:
    """An image path as written in a record: absolute, or relative to the record's folder or to the working
    directory the record was written from (the first that exists; the record's folder when neither does)."""
    if image.is_absolute():
        return image
    beside = (record.parent / image).resolve()
    if beside.exists():
        return beside
    from_cwd = image.resolve()
    return from_cwd if from_cwd.exists() else beside


def _parse_image(path: Path, i: int, raw: Any) -> ImageScore:
    where = f"images[{i}]"
    if not isinstance(raw, dict) or "path" not in raw:
        raise RecordError(path, f"{where} must be an object with at least a path, got {raw!r}")
    kind = raw.get("prompt_kind", "")
    if kind not in PROMPT_KINDS:
        raise RecordError(path, f"{where}.prompt_kind must be one of {', '.join(PROMPT_KINDS)}, got {kind!r}")
    scores = raw.get("scores") or {}
    if not isinstance(scores, dict):
        raise RecordError(path, f"{where}.scores must be an object of metric -> number, got {scores!r}")
    image_path = _resolve_image(path, Path(str(raw["path"])))
    return ImageScore(
        path=image_path, prompt=str(raw.get("prompt") or ""), prompt_kind=kind,
        seed=_integer(path, f"{where}.seed", raw.get("seed")),
        scores={k: v for k, v in ((k, _number(path, f"{where}.scores.{k}", v)) for k, v in scores.items())
                if v is not None},
    )


def load_scores(path: Path) -> ScoreRecord:
    """One scores.json, validated against the evaluator's schema."""
    path = Path(path)
    data = _read_json_object(path)
    if data.get("schema") != SCHEMA_VERSION:
        raise RecordError(path, f"has schema {data.get('schema')!r}; this harness reads schema {SCHEMA_VERSION}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise RecordError(path, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for key in ("protocol", "subject"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RecordError(path, f"{key} must be a non-empty string, got {data.get(key)!r}")
    run_key = data.get("run_key")
    step = _integer(path, "step", data.get("step"))
    if kind == "snapshot" and (not isinstance(run_key, str) or not run_key or step is None):
        raise RecordError(path, f"a snapshot record needs a run_key and a step, got {run_key!r} and {step!r}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise RecordError(path, f"metrics must be an object of metric name -> values, got {metrics!r}")
    images = data.get("images") or []
    if not isinstance(images, list):
        raise RecordError(path, f"images must be a list, got {type(images).__name__}")
    seconds = data.get("seconds") or {}
    if not isinstance(seconds, dict):
        raise RecordError(path, f"seconds must be an object, got {seconds!r}")
    return ScoreRecord(
        path=path, kind=kind, protocol=data["protocol"], subject=data["subject"],
        class_noun=data.get("class_noun"), identifier=data.get("identifier"),
        run_key=run_key if kind == "snapshot" else None, step=step,
        metrics={name: _parse_metric(path, name, raw) for name, raw in metrics.items()},
        backbones=data.get("backbones") or {}, sampler=data.get("sampler") or {},
        images=tuple(_parse_image(path, i, raw) for i, raw in enumerate(images)),
        seconds={k: v for k, v in ((k, _number(path, f"seconds.{k}", v)) for k, v in seconds.items())
                 if v is not None},
    )


def _optional_object(path: Path) -> dict[str, Any] | None:
    return _read_json_object(path) if path.is_file() else None


def load_run_files(folder: Path) -> RunFiles:
    """spec.json, train.json and error.json of one run folder (the folder's name is its run key)."""
    folder = Path(folder)
    train = _optional_object(folder / TRAIN_FILE)
    if train is not None:
        for key in ("wall_seconds", "seconds_per_step", "peak_memory_bytes"):
            _number(folder / TRAIN_FILE, key, train.get(key))
    error = _optional_object(folder / ERROR_FILE)
    if error is not None and not isinstance(error.get("message", ""), str):
        raise RecordError(folder / ERROR_FILE, f"message must be a string, got {error.get('message')!r}")
    return RunFiles(run_key=folder.name, folder=folder, spec=_optional_object(folder / SPEC_FILE), train=train,
                    error=error)


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
    runs: dict[str, RunFiles] = {}
    for folder in sorted({Path(f) for f in run_folders}):
        if folder.is_dir():
            runs[folder.name] = load_run_files(folder)
    files = sorted({f.resolve() for path in score_paths for f in _score_files(Path(path))})
    return Records(scores=tuple(load_scores(f) for f in files), runs=runs)


# --------------------------------------------------------------------------------------------------------------
# Columns (fixed order; documented for the README)

TRAIN_COLUMNS = tuple(f.name for f in fields(TrainSpec) if f.name not in ("method", "steps"))


def metric_columns() -> list[str]:
    return [c for m in METRIC_NAMES for c in (m, f"{m}_ci_low", f"{m}_ci_high", f"{m}_n")]


_TRAIN_DOC = ("training setting of the run: a TrainSpec field (harness/config.py) after the grid is applied; "
              "num_class_images is 0 when prior_loss_weight is 0")
_METRIC_DOC = {
    "<metric>": "mean of the metric over its images; one column per metric: " + ", ".join(METRIC_NAMES)
                + " (empty when not computed; metadata.json says why)",
    "<metric>_ci_low": "lower end of the bootstrap 95% interval over (prompt, seed) groups",
    "<metric>_ci_high": "upper end of that interval",
    "<metric>_n": "number of images (or pairs, for diversity) the mean is taken over",
}
_SETUP_DOC = {
    "clip_backbone": "CLIP model of clip_i and clip_t, as tag (weights)",
    "dino_backbone": "DINO model of dino, pres and the diversities, as tag (weights)",
    "eval_sampler": "scheduler used to sample the evaluation images",
    "eval_steps": "denoising steps of evaluation sampling",
    "eval_guidance_scale": "classifier-free guidance scale of evaluation sampling",
    "eval_resolution": "resolution of the evaluation images (pixels)",
    "eval_seeds": "evaluation seeds, space separated",
    "model_id": "base model: hub id, local folder or 'tiny'",
    "model_revision": "hub revision of the base model (empty: the latest)",
    "harness_version": "version of the harness that wrote this file",
}

RUNS_COLUMNS_DOC: dict[str, str] = {
    "protocol": "protocol name",
    "subject": "subject name",
    "class_noun": "the subject's class noun (e.g. dog)",
    "run_key": "the run's key: its folder under runs/ (sha256 of everything that changes the trained weights)",
    "method": "fine-tuning method",
    "step": "snapshot step: optimizer steps taken when the images were sampled",
    "run_steps": "length of the run the snapshot was taken from (with a constant schedule, the snapshot at step s "
                 "is the s-step run)",
    "varied": "the grid fields this protocol varies, comma separated (columns of the same names hold the values)",
    **{c: _TRAIN_DOC for c in TRAIN_COLUMNS},
    **_METRIC_DOC,
    "status": "ok (scored), failed (the run raised before this snapshot was scored) or missing (not run yet)",
    "error": "error type and message when status is failed",
    "error_phase": "the phase that failed (prepare, train, sample, score...)",
    "train_seconds": "wall-clock seconds of the whole training run (all snapshots)",
    "seconds_per_step": "mean wall-clock seconds per optimizer step",
    "sampling_seconds": "seconds spent generating this snapshot's evaluation images",
    "scoring_seconds": "seconds spent scoring them",
    "peak_memory_gib": "peak GPU memory of the run (GiB; empty on CPU)",
    "device": "device the run trained on",
    "optimizer_used": "optimizer the run actually used (AdamW8bit, or the fallback)",
    **_SETUP_DOC,
}

IMAGES_COLUMNS_DOC: dict[str, str] = {
    "source": "snapshot (a fine-tuned model), base_model (step 0) or real_images (the subject's photos)",
    "protocol": "protocol name",
    "subject": "subject name",
    "run_key": "run key of the snapshot (empty for base_model and real_images)",
    "step": "snapshot step (0 for the base model, empty for real images)",
    "prompt": "the prompt the image was generated from (with the identifier)",
    "prompt_kind": "subject (names the subject), class (the generic class, for drift) or real",
    "seed": "sampling seed",
    "path": "the image file, relative to this CSV's folder when it lies under the folder that holds results/ "
            "(../../runs/...), absolute otherwise",
    "<metric>": "the image's own score for that metric, where one exists (dino, clip_i: mean cosine to the real "
                "images; clip_t: cosine to its prompt; pres: class image to real images); empty otherwise",
}

REFERENCES_COLUMNS_DOC: dict[str, str] = {
    "reference": "real_images (leave-one-out real-vs-real scores, the ceiling) or base_model (step 0, the floor "
                 "of fidelity and of drift)",
    "protocol": "protocol name",
    "subject": "subject name",
    "class_noun": "the subject's class noun",
    "step": "0 for the base model, empty for real images",
    **_METRIC_DOC,
    "sampling_seconds": "seconds spent generating the base model's images (empty for real images)",
    "scoring_seconds": "seconds spent scoring",
    **_SETUP_DOC,
}


def _expand_columns(doc: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key in doc:
        if key.startswith("<metric>"):
            out += [key.replace("<metric>", m) for m in METRIC_NAMES]
        else:
            out.append(key)
    return out


def _interleave_metrics(columns: list[str]) -> list[str]:
    """Metric columns grouped per metric (dino, dino_ci_low, ...), at the place of the first metric column."""
    metric_set = set(metric_columns())
    first = next((i for i, c in enumerate(columns) if c in metric_set), None)
    rest = [c for c in columns if c not in metric_set]
    if first is None:
        return rest
    wanted = [c for c in metric_columns() if c in set(columns)]
    return rest[:first] + wanted + rest[first:]


RUNS_COLUMNS: tuple[str, ...] = tuple(_interleave_metrics(_expand_columns(RUNS_COLUMNS_DOC)))
IMAGES_COLUMNS: tuple[str, ...] = tuple(_expand_columns(IMAGES_COLUMNS_DOC))
REFERENCES_COLUMNS: tuple[str, ...] = tuple(_interleave_metrics(_expand_columns(REFERENCES_COLUMNS_DOC)))


def columns_markdown(doc: Mapping[str, str]) -> str:
    """A markdown table (column | meaning) of a columns doc, TrainSpec fields folded into one row."""
    lines = ["| column | meaning |", "|---|---|"]
    train_shown = False
    for column, meaning in doc.items():
        if column in TRAIN_COLUMNS:
            if train_shown:
                continue
            train_shown = True
            names = ", ".join(f"`{c}`" for c in TRAIN_COLUMNS)
            lines.append(f"| {names} | {_TRAIN_DOC} |")
            continue
        lines.append(f"| `{column}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Metric facts (registry first, records second)


def metric_higher_is_better(name: str, records: Records | None = None) -> bool:
    entry = METRICS.get(name)
    direction = getattr(entry, "higher_is_better", None)
    if isinstance(direction, bool):
        return direction
    for record in records.scores if records else ():
        value = record.metrics.get(name)
        if value is not None and value.higher_is_better is not None:
            return value.higher_is_better
    return name not in _FALLBACK_LOWER_IS_BETTER


def metric_description(name: str) -> str:
    description = getattr(METRICS.get(name), "description", None)
    return description if isinstance(description, str) and description else _FALLBACK_DESCRIPTIONS.get(name, "")


# --------------------------------------------------------------------------------------------------------------
# Tables


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
    for name in METRIC_NAMES:
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
        "device": train.get("device"),
        "optimizer_used": train.get("optimizer"),
    }


def runs_table(protocol: Protocol, runs: Iterable[RunSpec], records: Records) -> pd.DataFrame:
    """One row per (run, snapshot step) of the protocol's runs, in RUNS_COLUMNS order."""
    snapshots = _snapshot_index(records)
    varied = ",".join(k for k, _ in protocol.grid if k != "steps")
    rows = []
    for run in sort_runs(runs):
        files = records.runs.get(run.run_key)
        error, phase = _error_fields(files)
        train = asdict(run.train)
        for step in run.snapshot_steps:
            record = snapshots.get((run.run_key, step))
            status = "ok" if record else ("failed" if error else "missing")
            rows.append({
                "protocol": protocol.name, "subject": run.subject.name, "class_noun": run.subject.class_noun,
                "run_key": run.run_key, "method": run.train.method, "step": step, "run_steps": run.train.steps,
                "varied": varied, **{c: train[c] for c in TRAIN_COLUMNS}, **_metric_values(record),
                "status": status, "error": error if status == "failed" else None,
                "error_phase": phase if status == "failed" else None,
                **_train_values(files),
                "sampling_seconds": record.seconds.get("sampling") if record else None,
                "scoring_seconds": record.seconds.get("scoring") if record else None,
                **_setup_values(protocol, record),
            })
    return pd.DataFrame(rows, columns=list(RUNS_COLUMNS))


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
    return pd.DataFrame(rows, columns=list(REFERENCES_COLUMNS))


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
                **{m: image.scores.get(m) for m in METRIC_NAMES},
            })

    def order(row: dict[str, Any]) -> tuple:
        return (_SOURCE_ORDER[row["source"]], row["subject"], row["run_key"] or "", _sortable(row["step"]),
                PROMPT_KINDS.index(row["prompt_kind"]), row["prompt"], _sortable(row["seed"]), row["path"])

    return pd.DataFrame(sorted(rows, key=order), columns=list(IMAGES_COLUMNS))


def pipeline_check_reason(protocol: Protocol, records: Records) -> str | None:
    """Why the numbers say nothing about quality (tiny random model or backbones), or None when they do."""
    reasons = []
    if protocol.model.is_tiny:
        reasons.append("the base model is the tiny random model")
    random_backbones = any("random" in str(info.get("pretrained", "")).lower()
                           for r in records.scores for info in r.backbones.values() if isinstance(info, Mapping))
    if protocol.eval.backbones == "tiny" or random_backbones:
        reasons.append("the metric backbones are tiny random networks")
    return " and ".join(reasons) if reasons else None


def scope_note(protocol: Protocol) -> str | None:
    """What the numbers are about when the model or the backbones are the toy world's, or None."""
    if not (protocol.model.is_toyworld or protocol.eval.backbones == "toyworld"):
        return None
    return ("toy world: the base model and the metric backbones are small models pretrained on the toy world's "
            "renders (harness/toyworld), so the numbers measure what happens in that world; they are not "
            "comparable with numbers measured on photographs with Stable Diffusion, CLIP and DINO")


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
    notes: dict[str, list[str]] = {m: [] for m in METRIC_NAMES}
    metric_backbone: dict[str, str] = {}
    for record in used:
        for name, value in record.metrics.items():
            if name in notes and value.note and value.note not in notes[name]:
                notes[name].append(value.note)
            if value.backbone:  # the evaluator names the backbone's role ("dino"); show which model that was
                role = record.backbones.get(value.backbone)
                metric_backbone.setdefault(name, _backbone_label(role) if role else value.backbone)
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
        "train": json.loads(json.dumps(asdict(protocol.train), default=str)),
        "eval": json.loads(json.dumps(asdict(protocol.eval), default=str)),
        "backbones": {name: {"label": _backbone_label(info), "details": info} for name, info in backbones.items()},
        "metrics": {
            m: {"higher_is_better": metric_higher_is_better(m, records), "description": metric_description(m),
                "scale": METRIC_SCALES.get(m, ""), "backbone": metric_backbone.get(m, ""), "notes": notes[m]}
            for m in METRIC_NAMES
        },
        "devices": devices,
        "timings": dict(timings) if timings else None,
        "columns": {RUNS_CSV: list(RUNS_COLUMNS), IMAGES_CSV: list(IMAGES_COLUMNS),
                    REFERENCES_CSV: list(REFERENCES_COLUMNS)},
    }


# --------------------------------------------------------------------------------------------------------------
# Writing


def _is_integer_type(hint: Any) -> bool:
    return hint is int or int in typing.get_args(hint)


_INT_TRAIN_COLUMNS = tuple(c for c in TRAIN_COLUMNS if _is_integer_type(typing.get_type_hints(TrainSpec)[c]))
INTEGER_COLUMNS = frozenset({"step", "run_steps", "seed", "eval_steps", "eval_resolution", *_INT_TRAIN_COLUMNS,
                             *(f"{m}_n" for m in METRIC_NAMES)})


def csv_text(frame: pd.DataFrame) -> str:
    """The CSV text of a table: floats in their shortest exact form, integers without '.0' even beside empty
    cells, '\\n' line ends, no index; the same table always gives the same text."""
    frame = frame.copy()
    for column in INTEGER_COLUMNS.intersection(frame.columns):
        frame[column] = pd.array([None if pd.isna(v) else int(v) for v in frame[column]], dtype="Int64")
    return frame.to_csv(index=False, lineterminator="\n")


def _atomic_write_text(path: Path, text: str) -> None:
    from harness.store import atomic_write_text  # the run store's writer: temp file in the folder + os.replace

    atomic_write_text(path, text)


def write_results(protocol: Protocol, runs: Iterable[RunSpec], records: Records, out_dir: Path | None = None,
                  timings: Mapping[str, float] | None = None) -> Path:
    """Rebuilds results/<protocol>/ (or `out_dir`) from the records, each file replaced atomically; returns the
    folder. `timings` (phase -> seconds) goes to metadata.json and the report."""
    runs = list(runs)
    folder = Path(out_dir) if out_dir is not None else protocol.results_dir
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(folder / RUNS_CSV, csv_text(runs_table(protocol, runs, records)))
    _atomic_write_text(folder / IMAGES_CSV, csv_text(images_table(protocol, runs, records, relative_to=folder)))
    _atomic_write_text(folder / REFERENCES_CSV, csv_text(references_table(protocol, records)))
    metadata = results_metadata(protocol, runs, records, timings)
    _atomic_write_text(folder / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return folder
