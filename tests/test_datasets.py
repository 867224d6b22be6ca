"""harness/datasets.py: DreamBench installed from a zip, a tar.gz, a folder and a URL, offline.

The archives are built here, laid out like GitHub's archive of google/dreambooth, with a 1x1 JPEG for each of the
158 real image names; no test reaches the network (downloads go through a patched `urlopen`).
"""

from __future__ import annotations

import functools
import io
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path
from urllib.error import URLError

import pytest
import yaml
from PIL import Image

from harness import datasets
from harness.datasets import DREAMBENCH, dataset_hint, main

REPO = Path(__file__).resolve().parent.parent
TOP = "dreambooth-main"  # GitHub's archive of the main branch holds everything under this folder

# The layout of dataset/ in github.com/google/dreambooth (main at 4f887af), written out again here so that an edit of
# the module's manifest has to be made twice.
REAL_IMAGE_COUNTS = {
    "backpack": 6, "backpack_dog": 5, "bear_plushie": 5, "berry_bowl": 6, "can": 6, "candle": 5, "cat": 5,
    "cat2": 5, "clock": 6, "colorful_sneaker": 5, "dog": 5, "dog2": 6, "dog3": 6, "dog5": 5, "dog6": 5, "dog7": 5,
    "dog8": 5, "duck_toy": 4, "fancy_boot": 6, "grey_sloth_plushie": 5, "monster_toy": 5, "pink_sunglasses": 6,
    "poop_emoji": 5, "rc_car": 5, "red_cartoon": 4, "robot_toy": 5, "shiny_sneaker": 6, "teapot": 5, "vase": 6,
    "wolf_plushie": 5,
}
REAL_TEXT_FILES = {"prompts_and_classes.txt", "references_and_licenses.txt"}


