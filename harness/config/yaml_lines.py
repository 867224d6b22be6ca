"""YAML with line numbers: the protocol document, a map from every key path to its line, and the error type.

`read_yaml(path)` returns the document and {('train', 'steps'): 14, ...}; duplicate keys and syntax errors become a
`ProtocolError` naming the line. `Collector` gathers every problem of a protocol so they are reported together.

What this module does not hold: what the keys mean (schema.py, load.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that reads `5e-6` as a float (YAML 1.1 wants `5.0e-6`); duplicates are found by read_yaml."""


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_text(path: Path) -> str:
    """The protocol file's text; a missing file, a folder or a binary file is a ProtocolError."""
    if path.is_dir():
        raise ProtocolError(path, [Problem("(file)", "is a folder, not a protocol file; give the path of a .yaml "
                                                     "file (the examples live in protocols/).")])
    if not path.is_file():
        raise ProtocolError(path, [Problem("(file)", "protocol file not found; check the path "
                                                     "(the examples live in protocols/).")])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(path, [Problem("(file)", "is not a text file (it is not UTF-8); a protocol is a YAML "
                                                     "text file such as protocols/smoke.yaml.")]) from None
    except OSError as e:
        raise ProtocolError(path, [Problem("(file)", f"cannot read the protocol file ({e.strerror}).")]) from None


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """The YAML document and a map from key path (('train', 'steps')) to its 1-based line."""
    text = read_text(path)
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
    return yaml.load(text, Loader=_UniqueKeyLoader), lines


def _index_lines(node: yaml.Node, at: tuple, lines: dict[tuple, int], problems: list[Problem]) -> None:
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(
                    Problem(dotted(at + (key,)), "appears twice; keep one of them.", key_node.start_mark.line + 1)
                )
            seen.add(key)
            _index_lines(value_node, at + (key,), lines, problems)
            lines[at + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, at + (i,), lines, problems)


def dotted(at: tuple) -> str:
    """('grid', 'steps', 1) -> 'grid.steps[1]'."""
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Collector:
    """Problems of one protocol file, each placed at the line of the deepest key path known."""

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
        self.problems.append(Problem(dotted(at) or "(top level)", message, line))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ProtocolError(self.path, self.problems)
