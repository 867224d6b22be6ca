"""The on-disk records of a study: the run-folder layout, file names, schema version, and typed records with their
writers and readers.

A run folder holds
    spec.json                       the run's identity and settings (written first; store.py)
    train.json                      TrainRecord: how training went (written at the end of training)
    error.json                      ErrorRecord: why the run failed, and in which phase
    checkpoint/state.pt             the training state while a run with checkpoint_every is under way
    samples/<samples key>/step-NNNNNN/   evaluation images (+ .json sidecars) and scores-<hash>.json per snapshot
    <stage>.DONE                    markers, written last
and reference records (real images, base model) live in the cache with the same scores format.

The trainer, the evaluator and the phases write through this module and results.py reads through it, so the
format is spelled once. Readers validate what they read and name the file of any damaged record (`RecordError`);
`usable_scores` and `usable_train` are the checks a phase makes before trusting a record: a damaged one is named in
one log line and removed, so the stage that wrote it writes it again.

What this module does not hold: what is computed (trainer, evaluator) or the tables built from records (results).
"""

from __future__ import annotations

import contextlib
import json
import math
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.store import atomic_write_json, discard, text_digest

SPEC_FILE = "spec.json"
TRAIN_FILE = "train.json"
ERROR_FILE = "error.json"
CHECKPOINT_FILE = "checkpoint/state.pt"
SAMPLES_DIR = "samples"
TRAIN_STAGE = "train"
SCORES_SCHEMA = 1
SCORES_GLOB = "scores*.json"  # records are named scores-<settings hash>.json
SCORE_KINDS = ("snapshot", "base_model", "real_images")
PROMPT_KINDS = ("subject", "class", "real")
PHASES = ("prepare", "train", "sample", "score")
METRIC_FIELDS = ("mean", "ci_low", "ci_high")


class RecordError(ValueError):
    """A record on disk that cannot be used; the message names the file and how to get a good one."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(
            f"{path}: {problem}. The file is damaged or was written by another version of the harness; delete it "
            "(and the DONE marker of the stage that wrote it) and run the protocol again to rewrite it."
        )


# --------------------------------------------------------------------------------------------------------------
# Layout


def scores_name(backbones: str, metrics: Iterable[str], bootstrap_samples: int,
                options: Mapping[str, Any] | None = None) -> str:
    """File name of a scores record: other backbones, metrics or options give another file, never a stale one.

    `options` are further scoring settings away from their defaults ({"lpips_net": "vgg"}); left out at their
    defaults, so adding a setting never renames the records that already exist.
    """
    identity = [backbones, list(metrics), bootstrap_samples, SCORES_SCHEMA]
    if options:
        identity.append(dict(sorted(options.items())))
    return f"scores-{text_digest(json.dumps(identity), 8)}.json"


def snapshot_dir(run_folder: Path, samples_key: str, step: int) -> Path:
    return Path(run_folder) / SAMPLES_DIR / samples_key / f"step-{step:06d}"


# --------------------------------------------------------------------------------------------------------------
# train.json


@dataclass
class TrainRecord:
    """How a run trained; written once when its training ends."""

    run_key: str
    final_step: int
    seconds_per_step: float | None  # mean after the warm-up steps of this process; None if none was timed
    wall_seconds: float
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated; None off CUDA
    optimizer: str
    memory_mode: str
    mixed_precision: str
    resumed_from_step: int
    loss_history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "instance", "prior", "lr"}
    pipeline_dir: str | None = None  # the export's folder, when the run is saved
    device: str = "cpu"  # the accelerator's name ("NVIDIA H100 80GB HBM3") or "cpu"
    trainable_params: int | None = None  # elements the method trained (None: written before this was recorded)
    # Bytes of the export: its size on disk when the run was saved (save: final), else what its tensors would take
    # in fp16 (the export's format); None: written before this was recorded.
    artifact_bytes: int | None = None
    compiled: str | None = None  # how the UNet was compiled for training (harness/trainer/compiled.py); None: eager
    warmup_seconds: float | None = None  # the first steps of this process, compilation included

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_train(folder: Path, record: TrainRecord) -> Path:
    path = Path(folder) / TRAIN_FILE
    atomic_write_json(path, record.to_json())
    return path


def read_train(folder: Path) -> TrainRecord:
    path = Path(folder) / TRAIN_FILE
    data = read_object(path)
    for key in ("wall_seconds", "seconds_per_step", "peak_memory_bytes"):
        _number(path, key, data.get(key))
    try:
        return TrainRecord.from_json(data)
    except TypeError as e:
        raise RecordError(path, f"lacks a field ({e})") from None


def usable_train(folder: Path) -> TrainRecord | None:
    """train.json of a run, or None when it is absent or damaged (then it is removed: training writes it again)."""
    path = Path(folder) / TRAIN_FILE
    if not path.is_file():
        return None
    try:
        return read_train(folder)
    except RecordError as error:
        discard(error.problem, path)
        return None


# --------------------------------------------------------------------------------------------------------------
# error.json


@dataclass(frozen=True)
class ErrorRecord:
    """Why a run failed: the exception and the phase it failed in (prepare, train, sample, score)."""

    run_key: str
    error_type: str
    message: str
    traceback: str
    phase: str

    @classmethod
    def of(cls, run_key: str, error: BaseException) -> ErrorRecord:
        return cls(run_key=run_key, error_type=type(error).__name__, message=str(error),
                   traceback="".join(traceback.format_exception(error)), phase=phase_of(error))


def write_error(folder: Path, record: ErrorRecord) -> Path:
    path = Path(folder) / ERROR_FILE
    atomic_write_json(path, asdict(record))
    return path


def read_error(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ERROR_FILE
    data = read_object(path)
    if not isinstance(data.get("message", ""), str):
        raise RecordError(path, f"message must be a string, got {data.get('message')!r}")
    return data


@contextlib.contextmanager
def failing_phase(phase: str) -> Iterator[None]:
    """Marks an exception raised inside with the phase it came from (the innermost phase wins)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}.")
    try:
        yield
    except BaseException as error:
        if not hasattr(error, "harness_phase"):
            with contextlib.suppress(AttributeError, TypeError):
                error.harness_phase = phase  # type: ignore[attr-defined]
        raise