def tiny_jpeg(name: str, shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    # The comment makes every file's bytes unique, so a file copied under the wrong name is caught.
    Image.new("RGB", (1, 1), (shade, 128, 255 - shade)).save(buffer, "JPEG", comment=name.encode())
    return buffer.getvalue()


@functools.cache
def real_layout() -> dict[str, bytes]:
    """Every file of the real dataset/ folder, by its path inside it, with tiny stand-in contents."""
    files = {f"{subject}/{i:02d}.jpg": tiny_jpeg(f"{subject}/{i:02d}")
             for subject, n in REAL_IMAGE_COUNTS.items() for i in range(n)}
    files["prompts_and_classes.txt"] = b"Classes\n\nsubject_name,class\n" + b"".join(
        f"{subject},thing\n".encode() for subject in REAL_IMAGE_COUNTS)
    files["references_and_licenses.txt"] = "DreamBooth Dataset - References and Licenses\n\nUnsplash ✏️\n".encode()
    return files


# Files of the repository outside dataset/: an install must leave them out.
REPO_EXTRAS = {"README.md": b"# DreamBooth Dataset\n", "LICENSE.md": b"CC-BY 4.0\n",
               "docs/teaser_static.jpg": tiny_jpeg("teaser")}


def archive_entries(files: dict[str, bytes], top: str = TOP) -> dict[str, bytes]:
    entries = {f"{top}/dataset/{name}": data for name, data in files.items()}
    entries.update({f"{top}/{name}": data for name, data in REPO_EXTRAS.items()})
    return entries


def write_zip(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in archive_entries(files).items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in archive_entries(files).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_checkout(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in archive_entries(files, top=folder.name).items():
        path = folder.parent / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def make_source(kind: str, tmp_path: Path, files: dict[str, bytes]) -> str:
    if kind == "zip":
        return str(write_zip(tmp_path / "dreambooth-main.zip", files))
    if kind == "tar.gz":
        return str(write_tar(tmp_path / "dreambooth-main.tar.gz", files))
    if kind == "file-url":
        return write_zip(tmp_path / "dreambooth-main.zip", files).as_uri()
    return str(write_checkout(tmp_path / "dreambooth", files))


def read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "data" / "dreambench"


def install(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["dreambench", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------------------
# The manifest


def test_manifest_is_the_real_repository_layout():
    protocol = yaml.safe_load((REPO / "protocols" / "dreambench.yaml").read_text())
    subjects = [s["name"] for s in protocol["subjects"]]
    assert datasets.DREAMBENCH_IMAGE_COUNTS == REAL_IMAGE_COUNTS
    assert list(REAL_IMAGE_COUNTS) == subjects and len(subjects) == 30
    assert sum(REAL_IMAGE_COUNTS.values()) == 158
    assert set(DREAMBENCH.files) == set(real_layout()) and len(DREAMBENCH.files) == 160
    # Every instance folder of the protocol is a subject folder of the destination.
    for s in protocol["subjects"]:
        assert (REPO / "protocols" / s["instance_dir"]).resolve() == DREAMBENCH.default_dest.resolve() / s["name"]
    assert DREAMBENCH.default_dest == REPO / "data" / "dreambench"


def test_a_generated_full_archive_installs_exactly_the_real_layout(tmp_path, dest, capsys):
    code, out, err = install(capsys, "--source", make_source("zip", tmp_path, real_layout()), "--dest", str(dest))
    assert (code, err) == (0, "")
    images = {f"{s}/{i:02d}.jpg" for s, n in REAL_IMAGE_COUNTS.items() for i in range(n)}
    assert sorted(read_tree(dest)) == sorted(images | REAL_TEXT_FILES)
    assert "installed 160 files" in out


# --------------------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "folder", "file-url"])
def test_every_source_installs_every_file_with_its_bytes(kind, tmp_path, dest, capsys):
    code, _, err = install(capsys, "--source", make_source(kind, tmp_path, real_layout()), "--dest", str(dest))
    assert (code, err) == (0, "")
    assert read_tree(dest) == real_layout()  # nothing from outside dataset/ (README, docs) comes along
    assert [p.name for p in dest.parent.iterdir()] == ["dreambench"]  # no temporary folder or download left


def test_a_folder_that_is_the_dataset_folder_itself_is_accepted(tmp_path, dest, capsys):
    source = write_checkout(tmp_path / "dreambooth", real_layout()) / "dataset"
    code, _, _ = install(capsys, "--source", str(source), "--dest", str(dest))
    assert code == 0 and read_tree(dest) == real_layout()


def test_a_download_streams_the_archive_and_removes_it(tmp_path, dest, capsys, monkeypatch):
    archive = write_zip(tmp_path / "dreambooth-main.zip", real_layout()).read_bytes()
    requested = []

    def fake_urlopen(request, timeout):
        requested.append(request.full_url)
        response = io.BytesIO(archive)
        response.headers = {"Content-Length": str(len(archive))}
        return response

    monkeypatch.setattr(datasets, "urlopen", fake_urlopen)
    code, out, err = install(capsys, "--dest", str(dest))
    assert (code, err) == (0, "")
    assert requested == [DREAMBENCH.url]
    assert DREAMBENCH.url == "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
    assert "(100%)" in out
    assert read_tree(dest) == real_layout()
    assert [p.name for p in dest.parent.iterdir()] == ["dreambench"]


# --------------------------------------------------------------------------------------------------------------
# Bad sources: every problem at once, nothing written


def test_missing_and_bad_files_are_all_listed_and_nothing_is_written(tmp_path, dest, capsys):
    files = {name: data for name, data in real_layout().items()
             if not name.startswith("backpack/") and name not in ("dog/03.jpg", "references_and_licenses.txt")}
    files["cat/01.jpg"] = b"not a jpeg"
    files["cat2/02.jpg"] = real_layout()["cat2/02.jpg"][:-40]
    files["teapot/00.jpg"] = b""
    code, out, err = install(capsys, "--source", make_source("zip", tmp_path, files), "--dest", str(dest))
    assert code == 2 and "Traceback" not in err
    assert "6 problem(s)" in err
    for problem in ("backpack/: missing (expected 6 files, 00.jpg to 05.jpg)", "dog/03.jpg: missing",
                    "references_and_licenses.txt: missing", "cat/01.jpg: unreadable image",
                    "cat2/02.jpg: unreadable image", "teapot/00.jpg: empty"):
        assert problem in err
    assert "backpack/00.jpg" not in err  # a missing subject is one line, not six
    assert not (tmp_path / "data").exists()  # not even the parent folders it made
    assert "Licence" not in out


def test_a_damaged_archive_member_is_reported_as_unreadable(tmp_path, dest, capsys):
    archive = write_zip(tmp_path / "dreambooth-main.zip", real_layout(), compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(f"{TOP}/dataset/dog/00.jpg")
    data = bytearray(archive.read_bytes())
    header = data[info.header_offset: info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    data[start + info.compress_size - 3] ^= 0xFF  # one flipped byte: the CRC no longer matches
    archive.write_bytes(bytes(data))
    code, _, err = install(capsys, "--source", str(archive), "--dest", str(dest))
    assert code == 2 and "dog/00.jpg: unreadable in the archive" in err and "1 problem(s)" in err
    assert not dest.exists()


@pytest.mark.parametrize("content", [b"<html>not an archive</html>", None])
def test_a_source_that_is_not_the_repository_is_a_clear_error(content, tmp_path, dest, capsys):
    if content is None:
        source = tmp_path / "unrelated.zip"
        with zipfile.ZipFile(source, "w") as zf:
            zf.writestr("something/else.txt", "hi")
        expected = "holds no dataset/ folder"
    else:
        source = tmp_path / "page.zip"
        source.write_bytes(content)
        expected = "is neither a folder nor a .zip or .tar.gz archive"
    code, _, err = install(capsys, "--source", str(source), "--dest", str(dest))
    assert code == 2 and expected in err and "Traceback" not in err
    assert not dest.exists()


def test_a_missing_source_path_is_named(tmp_path, dest, capsys):
    code, _, err = install(capsys, "--source", str(tmp_path / "nowhere.zip"), "--dest", str(dest))
    assert code == 2 and "nowhere.zip: no such file or folder" in err


# --------------------------------------------------------------------------------------------------------------
# The network


def test_an_unreachable_url_exits_2_naming_the_url_and_source(dest, capsys, monkeypatch):
    def unreachable(request, timeout):
        raise URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(datasets, "urlopen", unreachable)
    code, _, err = install(capsys, "--dest", str(dest))
    assert code == 2 and "Traceback" not in err
    assert f"could not download {DREAMBENCH.url}: [Errno -2] Name or service not known" in err
    assert "--source" in err and "python -m harness.datasets dreambench --source dreambooth.zip" in err
    assert not dest.parent.exists()


def test_a_transfer_that_breaks_leaves_no_partial_download(tmp_path, dest, capsys, monkeypatch):
    class Breaking(io.BytesIO):
        def __init__(self, data: bytes):
            super().__init__(data)
            self.headers = {}  # no Content-Length, as GitHub sends its archives

        def read(self, size: int = -1) -> bytes:
            if self.tell():
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(10)

    monkeypatch.setattr(datasets, "urlopen", lambda request, timeout: Breaking(b"x" * 100))
    url = "https://example.org/dreambooth.zip"
    code, _, err = install(capsys, "--source", url, "--dest", str(dest))
    assert code == 2 and f"could not download {url}: [Errno 104] Connection reset by peer" in err
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------------------------------------
# An existing destination


def test_a_second_run_says_already_there_and_changes_nothing(tmp_path, dest, capsys):
    source = make_source("zip", tmp_path, real_layout())
    assert install(capsys, "--source", source, "--dest", str(dest))[0] == 0
    before = snapshot(dest)
    code, out, _ = install(capsys, "--source", str(tmp_path / "not-even-read.zip"), "--dest", str(dest))
    assert code == 0 and "already there" in out
    assert snapshot(dest) == before


def test_force_replaces_the_destination(tmp_path, dest, capsys):
    assert install(capsys, "--source", make_source("zip", tmp_path, real_layout()), "--dest", str(dest))[0] == 0
    (dest / "dog" / "stray.jpg").write_bytes(b"left by hand")
    newer = {**real_layout(), "dog/00.jpg": tiny_jpeg("dog/00 newer", shade=200)}
    code, out, _ = install(capsys, "--source", make_source("tar.gz", tmp_path, newer), "--dest", str(dest), "--force")
    assert code == 0 and "installed 160 files" in out
    assert read_tree(dest) == newer
    assert [p.name for p in dest.parent.iterdir()] == ["dreambench"]


def test_an_incomplete_destination_is_left_alone_without_force(tmp_path, dest, capsys):
    (dest / "dog").mkdir(parents=True)
    (dest / "dog" / "00.jpg").write_bytes(b"mine")
    code, _, err = install(capsys, "--source", make_source("zip", tmp_path, real_layout()), "--dest", str(dest))
    assert code == 2 and "lacks 159 of the 160 files" in err and "--force" in err
    assert read_tree(dest) == {"dog/00.jpg": b"mine"}


def test_leftovers_of_a_killed_run_are_removed(tmp_path, dest, capsys):
    leftover = dest.parent / ".dreambench.tmp-partial-0000"
    (leftover / "dog").mkdir(parents=True)
    (dest.parent / ".dreambench.tmp-download-0000").write_bytes(b"half")
    assert install(capsys, "--source", make_source("zip", tmp_path, real_layout()), "--dest", str(dest))[0] == 0
    assert [p.name for p in dest.parent.iterdir()] == ["dreambench"]


# --------------------------------------------------------------------------------------------------------------
# The command line and the hint


def test_the_cli_prints_the_licence_note_and_keeps_the_file(tmp_path, dest, capsys):
    code, out, _ = install(capsys, "--source", make_source("folder", tmp_path, real_layout()), "--dest", str(dest))
    assert code == 0
    assert "Licence" in out and "unsplash.com" in out and "its own credit and licence" in out
    assert str(dest / "references_and_licenses.txt") in out
    assert (dest / "references_and_licenses.txt").read_bytes() == real_layout()["references_and_licenses.txt"]
    assert "References and Licenses" not in out  # a summary, not the file's 190 lines


def test_python_dash_m_runs_and_the_import_stays_light(tmp_path, dest):
    source = write_checkout(tmp_path / "dreambooth", real_layout())
    done = subprocess.run([sys.executable, "-m", "harness.datasets", "dreambench", "--source", str(source),
                           "--dest", str(dest)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert read_tree(dest) == real_layout()
    check = "import sys, harness.datasets; print(sorted({'torch', 'PIL', 'numpy', 'yaml'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]", imported.stderr


def test_dataset_hint_names_the_command_for_a_missing_folder_under_the_destination(tmp_path, monkeypatch):
    hint = dataset_hint(REPO / "data" / "dreambench" / "no_such_subject")
    assert hint == ("run `python -m harness.datasets dreambench` to download the 30 DreamBench subjects into "
                    "data/dreambench/")
    assert dataset_hint(REPO / "protocols" / ".." / "data" / "dreambench" / "no_such_subject") == hint
    assert dataset_hint(tmp_path / "dog") is None
    assert dataset_hint(REPO / "examples" / "subjects" / "no_such_subject") is None

    home = tmp_path / "data" / "dreambench"
    monkeypatch.setitem(datasets.DATASETS, "dreambench", replace(DREAMBENCH, default_dest=home))
    assert f"into {home}/" in dataset_hint(home / "dog")
    (home / "dog").mkdir(parents=True)
    assert dataset_hint(home / "dog") is not None  # an empty folder needs the download too
    (home / "dog" / "00.jpg").write_bytes(tiny_jpeg("dog/00"))
    assert dataset_hint(home / "dog") is None
