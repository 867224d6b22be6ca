"""Building a `Protocol` from a YAML file, with every problem reported together.

`load_protocol(path)` reads the file (yaml_lines.py), builds each section's dataclass (schema.py) converting and
range-checking every value (fields.py), resolves paths (inputs relative to the protocol file, outputs relative to
the working directory), checks what only shows across sections, and asks the registries about what they own:
the model backend checks `model` (and may check the rest against what its model can do), the method registry the
method sections and settings (built in sections.py), the metric and backbone registries `eval`. Nothing here
touches a GPU, a model or an image's pixels, and no registry entry is imported unless the protocol names it.

What this module does not hold: building one section or the method sections (sections.py), the expansion of the
grid into runs (grid.py).
"""

from __future__ import annotations

import string
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.backbones import BACKBONES
from harness.backends import backend_of
from harness.config.execution import check_execution
from harness.config.fields import check_rules, convert_field, field_names, suggest
from harness.config.schema import (
    CLASS_GENERATION_FIELDS,
    GRID_SUBJECT_KEY,
    ClassImageSpec,
    EvalSpec,
    ExecutionSpec,
    LimitSpec,
    ModelSpec,
    OutputSpec,
    Protocol,
    SubjectSpec,
    TrainSpec,
)
from harness.config.sections import (
    apply_method_defaults,
    build_methods,
    build_section,
    setting_places,
    settings_fields,
    split_train,
    study_methods,
    train_of_method,
)
from harness.config.yaml_lines import Collector, read_yaml
from harness.methods import METHODS, setting_owners
from harness.metrics import METRICS, features_for

BASE_TOP_LEVEL_KEYS = ("name", "description", "model", "subjects", "train", "class_images", "eval", "output", "grid",
                       "execution", "limits")


def top_level_keys() -> list[str]:
    """The sections a protocol may have: the fixed ones and one per registered method."""
    return [*BASE_TOP_LEVEL_KEYS, *METHODS.names()]


# --------------------------------------------------------------------------------------------------------------
# Sections


def _build_model(raw: Any, base: Path, errs: Collector, notes: list[str]) -> ModelSpec:
    model = build_section(ModelSpec, raw, ("model",), errs) or ModelSpec()
    model = replace(model, id=model.id.strip())
    resolved = backend_of(model).resolve(model, base)
    for key, message in resolved.problems:
        errs.add(("model", key), message)
    notes += resolved.notes
    return resolved.model


def _build_subjects(raw: Any, base: Path, errs: Collector) -> tuple[SubjectSpec, ...]:
    if raw is None:
        errs.add(("subjects",), "is missing; list at least one subject with name and instance_dir "
                                "(see protocols/smoke.yaml).")
        return ()
    if not isinstance(raw, list) or not raw:
        errs.add(("subjects",), "must be a non-empty list of subjects, each with name and instance_dir.")
        return ()
    subjects = []
    missing_data: dict[str, list[tuple[int, SubjectSpec, Path]]] = {}  # download hint -> subjects it would fill
    for i, item in enumerate(raw):
        at = ("subjects", i)
        subject = build_section(SubjectSpec, item, at, errs)
        if subject is None:
            missing = [k for k in ("name", "instance_dir") if not isinstance(item, dict) or k not in item]
            if missing:
                errs.add(at, f"is missing {' and '.join(missing)}; every subject needs a name and an instance_dir.")
            continue
        folder = subject.instance_dir if subject.instance_dir.is_absolute() else (base / subject.instance_dir).resolve()
        if not folder.is_dir() and (hint := _dataset_hint(folder)):
            missing_data.setdefault(hint, []).append((i, subject, folder))
        elif not folder.is_dir():
            parent = "" if folder.parent.is_dir() else f" (nor does its parent {folder.parent})"
            errs.add(at + ("instance_dir",), f"folder {folder} does not exist{parent}. Paths are relative to the "
                                             "protocol file's folder; point it at a folder of 3-6 photos of the "
                                             "subject.")
        _check_subject_prompts(subject, at, errs)
        subjects.append(replace(subject, instance_dir=folder))
    for hint, missing in missing_data.items():
        _missing_dataset(hint, missing, errs)
    names = [s.name for s in subjects]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errs.add(("subjects",), f"the name {name!r} is used by more than one subject; names must be unique.")
    return tuple(subjects)


def _dataset_hint(folder: Path) -> str:
    """Where a public dataset folder is missing, the command that downloads it ("" elsewhere)."""
    try:
        from harness.datasets import dataset_hint
    except ImportError:
        return ""
    return dataset_hint(folder) or ""