def phase_of(error: BaseException) -> str:
    return getattr(error, "harness_phase", "prepare")


# --------------------------------------------------------------------------------------------------------------
# scores-<hash>.json


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
    """One scores record: the metrics of a snapshot, of the base model or of the real images."""

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


def scores_header(kind: str, protocol: str, subject: str, class_noun: str | None, identifier: str | None,
                  run_key: str | None, step: int | None) -> dict[str, Any]:
    """The identifying part of a scores record."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown scores kind {kind!r}; kinds are {', '.join(SCORE_KINDS)}.")
    return {"schema": SCORES_SCHEMA, "kind": kind, "protocol": protocol, "subject": subject,
            "class_noun": class_noun, "identifier": identifier, "run_key": run_key, "step": step}


def scores_record(header: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]], backbones: Mapping[str, Any],
                  sampler: Mapping[str, Any] | None, images: list[dict[str, Any]],
                  seconds: Mapping[str, float]) -> dict[str, Any]:
    """A complete scores record as written to disk."""
    return {**header, "metrics": dict(metrics), "backbones": dict(backbones), "sampler": sampler,
            "images": images, "seconds": dict(seconds)}


def write_scores(path: Path, record: Mapping[str, Any]) -> Path:
    atomic_write_json(Path(path), record)
    return Path(path)


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a RecordError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
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
    return ImageScore(
        path=_resolve_image(path, Path(str(raw["path"]))), prompt=str(raw.get("prompt") or ""), prompt_kind=kind,
        seed=_integer(path, f"{where}.seed", raw.get("seed")),
        scores={k: v for k, v in ((k, _number(path, f"{where}.scores.{k}", v)) for k, v in scores.items())
                if v is not None},
    )


def read_scores(path: Path) -> ScoreRecord:
    """One scores record, validated against the format `scores_record` writes."""
    path = Path(path)
    data = read_object(path)
    if data.get("schema") != SCORES_SCHEMA:
        raise RecordError(path, f"has schema {data.get('schema')!r}; this harness reads schema {SCORES_SCHEMA}")
    kind = data.get("kind")
    if kind not in SCORE_KINDS:
        raise RecordError(path, f"kind must be one of {', '.join(SCORE_KINDS)}, got {kind!r}")
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


def usable_scores(path: Path) -> ScoreRecord | None:
    """The scores record at `path`, or None when it is absent or damaged (then it is removed: scoring writes it
    again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_scores(path)
    except RecordError as error:
        discard(error.problem, path)
        return None


# --------------------------------------------------------------------------------------------------------------
# A run folder, read back


@dataclass(frozen=True)
class RunFiles:
    """What a run folder holds besides its scores: spec.json, train.json, error.json (each may be absent)."""

    run_key: str
    folder: Path
    spec: Mapping[str, Any] | None
    train: Mapping[str, Any] | None
    error: Mapping[str, Any] | None


def read_run_files(folder: Path) -> RunFiles:
    """spec.json, train.json and error.json of one run folder (the folder's name is its run key)."""
    folder = Path(folder)
    train = read_train(folder).to_json() if (folder / TRAIN_FILE).is_file() else None
    error = read_error(folder) if (folder / ERROR_FILE).is_file() else None
    spec = read_object(folder / SPEC_FILE) if (folder / SPEC_FILE).is_file() else None
    return RunFiles(run_key=folder.name, folder=folder, spec=spec, train=train, error=error)
