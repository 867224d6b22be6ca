"""The protocol schema: typed, frozen dataclasses loaded from a YAML file with strict validation.

`load_protocol(path)` is the only entry point. It reads the YAML, checks every key and value, resolves paths
(inputs relative to the protocol file, outputs relative to the working directory) and returns a `Protocol`.
Every problem found is reported together in one `ProtocolError` that names the file, the key, its YAML line,
what is wrong and how to fix it. Nothing here touches a GPU, a model or an image's pixels.

What this module does not hold: the expansion of the grid into runs (grid.py) and any heavy import.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

TINY_MODEL = "tiny"
TOYWORLD_MODEL = "toyworld"  # the pretrained toy text-to-image model shipped in harness/toyworld/weights
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Hub ids that tutorials still use but that no longer resolve, mapped to where the weights live now.
MOVED_MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": DEFAULT_MODEL,
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
# DreamBench uses a separate prompt list for live subjects (pets); these class nouns select it by default.
LIVE_CLASSES = frozenset({"dog", "cat", "puppy", "kitten", "animal", "pet"})
STEP_INDEPENDENT_SCHEDULES = frozenset({"constant", "constant_with_warmup"})

Dtype = Literal["fp16", "bf16", "fp32"]
MixedPrecision = Literal["no", "fp16", "bf16"]


@dataclass(frozen=True)
class ModelSpec:
    """The base text-to-image model: a hub id, a local diffusers folder, `tiny` (random, offline) or `toyworld`."""

    id: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: Dtype = "fp16"  # dtype of the frozen components and of inference

    @property
    def is_tiny(self) -> bool:
        return self.id == TINY_MODEL

    @property
    def is_toyworld(self) -> bool:
        return self.id == TOYWORLD_MODEL

    @property
    def is_local(self) -> bool:
        return not self.is_tiny and not self.is_toyworld and Path(self.id).is_dir()


@dataclass(frozen=True)
class SubjectSpec:
    """One subject: its instance images and how prompts name it."""

    name: str
    instance_dir: Path
    class_noun: str | None = None
    identifier: str = "sks"
    instance_prompt: str = "a {identifier} {class}"
    class_prompt: str = "a {class}"
    kind: Literal["auto", "object", "live"] = "auto"
    eval_prompts: tuple[str, ...] | None = None  # None: DreamBench's list for the subject's kind

    @property
    def live(self) -> bool:
        if self.kind == "auto":
            return (self.class_noun or "").lower() in LIVE_CLASSES
        return self.kind == "live"

    def fill(self, template: str) -> str:
        """A prompt template with `{identifier}` and `{class}` filled in."""
        return template.replace("{identifier}", self.identifier).replace("{class}", self.class_noun or "")

    @property
    def instance_text(self) -> str:
        return self.fill(self.instance_prompt)

    @property
    def class_text(self) -> str:
        return self.fill(self.class_prompt)


@dataclass(frozen=True)
class TrainSpec:
    """Training settings. Every field can also be a `grid:` axis."""

    method: Literal["dreambooth"] = "dreambooth"
    steps: int = 400
    learning_rate: float = 5e-6
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    mixed_precision: MixedPrecision = "bf16"
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    train_text_encoder: bool = False
    memory_mode: Literal["fast", "low_memory"] = "fast"
    snr_gamma: float | None = None
    offset_noise: float = 0.0
    checkpoint_every: int | None = None
    save: Literal["none", "final"] = "none"

    @property
    def uses_prior(self) -> bool:
        return self.prior_loss_weight > 0

    @property
    def snapshots_share_a_run(self) -> bool:
        """True when the schedule does not depend on the total step count, so one run serves every step value."""
        return self.lr_schedule in STEP_INDEPENDENT_SCHEDULES


# Fields that do not change the trained weights: left out of the run identity.
TRAIN_FIELDS_NOT_IN_IDENTITY = frozenset({"gradient_checkpointing", "checkpoint_every", "save"})


@dataclass(frozen=True)
class ClassImageSpec:
    """How class images for prior preservation are generated (the diffusers example's defaults)."""

    sampler: Literal["pndm", "ddim", "dpmsolver++", "euler", "euler_a"] = "pndm"
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int | None = None  # None: the largest batch that fits
    negative_prompt: str = ""


DEFAULT_CLASS_EVAL_PROMPTS = (
    "a {class}",
    "a photo of a {class}",
    "a {class} in the jungle",
    "a {class} on the beach",
    "a {class} in the snow",
    "a {class} on a cobblestone street",
)


@dataclass(frozen=True)
class EvalSpec:
    """How snapshots are sampled and scored."""

    backbones: Literal["real", "tiny", "toyworld"] = "real"
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    class_prompts: tuple[str, ...] = DEFAULT_CLASS_EVAL_PROMPTS
    sampler: Literal["dpmsolver++", "pndm", "ddim", "euler", "euler_a"] = "dpmsolver++"
    steps: int = 25
    guidance_scale: float = 7.5
    batch_size: int | None = None  # None: the largest batch that fits
    metrics: tuple[str, ...] = ("dino", "clip_i", "clip_t", "pres", "div_subject", "div_class")
    bootstrap_samples: int = 1000
    max_subject_prompts: int | None = None  # None: all prompts of the list


@dataclass(frozen=True)
class OutputSpec:
    """Where things are written. Relative paths are relative to the working directory."""

    runs_dir: Path = Path("runs")
    cache_dir: Path = Path("cache")
    results_dir: Path = Path("results")
    reports_dir: Path = Path("reports")


GRID_SUBJECT_KEY = "subject"


@dataclass(frozen=True)
class Protocol:
    name: str
    path: Path
    model: ModelSpec
    subjects: tuple[SubjectSpec, ...]
    train: TrainSpec
    class_images: ClassImageSpec
    eval: EvalSpec
    output: OutputSpec
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    description: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)  # non-fatal remarks (e.g. a moved model id)

    def subject(self, name: str) -> SubjectSpec:
        return next(s for s in self.subjects if s.name == name)

    @property
    def results_dir(self) -> Path:
        return self.output.results_dir / self.name

    @property
    def reports_dir(self) -> Path:
        return self.output.reports_dir / self.name


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "train": TrainSpec,
    "class_images": ClassImageSpec,
    "eval": EvalSpec,
    "output": OutputSpec,
}
TOP_LEVEL_KEYS = ("name", "description", "model", "subjects", "train", "class_images", "eval", "output", "grid")
GRID_KEYS = tuple(f.name for f in fields(TrainSpec)) + (GRID_SUBJECT_KEY,)


