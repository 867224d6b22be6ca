"""Run store: spec written first and checked, markers last, atomic writes, one process per run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.config import load_protocol
from harness.grid import expand
from harness.store import (
    RunBusyError,
    RunStore,
    StoreError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
)
from tests.conftest import MINIMAL


@pytest.fixture
def run_spec(write_protocol):
    return expand(load_protocol(write_protocol(MINIMAL)), {"dog": "0" * 64})[0]


def test_open_writes_spec_first_and_accepts_the_same_run(tmp_path, run_spec):
    store = RunStore(tmp_path / "runs")
    run = store.open(run_spec)
    stored = json.loads((run.path / "spec.json").read_text())
    assert stored["run_key"] == run_spec.run_key
    assert stored["identity"] == run_spec.identity()
    assert store.open(run_spec).path == run.path  # reopening the same run is fine


def test_a_changed_spec_under_the_same_key_is_an_error(tmp_path, run_spec):
    store = RunStore(tmp_path / "runs")
    run = store.open(run_spec)
    forged = replace(run_spec, train=replace(run_spec.train, learning_rate=1.0))  # same key, other identity
    with pytest.raises(StoreError, match="describes a different run") as info:
        store.open(forged)
    assert str(run.path) in str(info.value)


def test_markers_are_written_last_and_read_back(tmp_path, run_spec):
    run = RunStore(tmp_path / "runs").open(run_spec)
    assert not run.is_done("train")
    run.mark_done("train", {"seconds": 1.5})
    assert run.is_done("train") and run.done_info("train") == {"seconds": 1.5}
    run.clear("train")
    assert not run.is_done("train")


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"v": 1})

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise Boom
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]  # no temporary file left behind


def test_atomic_write_bytes_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    atomic_write_bytes(target, b"a" * 10)
    atomic_write_bytes(target, b"b")
    assert target.read_bytes() == b"b"


def test_a_killed_writer_leaves_the_previous_version(tmp_path):
    """A process killed in the middle of a write leaves the complete old file, never a torn one."""
    target = tmp_path / "big.bin"
    atomic_write_bytes(target, b"old")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from harness.store import atomic_path\n"
        f"with atomic_path(Path({str(target)!r})) as tmp:\n"
        "    tmp.write_bytes(b'new' * 1000)\n"
        "    os._exit(9)\n"  # dies before the rename
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    assert result.returncode == 9
    assert target.read_bytes() == b"old"


def test_two_processes_never_work_on_the_same_run(tmp_path, run_spec):
    run = RunStore(tmp_path / "runs").open(run_spec)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom filelock import FileLock\n"
         f"l = FileLock({str(run.path / '.lock')!r}); l.acquire(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match="another process"), run.lock(timeout=0.2):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run.lock(timeout=5):  # free again once the other process is gone
        assert os.path.exists(run.path / ".lock")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Results and reports are read by other users of a shared machine: the temporary file's 0600 must not stick."""
    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"v": 1})
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
