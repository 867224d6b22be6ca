"""The run store: one folder per run key, written so that a run killed at any moment can resume.

Rules every stage follows:
- `spec.json` is written first; on reuse it is compared with the run's identity, and a different identity under the
  same key is an error (it would mean stale results);
- every file is written atomically (a temporary file in the same folder, then `os.replace`);
- a stage is finished when its DONE marker exists; the marker is written last;
- a file lock keeps two processes from working on the same run.

Nothing here knows what a stage computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout

SPEC_FILE = "spec.json"
LOCK_FILE = ".lock"


class RunSpec(Protocol):
    """What the store needs of a run (grid.RunSpec has it): its key, its identity and its description."""

    run_key: str

    def identity(self) -> dict[str, Any]: ...

    def to_json(self) -> dict[str, Any]: ...


class StoreError(RuntimeError):
    pass


class RunBusyError(StoreError):
    pass


def file_digest(path: Path) -> str:
    """sha256 hex of a file's bytes, read in blocks: the key of cached work and the checksum of shipped files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_digest(text: str, length: int | None = None) -> str:
    """sha256 hex of a text (its first `length` characters): the one recipe of every content key of the harness."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _temporary_file(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file beside the target, opened for writing, with the mode a plain open() would give (0666 less the
    umask): tempfile.mkstemp's 0600 would survive the rename and hide results from the other users of a machine."""
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path for writers that need a file name (PIL, torch.save); renamed onto `path` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_file(path.parent, f".{path.stem}.", path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class RunFolder:
    """The folder of one run: its spec, its stage markers, its lock."""

    def __init__(self, path: Path, spec: RunSpec):
        self.path = path
        self.spec = spec

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def marker(self, stage: str) -> Path:
        return self.path / f"{stage}.DONE"

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.marker(stage), info or {})

    def done_info(self, stage: str) -> dict[str, Any]:
        return read_json(self.marker(stage))

    def clear(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker(stage).unlink()

    @contextlib.contextmanager
    def lock(self, timeout: float = 0) -> Iterator[None]:
        """Exclusive access to the run; another process holding it is an error unless it frees it in `timeout` s."""
        lock = FileLock(str(self.path / LOCK_FILE))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise RunBusyError(
                f"run {self.spec.run_key} ({self.path}) is being worked on by another process; wait for it to "
                f"finish, or if no other process is running, delete {self.path / LOCK_FILE}."
            ) from None
        try:
            yield
        finally:
            lock.release()


class RunStore:
    """`root/<run_key>/` for every run; shared by all protocols, so identical runs are trained once."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, spec: RunSpec) -> RunFolder:
        return RunFolder(self.root / spec.run_key, spec)

    def open(self, spec: RunSpec) -> RunFolder:
        """The run's folder, created with its spec.json, or checked against the spec already there."""
        run = self.folder(spec)
        spec_path = run.file(SPEC_FILE)
        if spec_path.is_file():
            stored = read_json(spec_path)
            if stored.get("identity") != spec.identity():
                raise StoreError(
                    f"{spec_path} describes a different run than key {spec.run_key}; its results cannot be trusted. "
                    f"Move the folder {run.path} away (or delete it) and run again."
                )
        else:
            run.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec_path, spec.to_json())
        return run
