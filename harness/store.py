"""The run store: one folder per run key, written so that a run killed at any moment can resume.

Rules every stage follows:
- `spec.json` is written first; on reuse it is compared with the run's identity, and a different identity under the
  same key is an error (it would mean stale results);
- every file is written atomically (a temporary file in the same folder, then `os.replace`);
- a stage is finished when its DONE marker exists; the marker is written last;
- a file lock keeps two processes from working on the same run; `lock_file` is the same kind of lock for anything
  else several processes may build at once. The operating system drops such a lock when its process dies, so a
  killed process never leaves a stale lock behind.

Nothing here knows what a stage computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout

SPEC_FILE = "spec.json"
LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


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


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
# Rendered images are written at zlib level 1 rather than Pillow's 6: the same pixels, encoded about 3x faster
# (24 against 73 ms for a 512 px photo) for files about 1% larger. Encoding runs beside the GPU and must keep up.
PNG_COMPRESS_LEVEL = 1


def png_problem(path: Path, expected_bytes: int | None = None) -> str | None:
    """Why the PNG a stage wrote at `path` cannot be used (missing, cut short, another size than recorded), or
    None. Cheap: a stat and the last 12 bytes, so every image can be checked before it is trusted."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - len(PNG_END), 0))
            tail = f.read()
    except FileNotFoundError:
        return "is missing"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if expected_bytes is not None and size != expected_bytes:
        return f"has {size} bytes where {expected_bytes} were written"
    if tail != PNG_END:
        return "is cut short (no PNG end marker)"
    return None


def image_is_whole(png: Path, sidecar: Path) -> bool:
    """A rendered image counts once its sidecar exists (the PNG is written first, the sidecar last) and the PNG is
    whole, of the size the sidecar records; a damaged one is removed with its sidecar (one log line) and counts as
    not rendered, so it is rendered again."""
    if not sidecar.is_file():
        return False
    try:
        written = read_json(sidecar).get("bytes")
    except (OSError, ValueError, AttributeError):
        discard("has a damaged sidecar", png, sidecar)
        return False
    problem = png_problem(png, written)
    if problem:
        discard(problem, png, sidecar)
        return False
    return True


def discard(problem: str, path: Path, *companions: Path) -> None:
    """Removes a damaged derived file (and the files that describe it), named in one log line, so the stage that
    wrote it writes it again."""
    log.warning("%s %s; it will be made again.", path, problem)
    for file in (path, *companions):
        with contextlib.suppress(FileNotFoundError):
            file.unlink()


@contextlib.contextmanager
def lock_file(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Holds the lock `path` (created if needed); when another process holds it, calls `on_wait` once and waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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

    def remove_leftovers(self) -> list[Path]:
        """Removes the temporary files of writers that were killed mid-write (hidden files; the lock excepted).
        Call it with the run's lock held: then no writer of this run is alive."""
        leftovers = [p for p in self.path.rglob(".*") if p.is_file() and p.name != LOCK_FILE]
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return leftovers

    def try_lock(self) -> FileLock | None:
        """The run's lock, held, or None when another process holds it (release it with `.release()`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    @contextlib.contextmanager
    def lock(self, timeout: float = 0) -> Iterator[None]:
        """Exclusive access to the run; another process holding it is an error unless it frees it in `timeout` s."""
        lock = FileLock(str(self.path / LOCK_FILE))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise RunBusyError(
                f"run {self.spec.run_key} ({self.path}) is being worked on by another process; wait for it to "
                "finish (the lock goes with the process that holds it, so it needs no cleaning up)."
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
        stored = _readable_spec(spec_path)
        if stored is not None:
            if stored.get("identity") != spec.identity():
                raise StoreError(
                    f"{spec_path} describes a different run than key {spec.run_key}; its results cannot be trusted. "
                    f"Move the folder {run.path} away (or delete it) and run again."
                )
        else:
            run.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec_path, spec.to_json())
        return run


def _readable_spec(path: Path) -> dict[str, Any] | None:
    """spec.json as written, or None when it is absent or damaged (it is then written again from the run)."""
    if not path.is_file():
        return None
    try:
        stored = read_json(path)
    except (OSError, ValueError) as error:
        log.warning("%s is damaged (%s); writing it again from the protocol.", path, error)
        return None
    if not isinstance(stored, dict):
        log.warning("%s is damaged (not a JSON object); writing it again from the protocol.", path)
        return None
    return stored