# --------------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    line: int | None = None


class ProtocolError(ValueError):
    """Every problem of a protocol file, each with its key, line and fix."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {len(problems)} problem(s) in the protocol; nothing was run."]
        for p in problems:
            where = f"{path}:{p.line}" if p.line else str(path)
            lines.append(f"  {where}: {p.key}: {p.message}")
        super().__init__("\n".join(lines))


def _suggest(word: str, candidates: typing.Iterable[str], noun: str = "keys") -> str:
    candidates = list(candidates)
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    valid = ", ".join(candidates)
    if close:
        return f"did you mean '{close[0]}'? Valid {noun}: {valid}."
    return f"valid {noun}: {valid}."


# --------------------------------------------------------------------------------------------------------------
# YAML with line numbers


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that reads `5e-6` as a float (YAML 1.1 wants `5.0e-6`) and rejects duplicate keys."""


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        __import__("re").X,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """The YAML document and a map from key path (('train', 'steps')) to its 1-based line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProtocolError(path, [Problem("(file)", f"cannot read the protocol file ({e.strerror}).")]) from None
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(e, "problem", None) or str(e)
        raise ProtocolError(
            path, [Problem("(syntax)", f"YAML syntax error: {reason}. Check indentation and quoting there.", line)]
        ) from None
    if node is None:
        raise ProtocolError(path, [Problem("(file)", "the protocol file is empty; see protocols/smoke.yaml.")])
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    _index_lines(node, (), lines, problems)
    if problems:
        raise ProtocolError(path, problems)
    data = yaml.load(text, Loader=_UniqueKeyLoader)
    return data, lines


def _index_lines(node: yaml.Node, at: tuple, lines: dict[tuple, int], problems: list[Problem]) -> None:
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(
                    Problem(_dotted(at + (key,)), "appears twice; keep one of them.", key_node.start_mark.line + 1)
                )
            seen.add(key)
            _index_lines(value_node, at + (key,), lines, problems)
            lines[at + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, at + (i,), lines, problems)


def _dotted(at: tuple) -> str:
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------------------------------------------
# Typed conversion of one value


class _Bad(Exception):
    pass


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in parts)
        return f"{inner} or null" if len(parts) < len(get_args(tp)) else inner
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any) -> Any:
    """`value` from YAML converted to the annotated type, or _Bad with what was expected."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg)
            except _Bad:
                continue
        raise _Bad(f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise _Bad(f"expected {_type_name(tp)}, got {value!r}; write it as a YAML list: [a, b]")
        return tuple(_convert(v, get_args(tp)[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Bad(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Bad(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad(f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str) and value.strip():
            return Path(value).expanduser()
        raise _Bad(f"expected a path, got {value!r}")
    raise TypeError(f"unsupported field type {tp}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def convert_field(cls: type, name: str, value: Any) -> Any:
    """Converts one YAML value to the type of `cls.name`; raises ValueError with the expectation."""
    try:
        return _convert(value, _hints(cls)[name])
    except _Bad as e:
        raise ValueError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------
# Value checks (impossible values) per section; each returns (field, message) pairs


def check_train(t: TrainSpec) -> list[tuple[str, str]]:
    out = []
    if t.steps <= 0:
        out.append(("steps", f"must be at least 1, got {t.steps}."))
    if not t.learning_rate > 0:
        out.append(("learning_rate", f"must be above 0, got {t.learning_rate}; DreamBooth uses 5e-6."))
    if t.learning_rate > 1e-2:
        out.append(("learning_rate", f"{t.learning_rate} is far too large for fine-tuning; DreamBooth uses 5e-6."))
    if t.lr_warmup_steps < 0:
        out.append(("lr_warmup_steps", f"must be 0 or more, got {t.lr_warmup_steps}."))
    if t.batch_size < 1:
        out.append(("batch_size", f"must be at least 1, got {t.batch_size}."))
    if t.resolution < 8 or t.resolution % 8:
        fix = max(8, round(t.resolution / 8) * 8)
        out.append(("resolution", f"must be a positive multiple of 8 (the VAE downsamples by 8), got "
                                  f"{t.resolution}; use {fix}."))
    if t.seed < 0:
        out.append(("seed", f"must be 0 or more, got {t.seed}."))
    if t.prior_loss_weight < 0:
        out.append(("prior_loss_weight", f"must be 0 or more, got {t.prior_loss_weight}; "
                                         "0 turns prior preservation off."))
    if t.num_class_images < 0:
        out.append(("num_class_images", f"must be 0 or more, got {t.num_class_images}."))
    if t.uses_prior and t.num_class_images == 0:
        out.append(("num_class_images", "is 0 while prior_loss_weight is above 0; give at least 1 class image "
                                        "(the paper uses 200-300 per subject) or set prior_loss_weight: 0."))
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            out.append((name, f"must be in [0, 1), got {getattr(t, name)}."))
    if t.adam_weight_decay < 0:
        out.append(("adam_weight_decay", f"must be 0 or more, got {t.adam_weight_decay}."))
    if not t.adam_epsilon > 0:
        out.append(("adam_epsilon", f"must be above 0, got {t.adam_epsilon}."))
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        out.append(("max_grad_norm", f"must be above 0 or null (no clipping), got {t.max_grad_norm}."))
    if t.snr_gamma is not None and not t.snr_gamma > 0:
        out.append(("snr_gamma", f"must be above 0 or null (off), got {t.snr_gamma}; 5.0 is the usual value."))
    if not 0 <= t.offset_noise < 1:
        out.append(("offset_noise", f"must be in [0, 1), got {t.offset_noise}; 0.05-0.1 are usual."))
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        out.append(("checkpoint_every", f"must be at least 1 or null, got {t.checkpoint_every}."))
    return out


def check_class_images(c: ClassImageSpec) -> list[tuple[str, str]]:
    out = []
    if c.steps < 1:
        out.append(("steps", f"must be at least 1, got {c.steps}."))
    if c.guidance_scale < 0:
        out.append(("guidance_scale", f"must be 0 or more, got {c.guidance_scale}."))
    if c.seed < 0:
        out.append(("seed", f"must be 0 or more, got {c.seed}."))
    if c.batch_size is not None and c.batch_size < 1:
        out.append(("batch_size", f"must be at least 1 or null (automatic), got {c.batch_size}."))
    return out


def check_eval(e: EvalSpec) -> list[tuple[str, str]]:
    from harness.metrics import METRICS  # numpy-only module; the registry is the source of valid names

    out = []
    if not e.seeds:
        out.append(("seeds", "is empty; give at least one seed, e.g. [0, 1, 2, 3]."))
    if len(set(e.seeds)) != len(e.seeds):
        out.append(("seeds", f"has repeated seeds {list(e.seeds)}; each seed should appear once."))
    if any(s < 0 for s in e.seeds):
        out.append(("seeds", "seeds must be 0 or more."))
    if not e.class_prompts:
        out.append(("class_prompts", "is empty; PRES and class diversity need at least 'a {class}'."))
    for p in e.class_prompts:
        if "{identifier}" in p:
            out.append(("class_prompts", f"{p!r} contains {{identifier}}; class prompts must not name the subject."))
    if e.steps < 1:
        out.append(("steps", f"must be at least 1, got {e.steps}."))
    if e.guidance_scale < 0:
        out.append(("guidance_scale", f"must be 0 or more, got {e.guidance_scale}."))
    if e.batch_size is not None and e.batch_size < 1:
        out.append(("batch_size", f"must be at least 1 or null (automatic), got {e.batch_size}."))
    for m in e.metrics:
        if m not in METRICS:
            out.append(("metrics", f"unknown metric {m!r}; {_suggest(m, METRICS, 'metrics')}"))
    if e.bootstrap_samples < 100:
        out.append(("bootstrap_samples", f"must be at least 100 for a usable interval, got {e.bootstrap_samples}."))
    if e.max_subject_prompts is not None and e.max_subject_prompts < 1:
        out.append(("max_subject_prompts", f"must be at least 1 or null (all), got {e.max_subject_prompts}."))
    return out


def check_model(m: ModelSpec) -> list[tuple[str, str]]:
    return []


_CHECKS = {TrainSpec: check_train, ClassImageSpec: check_class_images, EvalSpec: check_eval, ModelSpec: check_model}


# --------------------------------------------------------------------------------------------------------------
# Loading


class _Collector:
    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path = path
        self.lines = lines
        self.problems: list[Problem] = []

    def add(self, at: tuple, message: str) -> None:
        line = None
        for n in range(len(at), -1, -1):
            if at[:n] in self.lines:
                line = self.lines[at[:n]]
                break
        self.problems.append(Problem(_dotted(at) or "(top level)", message, line))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ProtocolError(self.path, self.problems)


def _build(cls: type, raw: Any, at: tuple, errs: _Collector, skip: tuple[str, ...] = ()) -> Any:
    """A dataclass from a YAML mapping; unknown keys, wrong types and impossible values go to `errs`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errs.add(at, f"must be a mapping of keys to values, got {type(raw).__name__}.")
        return cls() if all(f.default is not dataclasses.MISSING for f in fields(cls)) else None
    names = [f.name for f in fields(cls) if f.name not in skip]
    values = {}
    for key, value in raw.items():
        key = str(key)
        if key not in names:
            errs.add(at + (key,), f"unknown key; {_suggest(key, names)}")
            continue
        try:
            values[key] = convert_field(cls, key, value)
        except ValueError as e:
            errs.add(at + (key,), f"{e}.")
    try:
        obj = cls(**values)
    except TypeError:
        return None  # a required key is missing; reported by the caller
    check = _CHECKS.get(cls)
    for name, message in check(obj) if check else []:
        errs.add(at + (name,), message)
    return obj


def _resolve_input(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def _build_model(raw: Any, base: Path, errs: _Collector, notes: list[str]) -> ModelSpec:
    model = _build(ModelSpec, raw, ("model",), errs) or ModelSpec()
    mid = model.id.strip()
    if mid in MOVED_MODEL_IDS:
        new = MOVED_MODEL_IDS[mid]
        notes.append(f"model.id {mid!r} was removed from the Hugging Face hub in 2024 (it gives a 404); using its "
                     f"copy {new!r} instead. Write that id in the protocol to silence this note.")
        mid = new
    if mid == TOYWORLD_MODEL:
        return replace(model, id=mid, revision=_toyworld_revision(model.revision, errs))
    if mid != TINY_MODEL:
        looks_local = mid.startswith((".", "/", "~")) or (base / mid).is_dir() or mid.count("/") != 1
        if looks_local:
            folder = _resolve_input(base, Path(mid).expanduser())
            if not folder.is_dir():
                errs.add(("model", "id"), f"{mid!r} is neither a hub id (owner/name) nor an existing folder "
                                          f"(looked for {folder}). Give a hub id such as {DEFAULT_MODEL!r}, a "
                                          f"diffusers folder, 'toyworld' for the pretrained toy model, or 'tiny' "
                                          "for the offline test model.")
            elif not (folder / "model_index.json").is_file():
                errs.add(("model", "id"), f"the folder {folder} has no model_index.json, so it is not a diffusers "
                                          "pipeline; save one with pipeline.save_pretrained(folder).")
            mid = str(folder)
    return replace(model, id=mid)


def _toyworld_revision(given: str | None, errs: _Collector) -> str | None:
    """The shipped weights' digest: it joins every run's identity, so retrained weights never reuse old runs."""
    from harness.toyworld.models import ToyWorldWeightsError, weights_revision

    try:
        revision = weights_revision()
    except ToyWorldWeightsError as error:
        errs.add(("model", "id"), str(error))
        return given
    if given is not None and given != revision:
        errs.add(("model", "revision"), f"{given!r} does not match the shipped toy-world weights ({revision!r}); "
                                        "remove model.revision (it is filled in from the weights' manifest).")
    return revision


def _build_subjects(raw: Any, base: Path, errs: _Collector) -> tuple[SubjectSpec, ...]:
    if raw is None:
        errs.add(("subjects",), "is missing; list at least one subject with name and instance_dir "
                                "(see protocols/smoke.yaml).")
        return ()
    if not isinstance(raw, list) or not raw:
        errs.add(("subjects",), "must be a non-empty list of subjects, each with name and instance_dir.")
        return ()
    subjects = []
    for i, item in enumerate(raw):
        at = ("subjects", i)
        subject = _build(SubjectSpec, item, at, errs)
        if subject is None:
            missing = [k for k in ("name", "instance_dir") if not isinstance(item, dict) or k not in item]
            if missing:
                errs.add(at, f"is missing {' and '.join(missing)}; every subject needs a name and an instance_dir.")
            continue
        folder = _resolve_input(base, subject.instance_dir)
        if not folder.is_dir():
            parent = "" if folder.parent.is_dir() else f" (nor does its parent {folder.parent})"
            errs.add(at + ("instance_dir",), f"folder {folder} does not exist{parent}. Paths are relative to the "
                                             "protocol file's folder; point it at a folder of 3-6 photos of the "
                                             "subject.")
        for key in ("instance_prompt", "class_prompt"):
            template = getattr(subject, key)
            unknown = _unknown_placeholders(template)
            if unknown:
                errs.add(at + (key,), f"{template!r} has unknown placeholder(s) {unknown}; use {{identifier}} "
                                      "and {class}.")
        if "{identifier}" not in subject.instance_prompt:
            errs.add(at + ("instance_prompt",), f"{subject.instance_prompt!r} does not contain {{identifier}}, so "
                                                "training could not bind the subject to its token.")
        if "{identifier}" in subject.class_prompt:
            errs.add(at + ("class_prompt",), f"{subject.class_prompt!r} contains {{identifier}}; the class prompt "
                                             "must describe the generic class, e.g. 'a {class}'.")
        if not subject.identifier.strip() or " " in subject.identifier.strip():
            errs.add(at + ("identifier",), f"{subject.identifier!r} must be one non-empty word, e.g. 'sks'.")
        if subject.eval_prompts is not None and not subject.eval_prompts:
            errs.add(at + ("eval_prompts",), "is empty; remove it to use DreamBench's prompt list.")
        subjects.append(replace(subject, instance_dir=folder))
    names = [s.name for s in subjects]
    for name in {n for n in names if names.count(n) > 1}:
        errs.add(("subjects",), f"the name {name!r} is used by more than one subject; names must be unique.")
    return tuple(subjects)


def _unknown_placeholders(template: str) -> list[str]:
    import string

    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    return [n for n in names if n not in ("identifier", "class")]


def _build_grid(raw: Any, train: TrainSpec, subjects: tuple[SubjectSpec, ...], errs: _Collector) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        errs.add(("grid",), "must be a mapping from a training field to a list of values, "
                            "e.g. prior_loss_weight: [0, 1].")
        return ()
    axes = []
    for key, values in raw.items():
        key = str(key)
        at = ("grid", key)
        if key not in GRID_KEYS:
            errs.add(at, f"is not a field that can be varied; {_suggest(key, GRID_KEYS)}")
            continue
        if not isinstance(values, list):
            errs.add(at, f"must be a list of values, got {values!r}; write [{values}] for a single value.")
            continue
        if not values:
            errs.add(at, "is an empty list, so the grid would have no runs; give at least one value or remove it.")
            continue
        converted = []
        for i, value in enumerate(values):
            if key == GRID_SUBJECT_KEY:
                names = [s.name for s in subjects]
                if value not in names:
                    hint = _suggest(str(value), names, "subjects")
                    errs.add(at + (i,), f"{value!r} is not a subject of this protocol; {hint}")
                    continue
                converted.append(value)
                continue
            try:
                v = convert_field(TrainSpec, key, value)
            except ValueError as e:
                errs.add(at + (i,), f"{e}.")
                continue
            for name, message in check_train(replace(train, **{key: v})):
                if name == key:
                    errs.add(at + (i,), message)
            converted.append(v)
        if len(set(map(repr, converted))) != len(converted):
            errs.add(at, f"has repeated values {values}; list each value once.")
        axes.append((key, tuple(converted)))
    return tuple(axes)


def _check_combinations(protocol: Protocol, errs: _Collector) -> None:
    """Contradictions that only show across sections (grid values against subjects, and so on)."""
    axes = dict(protocol.grid)
    weights = axes.get("prior_loss_weight", (protocol.train.prior_loss_weight,))
    chosen = axes.get(GRID_SUBJECT_KEY, tuple(s.name for s in protocol.subjects))
    if any(w > 0 for w in weights):
        for i, s in enumerate(protocol.subjects):
            if s.name in chosen and not s.class_noun:
                errs.add(("subjects", i, "class_noun"),
                         f"subject {s.name!r} has no class_noun, but prior_loss_weight is above 0, which needs class "
                         "images of the class; add class_noun (e.g. dog) or set prior_loss_weight: 0.")
        counts = axes.get("num_class_images", (protocol.train.num_class_images,))
        if 0 in counts:
            errs.add(("grid", "num_class_images"), "contains 0 while prior_loss_weight is above 0; remove 0 "
                                                   "(prior_loss_weight 0 already covers training without a prior).")
    for i, s in enumerate(protocol.subjects):
        if not s.class_noun and ("{class}" in s.instance_prompt):
            errs.add(("subjects", i, "class_noun"), f"is missing but instance_prompt {s.instance_prompt!r} uses "
                                                    "{class}; add class_noun or write the prompt without {class}.")
    steps = axes.get("steps", (protocol.train.steps,))
    warmups = axes.get("lr_warmup_steps", (protocol.train.lr_warmup_steps,))
    if max(warmups) >= min(steps) and protocol.train.lr_schedule != "constant":
        errs.add(("train", "lr_warmup_steps"), f"warm-up of {max(warmups)} steps is not shorter than the shortest "
                                               f"run ({min(steps)} steps); lower lr_warmup_steps.")
    if protocol.train.memory_mode == "low_memory" and protocol.train.train_text_encoder:
        errs.add(("train", "memory_mode"), "low_memory does not support train_text_encoder: true; use "
                                           "memory_mode: fast or leave the text encoder frozen.")
    if protocol.model.is_toyworld:
        _check_toyworld(protocol, errs)


def _check_toyworld(protocol: Protocol, errs: _Collector) -> None:
    """The toy model draws 64x64 images and knows only its world's words: anything else is an error up front."""
    from harness.toyworld.models import unknown_words
    from harness.toyworld.world import IMAGE_SIZE, vocabulary

    resolutions = dict(protocol.grid).get("resolution", (protocol.train.resolution,))
    if any(r != IMAGE_SIZE for r in resolutions):
        errs.add(("train", "resolution"), f"the toy-world model was trained at {IMAGE_SIZE}x{IMAGE_SIZE}; set "
                                          f"train.resolution: {IMAGE_SIZE}.")
    known = "Its words are: " + " ".join(vocabulary()) + "."

    def check(at: tuple, template: str, subject: SubjectSpec) -> None:
        unknown = unknown_words(subject.fill(template))
        if unknown:
            errs.add(at, f"{template!r} has words the toy world does not know: {', '.join(unknown)}. {known}")

    for i, subject in enumerate(protocol.subjects):
        check(("subjects", i, "instance_prompt"), subject.instance_prompt, subject)
        check(("subjects", i, "class_prompt"), subject.class_prompt, subject)
        if subject.eval_prompts is None:
            errs.add(("subjects", i, "eval_prompts"), "is needed with model.id: toyworld: DreamBench's prompts name "
                                                      "things the toy world has never seen. List prompts in its "
                                                      "words, e.g. 'a {identifier} {class} on grass'.")
        for j, template in enumerate(subject.eval_prompts or ()):
            check(("subjects", i, "eval_prompts", j), template, subject)
        for j, template in enumerate(protocol.eval.class_prompts):
            check(("eval", "class_prompts", j), template, subject)


def load_protocol(path: str | Path) -> Protocol:
    """Reads and validates a protocol file. Raises ProtocolError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(path, [Problem("(file)", "protocol file not found; check the path "
                                                     "(the examples live in protocols/).")])
    data, lines = _read_yaml(path)
    errs = _Collector(path, lines)
    if not isinstance(data, dict):
        errs.add((), "the protocol must be a YAML mapping with keys such as model, subjects, train and grid.")
        errs.raise_if_any()
    for key in data:
        if str(key) not in TOP_LEVEL_KEYS:
            errs.add((str(key),), f"unknown top-level key; {_suggest(str(key), TOP_LEVEL_KEYS)}")
    base = path.resolve().parent
    notes: list[str] = []
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\ "):
        errs.add(("name",), f"must be a non-empty word usable as a folder name, got {name!r}.")
        name = path.stem
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        errs.add(("description",), "must be a string.")
        description = ""
    model = _build_model(data.get("model"), base, errs, notes)
    subjects = _build_subjects(data.get("subjects"), base, errs)
    train = _build(TrainSpec, data.get("train"), ("train",), errs) or TrainSpec()
    class_images = _build(ClassImageSpec, data.get("class_images"), ("class_images",), errs) or ClassImageSpec()
    evaluation = _build(EvalSpec, data.get("eval"), ("eval",), errs) or EvalSpec()
    output = _build(OutputSpec, data.get("output"), ("output",), errs) or OutputSpec()
    grid = _build_grid(data.get("grid"), train, subjects, errs)
    protocol = Protocol(
        name=name, path=path.resolve(), model=model, subjects=subjects, train=train, class_images=class_images,
        eval=evaluation, output=output, grid=grid, description=description.strip(), notes=tuple(notes),
    )
    if subjects:
        _check_combinations(protocol, errs)
    errs.raise_if_any()
    return protocol