def _missing_dataset(hint: str, missing: list[tuple[int, SubjectSpec, Path]], errs: Collector) -> None:
    """One problem for every missing instance folder that one download fills, at the first such subject."""
    first, _, folder = missing[0]
    if len(missing) == 1:
        errs.add(("subjects", first, "instance_dir"), f"folder {folder} does not exist. {hint[:1].upper()}{hint[1:]}, "
                                                      "then run this command again.")
        return
    names = [s.name for _, s, _ in missing]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    errs.add(("subjects", first, "instance_dir"), f"the instance folders of {len(missing)} subjects ({shown}) do not "
                                                  f"exist under {folder.parent}. {hint[:1].upper()}{hint[1:]}, then "
                                                  "run this command again.")


def _check_subject_prompts(subject: SubjectSpec, at: tuple, errs: Collector) -> None:
    for key in ("instance_prompt", "class_prompt"):
        template = getattr(subject, key)
        unknown = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None
                   and f not in ("identifier", "class")]
        if unknown:
            errs.add(at + (key,), f"{template!r} has unknown placeholder(s) {unknown}; use {{identifier}} and "
                                  "{class}.")
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


def _identifier_problem(subject: SubjectSpec) -> str | None:
    """The identifier must tell the subject apart from its class: it cannot be a word of the class prompt."""
    identifier = subject.identifier.strip().lower()
    class_words = subject.class_text.lower().split()
    if not identifier or " " in identifier or identifier not in [subject.class_noun or "", *class_words]:
        return None
    what = "the class noun itself" if identifier == (subject.class_noun or "").lower() else \
        f"a word of the class prompt {subject.class_text!r}"
    return (f"{subject.identifier!r} is {what}, so the instance prompt {subject.instance_text!r} cannot tell the "
            "subject from its class. Use a rare token the model does not know as a word, e.g. 'sks'.")


def _check_train(train: TrainSpec, at: tuple, errs: Collector, given: set[str]) -> None:
    if train.method not in METHODS:
        errs.add(at + ("method",), METHODS.unknown_message(train.method))
    if train.uses_prior and train.num_class_images == 0 and "num_class_images" in given:
        errs.add(at + ("num_class_images",), "is 0 while prior_loss_weight is above 0; give at least 1 class "
                                             "image (the paper uses 200-300 per subject) or set prior_loss_weight: 0.")


def _check_eval(spec: EvalSpec, errs: Collector) -> None:
    at = ("eval",)
    if spec.backbones not in BACKBONES:
        errs.add(at + ("backbones",), BACKBONES.unknown_message(spec.backbones))
    if not spec.seeds:
        errs.add(at + ("seeds",), "is empty; give at least one seed, e.g. [0, 1, 2, 3].")
    if len(set(spec.seeds)) != len(spec.seeds):
        errs.add(at + ("seeds",), f"has repeated seeds {list(spec.seeds)}; each seed should appear once.")
    if any(s < 0 for s in spec.seeds):
        errs.add(at + ("seeds",), "seeds must be 0 or more.")
    if not spec.class_prompts:
        errs.add(at + ("class_prompts",), "is empty; PRES and class diversity need at least 'a {class}'.")
    for p in spec.class_prompts:
        if "{identifier}" in p:
            errs.add(at + ("class_prompts",), f"{p!r} contains {{identifier}}; class prompts must not name the "
                                              "subject.")
    for m in spec.metrics:
        if m not in METRICS:
            errs.add(at + ("metrics",), f"unknown metric {m!r}; {suggest(m, METRICS.names(), 'metrics')}")
    if spec.lpips_net != EvalSpec.lpips_net and spec.backbones in BACKBONES:
        offered = BACKBONES.get(spec.backbones).lpips_nets
        if spec.lpips_net not in offered:
            errs.add(at + ("lpips_net",), f"the {spec.backbones!r} backbone set has one LPIPS network of its own, "
                                          f"so it cannot use {spec.lpips_net!r}; remove eval.lpips_net.")


