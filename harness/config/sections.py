"""Building the protocol's sections from YAML: one section's dataclass, and the sections of the methods.

`build_section` turns a YAML mapping into a dataclass, reporting unknown keys, wrong types and out-of-range values.
The method part decides which methods a study trains (`study_methods`) and builds each one's settings from its own
section (`lora: {rank: 16}`) and from settings written in `train:` when a study method owns them. A method's section
may also hold training values (`lora: {learning_rate: 1e-4}`): they apply to that method's runs only. A section or
setting of a method the study does not train is an error that names its owner.

What this module does not hold: the other sections' checks and the grid (load.py), the dataclasses (schema.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields, replace
from typing import Any

from harness.config.fields import check_rules, convert_field, field_names, suggest
from harness.config.schema import TrainSpec
from harness.config.yaml_lines import Collector
from harness.methods import METHODS, setting_owners

# Training fields a method's section cannot set: they choose the method or the run's length of every method.
NOT_PER_METHOD = frozenset({"method"})


def build_section(cls: type, raw: Any, at: tuple, errs: Collector) -> Any:
    """A dataclass from a YAML mapping; unknown keys, wrong types and out-of-range values go to `errs`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errs.add(at, f"must be a mapping of keys to values, got {type(raw).__name__}.")
        return cls() if all(f.default is not dataclasses.MISSING for f in fields(cls)) else None
    names = field_names(cls)
    values = {}
    for key, value in raw.items():
        key = str(key)
        if key not in names:
            errs.add(at + (key,), f"unknown key; {suggest(key, names)}")
            continue
        try:
            values[key] = convert_field(cls, key, value)
        except ValueError as e:
            errs.add(at + (key,), f"{e}.")
    try:
        obj = cls(**values)
    except TypeError:
        return None  # a required key is missing; reported by the caller
    for name, message in check_rules(obj):
        if name in values:
            errs.add(at + (name,), message)
    return obj


# --------------------------------------------------------------------------------------------------------------
# Methods


def study_methods(train: TrainSpec, raw_grid: Any) -> tuple[str, ...]:
    """The registered methods the study trains: the grid's `method` axis, or train.method."""
    if isinstance(raw_grid, dict) and isinstance(raw_grid.get("method"), list) and raw_grid["method"]:
        return tuple(dict.fromkeys(str(m) for m in raw_grid["method"] if str(m) in METHODS))
    return (train.method,) if train.method in METHODS else ()


def split_train(raw: Any) -> tuple[Any, dict[str, Any]]:
    """(the TrainSpec part of `train:`, the other keys: settings of a method written without its section)."""
    if not isinstance(raw, dict):
        return raw, {}
    names = set(field_names(TrainSpec))
    return {k: v for k, v in raw.items() if str(k) in names}, {str(k): v for k, v in raw.items()
                                                               if str(k) not in names}


def settings_fields(method: str) -> list[str]:
    return field_names(METHODS.get(method).settings_type)


def build_methods(data: dict, loose: dict[str, Any], study: tuple[str, ...], train: TrainSpec, errs: Collector
                  ) -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]]:
    """Each study method's settings (from its section and the settings written in train:) and the training values
    its section sets, as Protocol.methods and Protocol.method_train."""
    _check_misplaced(data, loose, study, errs)
    methods, method_train = [], []
    for name in study:
        section = data.get(name)
        own, training = _split_section(section)
        settings = _settings(name, own, section, loose, errs)
        methods.append((name, settings))
        values = _training_values(name, training, train, errs)
        if values:
            method_train.append((name, tuple(sorted(values.items()))))
    return tuple(methods), tuple(method_train)


def _check_misplaced(data: dict, loose: dict[str, Any], study: tuple[str, ...], errs: Collector) -> None:
    trained = ", ".join(study) or "no valid method"
    for name in METHODS.names():
        if name in data and name not in study:
            errs.add((name,), f"is the settings section of method {name!r}, which this study does not train "
                              f"(it trains {trained}); add {name} to train.method or grid.method, or remove the "
                              "section.")
    for key in loose:
        owners = setting_owners(key)
        if any(o in study for o in owners):
            continue
        if owners:
            errs.add(("train", key), f"is a setting of method {', '.join(owners)}, but this study trains {trained}; "
                                     "remove it or train that method.")
        else:
            valid = field_names(TrainSpec) + sorted({f for m in study for f in settings_fields(m)})
            errs.add(("train", key), f"unknown key; {suggest(key, valid)}")


def _split_section(section: Any) -> tuple[Any, dict[str, Any]]:
    """(the method's own settings, the training values) of a method's section."""
    if not isinstance(section, dict):
        return section, {}
    train_names = set(field_names(TrainSpec))
    return ({k: v for k, v in section.items() if str(k) not in train_names},
            {str(k): v for k, v in section.items() if str(k) in train_names})


def _settings(name: str, own: Any, section: Any, loose: dict[str, Any], errs: Collector) -> Any:
    cls = METHODS.get(name)
    settings = build_section(cls.settings_type, own, (name,), errs) or cls.settings_type()
    for key, value in loose.items():
        if key not in settings_fields(name):
            continue
        if isinstance(section, dict) and key in section:
            errs.add(("train", key), f"is also set in the {name} section; keep one of them.")
            continue
        try:
            settings = replace(settings, **{key: convert_field(cls.settings_type, key, value)})
        except ValueError as e:
            errs.add(("train", key), f"{e}.")
    return settings


def _training_values(name: str, raw: dict[str, Any], train: TrainSpec, errs: Collector) -> dict[str, Any]:
    """The training values of a method's section, converted and range-checked like train:'s own."""
    values = {}
    for key, value in raw.items():
        if key in NOT_PER_METHOD:
            errs.add((name, key), f"cannot be set in a method's section; set train.{key} or grid.{key}.")
            continue
        try:
            values[key] = convert_field(TrainSpec, key, value)
        except ValueError as e:
            errs.add((name, key), f"{e}.")
    for key, message in check_rules(replace(train, **values)):
        if key in values:
            errs.add((name, key), message)
    return values


def apply_method_defaults(train: TrainSpec, given: set[str]) -> TrainSpec:
    """The protocol's training settings with its method's preferred values where the protocol set none."""
    if train.method not in METHODS:
        return train
    preferred = METHODS.get(train.method).preferred_train(train)
    return replace(train, **{k: v for k, v in preferred.items() if k not in given})


def train_of_method(train: TrainSpec, method: str, values: dict[str, Any]) -> TrainSpec:
    """`train` with the values of the method's own section."""
    return replace(train, method=method, **values)


def setting_places(data: dict, loose: dict[str, Any], study: tuple[str, ...]) -> dict[tuple[str, str], tuple]:
    """Where each method setting was written, so a problem with it points at its line."""
    places: dict[tuple[str, str], tuple] = {}
    for name in study:
        for key in settings_fields(name):
            if isinstance(data.get(name), dict) and key in data[name]:
                places[(name, key)] = (name, key)
            elif key in loose:
                places[(name, key)] = ("train", key)
    return places
