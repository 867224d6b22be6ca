"""Which protocol file owns `results/<name>/` and `reports/<name>/`, so two files with the same `name:` never write
over each other's outputs.

A protocol's outputs are named after its `name:` (the file name by default). A copy of a protocol that keeps the
name would silently replace the other's CSVs and report. `claim_outputs` records the owner (`owner.json`: the
protocol file, relative to the folder and absolute) in each output folder before any work; `check_outputs` (the
dry run) only checks. Another file is refused while it still exists and still declares the name; a moved study, a
renamed or deleted protocol file hands the folder over silently.

What this module does not hold: what the folders contain (results, report).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from harness.config import Problem, Protocol, ProtocolError
from harness.store import atomic_write_json, read_json

OWNER_FILE = "owner.json"


def output_folders(protocol: Protocol) -> list[Path]:
    return [protocol.results_dir, protocol.reports_dir]


def check_outputs(protocol: Protocol) -> None:
    """Raises ProtocolError when another protocol file with the same name owns one of this protocol's output
    folders."""
    for folder in output_folders(protocol):
        other = owner(folder)
        if other is not None and not _same_file(other, protocol.path) and _declared_name(other) == protocol.name:
            raise ProtocolError(protocol.path, [Problem("name", (
                f"{protocol.name!r} is also the name of {other}, whose results and report are in {folder}; running "
                "this file would write over them. Give this protocol another name (name: ...), or, if that file is "
                f"an old copy, delete it or {folder / OWNER_FILE}."))])


def claim_outputs(protocol: Protocol) -> None:
    """Checks (see check_outputs), then records this protocol file as the owner of its output folders."""
    check_outputs(protocol)
    for folder in output_folders(protocol):
        record = {"name": protocol.name, "protocol_file": os.path.relpath(protocol.path, folder.resolve()),
                  "protocol_file_absolute": str(protocol.path)}
        path = folder / OWNER_FILE
        if not path.is_file() or _read(path) != record:
            atomic_write_json(path, record)


def owner(folder: Path) -> Path | None:
    """The protocol file recorded as the folder's owner, if it still exists (found relative to the folder first,
    so a study moved with its protocols keeps its owner)."""
    record = _read(Path(folder) / OWNER_FILE)
    if record is None:
        return None
    for candidate in (Path(folder).resolve() / str(record.get("protocol_file", "")),
                      Path(str(record.get("protocol_file_absolute", "")))):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _read(path: Path) -> dict | None:
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None  # no record, or a damaged one: the folder is unclaimed
    return record if isinstance(record, dict) else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _declared_name(path: Path) -> str | None:
    """The `name:` a protocol file declares (its file name when it has none), or None when it cannot be read."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = data.get("name", path.stem) if isinstance(data, dict) else None
    return name if isinstance(name, str) else None
