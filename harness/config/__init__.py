"""The protocol: typed, frozen dataclasses loaded from a YAML file with strict validation.

`load_protocol(path)` is the only entry point; it returns a `Protocol` or raises a `ProtocolError` that lists
every problem with its file, line, key and fix. The parts: schema.py (the dataclasses and the range of every field),
yaml_lines.py (YAML with line numbers), fields.py (conversion and range checks), sections.py (one section, and the
methods' sections), load.py (building and checks across sections).
"""

from harness.config.execution import override_execution
from harness.config.load import load_protocol
from harness.config.schema import (
    DEFAULT_CLASS_EVAL_PROMPTS,
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    GRID_SUBJECT_KEY,
    LIVE_CLASSES,
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
from harness.config.yaml_lines import Problem, ProtocolError

__all__ = [
    "DEFAULT_CLASS_EVAL_PROMPTS", "DEFAULT_METHOD", "DEFAULT_MODEL", "GRID_SUBJECT_KEY", "LIVE_CLASSES",
    "ClassImageSpec", "EvalSpec", "ExecutionSpec", "LimitSpec", "ModelSpec", "OutputSpec", "Problem", "Protocol",
    "ProtocolError", "SubjectSpec", "TrainSpec", "load_protocol", "override_execution",
]