def _build_class_images(raw: Any, base: Path, errs: Collector) -> ClassImageSpec:
    """The class-image section; a folder is resolved against the protocol's folder and must exist."""
    at = ("class_images",)
    spec = build_section(ClassImageSpec, raw, at, errs) or ClassImageSpec()
    given = set(raw) if isinstance(raw, dict) else set()
    if not spec.from_folder:
        if spec.dir is not None:
            errs.add(at + ("dir",), "is only read with source: folder; add source: folder to train on that folder's "
                                    "images, or remove dir to generate class images.")
        return spec
    for key in sorted(given & set(CLASS_GENERATION_FIELDS)):
        errs.add(at + (key,), "describes generated class images and has no effect with source: folder; remove it.")
    if spec.dir is None:
        errs.add(at + ("source",), "is folder but dir is missing; add dir: PATH (a folder of photos of the class, "
                                   "relative to the protocol file).")
        return spec
    folder = spec.dir if spec.dir.is_absolute() else (base / spec.dir).resolve()
    if not folder.is_dir():
        errs.add(at + ("dir",), f"folder {folder} does not exist; paths are relative to the protocol file's folder.")
    return replace(spec, dir=folder)


# --------------------------------------------------------------------------------------------------------------
# The grid


def grid_keys(study: tuple[str, ...]) -> list[str]:
    """Keys a grid may vary: training fields, subject, and the settings of the study's methods (bare, or
    qualified as method.key)."""
    settings = [k for m in study for k in settings_fields(m)]
    qualified = [f"{m}.{k}" for m in study for k in settings_fields(m)]
    return list(dict.fromkeys([*field_names(TrainSpec), GRID_SUBJECT_KEY, *settings, *qualified]))


def setting_target(key: str, study: tuple[str, ...]) -> tuple[str | None, str]:
    """(method or None for every study method that has it, setting name) of a grid key naming a method setting."""
    if "." in key:
        method, _, name = key.partition(".")
        return method, name
    return None, key


def _convert_grid_value(key: str, value: Any, train: TrainSpec, protocol_methods: dict[str, Any],
                        study: tuple[str, ...]) -> tuple[Any, list[str]]:
    """A grid value converted, and what is wrong with it."""
    if key in field_names(TrainSpec):
        v = convert_field(TrainSpec, key, value)
        candidate = replace(train, **{key: v})
        problems = [message for name, message in check_rules(candidate) if name == key]
        if key == "method" and v not in METHODS:
            problems.append(METHODS.unknown_message(v))
        for method, settings in protocol_methods.items():
            problems += [message for _, message in METHODS.get(method).check(settings, candidate)]
        return v, problems
    method, name = setting_target(key, study)
    owners = [method] if method else [m for m in study if name in settings_fields(m)]
    v = convert_field(METHODS.get(owners[0]).settings_type, name, value)
    problems = []
    for owner in owners:
        candidate = replace(protocol_methods[owner], **{name: v})
        problems += [message for field_name, message in check_rules(candidate) if field_name == name]
        problems += [message for field_name, message in METHODS.get(owner).check(candidate, train)
                     if field_name == name]
    return v, problems


def _build_grid(raw: Any, train: TrainSpec, subjects: tuple[SubjectSpec, ...], methods: tuple[tuple[str, Any], ...],
                study: tuple[str, ...], errs: Collector) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        errs.add(("grid",), "must be a mapping from a training field to a list of values, "
                            "e.g. prior_loss_weight: [0, 1].")
        return ()
    valid = grid_keys(study)
    axes = []
    for key, values in raw.items():
        key = str(key)
        at = ("grid", key)
        if key not in valid:
            owners = setting_owners(key.partition(".")[2] if "." in key else key)
            if owners:
                errs.add(at, f"is a setting of method {', '.join(owners)}, which this study does not train; add "
                             "it to grid.method (or train.method) or remove this axis.")
            else:
                errs.add(at, f"is not a field that can be varied; {suggest(key, valid)}")
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
                    errs.add(at + (i,), f"{value!r} is not a subject of this protocol; "
                                        f"{suggest(str(value), names, 'subjects')}")
                    continue
                converted.append(value)
                continue
            try:
                v, problems = _convert_grid_value(key, value, train, dict(methods), study)
            except ValueError as e:
                errs.add(at + (i,), f"{e}.")
                continue
            for message in problems:
                errs.add(at + (i,), message)
            converted.append(v)
        if len(set(map(repr, converted))) != len(converted):
            errs.add(at, f"has repeated values {values}; list each value once.")
        axes.append((key, tuple(converted)))
    return tuple(axes)


def _check_grid_size(protocol: Protocol, errs: Collector) -> None:
    """A grid bigger than the cap is refused before it is expanded: one typo (a seventh axis, a range written out)
    can make a study of millions of runs, and expanding it alone would take minutes."""
    size, cap = protocol.grid_size, protocol.limits.max_grid_points
    if size <= cap:
        return
    factors = [f"{len(protocol.grid_subjects)} subject(s)"]
    factors += [f"{len(values)} {key}" for key, values in protocol.grid if key != GRID_SUBJECT_KEY]
    errs.add(("grid",), f"has {size:,} points ({' x '.join(factors)}), more than the cap of {cap:,} "
                        "(limits.max_grid_points). Narrow the grid; if the study really is this big, raise the cap "
                        f"with `limits: {{max_grid_points: {size}}}` in the protocol.")


# --------------------------------------------------------------------------------------------------------------
# Checks across sections


def _check_combinations(protocol: Protocol, errs: Collector, setting_at: dict[tuple[str, str], tuple]) -> None:
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
        if 0 in counts and "num_class_images" in axes:
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
    for name, settings in protocol.methods:
        train = train_of_method(protocol.train, name, protocol.method_train_values(name))
        for key, message in METHODS.get(name).check(settings, train):
            errs.add(setting_at.get((name, key), (name, key)), message)
    backend = backend_of(protocol.model)
    _check_lpips_size(protocol, axes, errs)
    for at, message in backend.check_protocol(protocol):
        errs.add(at, message)
    for i, s in enumerate(protocol.subjects):
        problem = _identifier_problem(s) or backend.identifier_problem(protocol.model, s.identifier.strip())
        if problem:
            errs.add(("subjects", i, "identifier"), problem)


def _check_lpips_size(protocol: Protocol, axes: dict[str, tuple], errs: Collector) -> None:
    """LPIPS metrics on images smaller than the network's pooling layers take: refused now, not after training."""
    spec = protocol.eval
    if "lpips" not in features_for(spec.metrics) or spec.backbones not in BACKBONES:
        return
    smallest = BACKBONES.get(spec.backbones).lpips_min_side.get(spec.lpips_net, 0)
    resolution = min(axes.get("resolution", (protocol.train.resolution,)))
    if resolution < smallest:
        where = ("grid", "resolution") if "resolution" in axes else ("train", "resolution")
        errs.add(where, f"{resolution} px images are too small for LPIPS {spec.lpips_net} (div_lpips, "
                        f"div_lpips_class need at least {smallest} px); raise the resolution or leave those metrics "
                        "out of eval.metrics.")


# --------------------------------------------------------------------------------------------------------------
# Entry point


def load_protocol(path: str | Path) -> Protocol:
    """Reads and validates a protocol file. Raises ProtocolError listing every problem found."""
    path = Path(path)
    data, lines = read_yaml(path)
    errs = Collector(path, lines)
    if not isinstance(data, dict):
        errs.add((), "the protocol must be a YAML mapping with keys such as model, subjects, train and grid.")
        errs.raise_if_any()
    valid_top = top_level_keys()
    for key in data:
        if str(key) not in valid_top:
            errs.add((str(key),), f"unknown top-level key; {suggest(str(key), valid_top)}")
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
    train_raw, loose = split_train(data.get("train"))
    given = {str(k) for k in train_raw} if isinstance(train_raw, dict) else set()
    train = build_section(TrainSpec, train_raw, ("train",), errs) or TrainSpec()
    _check_train(train, ("train",), errs, given)
    train = apply_method_defaults(train, given)
    study = study_methods(train, data.get("grid"))
    methods, per_method_train = build_methods(data, loose, study, train, errs)
    class_images = _build_class_images(data.get("class_images"), base, errs)
    evaluation = build_section(EvalSpec, data.get("eval"), ("eval",), errs) or EvalSpec()
    _check_eval(evaluation, errs)
    output = build_section(OutputSpec, data.get("output"), ("output",), errs) or OutputSpec()
    execution = build_section(ExecutionSpec, data.get("execution"), ("execution",), errs) or ExecutionSpec()
    check_execution(execution, errs)
    grid = _build_grid(data.get("grid"), train, subjects, methods, study, errs)
    limits = build_section(LimitSpec, data.get("limits"), ("limits",), errs) or LimitSpec()
    protocol = Protocol(
        name=name, path=path.resolve(), model=model, subjects=subjects, train=train, class_images=class_images,
        eval=evaluation, output=output, grid=grid, description=description.strip(), methods=methods,
        method_train=per_method_train, train_unset=frozenset(field_names(TrainSpec)) - given, notes=tuple(notes),
        execution=execution, limits=limits,
    )
    if subjects:
        _check_grid_size(protocol, errs)
        _check_combinations(protocol, errs, setting_places(data, loose, study))
    errs.raise_if_any()
    return protocol
