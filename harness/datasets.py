"""Public datasets the protocols read, and how to fetch them: `python -m harness.datasets dreambench`.

`DATASETS` maps a dataset name to a `DatasetSpec`: the archive it comes from, the folder of that archive that holds
it, every file expected (pinned here as data) and the folder the protocols read it from. `install` takes the
default URL, another http(s) URL, a local .zip / .tar.gz archive (or its file:// URL) laid out like the GitHub
archive, or a local checkout. It copies exactly the expected files into a temporary folder beside the destination,
checks them all (present, readable, images that decode), and only then renames that folder into place: a failed or
interrupted run never leaves a half dataset, and every problem is reported at once in one `DatasetError`.

`dataset_hint` gives the protocol loader the command that fills a missing instance folder; importing this module
costs no heavy import (PIL is imported only to check images).

Longer than 500 lines: downloading, the three kinds of source and the checks of what they hold belong together, and
nothing else in the harness uses them.

What this module does not hold: preparing images for training (harness/data.py), prompt lists (harness/prompts.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import os
import secrets
import shutil
import ssl
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import Request, url2pathname, urlopen

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = REPO_ROOT / "data"
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
# What a broken network raises (HTTPError is a URLError); a full disk is not among them and is reported as such.
NETWORK_ERRORS = (URLError, TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException)
# The destination's disk failing (full, read-only) stops the install; the callers treat other OSErrors as a bad source.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
MIB = 1 << 20
# Decoding at 1/8 scale still reads every byte of a JPEG (a truncated file fails) but keeps the check fast.
CHECK_DRAFT_SIZE = 64
# Phone photos (a third of DreamBench) are MPO: a JPEG with extra pictures appended, which PIL names apart.
JPEG_FORMATS = ("JPEG", "MPO")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from, the files it must hold (paths relative to its folder) and where it goes."""

    name: str
    title: str  # "the 30 DreamBench subjects": the hint and the messages name the dataset this way
    homepage: str
    url: str  # default source: an archive of the whole repository
    archive_folder: str  # the folder of the archive (or checkout) that holds the dataset
    files: tuple[str, ...]
    default_dest: Path
    licence_file: str
    licence_summary: str  # formatted with {licence_file}: the path of the licence file once installed


class DatasetError(RuntimeError):
    """A dataset cannot be installed; the message says why and what to do, listing every problem."""


# --------------------------------------------------------------------------------------------------------------
# DreamBench

# Images per subject in github.com/google/dreambooth, dataset/<subject>/00.jpg, 01.jpg, ... (branch main at
# 4f887af; the dataset has not changed since the first commit e9b8c01): 30 subjects, 158 images.
DREAMBENCH_IMAGE_COUNTS: dict[str, int] = {
    "backpack": 6, "backpack_dog": 5, "bear_plushie": 5, "berry_bowl": 6, "can": 6, "candle": 5, "cat": 5,
    "cat2": 5, "clock": 6, "colorful_sneaker": 5, "dog": 5, "dog2": 6, "dog3": 6, "dog5": 5, "dog6": 5, "dog7": 5,
    "dog8": 5, "duck_toy": 4, "fancy_boot": 6, "grey_sloth_plushie": 5, "monster_toy": 5, "pink_sunglasses": 6,
    "poop_emoji": 5, "rc_car": 5, "red_cartoon": 4, "robot_toy": 5, "shiny_sneaker": 6, "teapot": 5, "vase": 6,
    "wolf_plushie": 5,
}
DREAMBENCH_TEXT_FILES = ("prompts_and_classes.txt", "references_and_licenses.txt")


def numbered_images(counts: dict[str, int]) -> tuple[str, ...]:
    """`subject/00.jpg` ... for every subject, as the DreamBooth repository names its images."""
    return tuple(f"{subject}/{i:02d}.jpg" for subject, n in counts.items() for i in range(n))


DREAMBENCH = DatasetSpec(
    name="dreambench",
    title="the 30 DreamBench subjects",
    homepage="https://github.com/google/dreambooth",
    url="https://github.com/google/dreambooth/archive/refs/heads/main.zip",
    archive_folder="dataset",
    files=numbered_images(DREAMBENCH_IMAGE_COUNTS) + DREAMBENCH_TEXT_FILES,
    default_dest=DATA_ROOT / "dreambench",
    licence_file="references_and_licenses.txt",
    licence_summary=(
        "Licence: the DreamBench images come from github.com/google/dreambooth (the DreamBooth paper, Ruiz et al.).\n"
        "Some were taken by the paper's authors, the others come from unsplash.com under the Unsplash license.\n"
        "Each image has its own credit and licence, listed in\n  {licence_file}\nKeep that file with the images."
    ),
)

DATASETS: dict[str, DatasetSpec] = {DREAMBENCH.name: DREAMBENCH}


# --------------------------------------------------------------------------------------------------------------
# The hint for the protocol loader


def dataset_hint(folder: Path) -> str | None:
    """The command that fills `folder`, when it lies in a dataset's default destination and is missing or empty."""
    folder = Path(folder).resolve()
    for spec in DATASETS.values():
        home = spec.default_dest.resolve()
        if folder.is_relative_to(home) and not has_entries(folder):
            if has_entries(home):  # an incomplete copy: the command replaces it only when told to
                return (f"run `python -m harness.datasets {spec.name} --force` to download {spec.title} again into "
                        f"{shown(home)}/ (the copy there is incomplete)")
            return f"run `python -m harness.datasets {spec.name}` to download {spec.title} into {shown(home)}/"
    return None


def has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (where the commands run), absolute otherwise."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------------------
# Installing


def install(spec: DatasetSpec, source: str | None, dest: Path, force: bool = False,
            out: TextIO | None = None) -> bool:
    """Installs `spec` from `source` (default: its URL) into `dest`; False when a complete `dest` was left alone."""
    out = out or sys.stdout  # looked up at call time, so a redirected stdout is honoured
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not force:
        require_complete(spec, dest)
        print(f"{spec.title} are already there: {dest} (pass --force to download and replace them)", file=out)
        return False
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f"{dest} exists and is not a folder; remove it or pass another --dest.")
    new_parents = [p for p in reversed(dest.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    staging = temporary_sibling(dest, "partial")
    staging.mkdir()
    try:
        with local_source(spec, source, dest, out) as (path, label):
            problems = copy_dataset(spec, path, label, staging)
        problems.update(check_files(spec, staging, skip=problems))
        if problems:
            raise DatasetError(problem_report(spec, label, dest, problems))
        swap_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once renamed into place
        if not dest.exists():
            remove_empty_folders(new_parents)  # a failed run leaves no trace, not even data/
    print(f"installed {len(spec.files)} files ({spec.title}) into {dest}", file=out)
    return True


def require_complete(spec: DatasetSpec, dest: Path) -> None:
    """An existing destination that lacks files is an error: replacing what a user put there needs --force."""
    missing = [f for f in spec.files if not (dest / f).is_file()]
    if not missing:
        return
    shown_missing = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise DatasetError(f"{dest} exists but lacks {len(missing)} of the {len(spec.files)} files of {spec.title} "
                       f"({shown_missing}); pass --force to replace it, or --dest to install elsewhere.")


def temporary_sibling(dest: Path, kind: str) -> Path:
    # Beside the destination, so the final rename stays on one file system; hidden, and recognised as a leftover.
    return dest.parent / f".{dest.name}.tmp-{kind}-{secrets.token_hex(4)}"


def remove_leftovers(dest: Path) -> None:
    """Removes what a killed run left beside `dest` (a partial folder, a partial download)."""
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        remove_path(leftover)


def remove_empty_folders(folders: list[Path]) -> None:
    for folder in reversed(folders):  # innermost first
        with contextlib.suppress(OSError):  # not empty, or already gone
            folder.rmdir()


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def swap_into_place(staging: Path, dest: Path) -> None:
    """Renames the checked folder to `dest`; an existing `dest` (folder or link) is moved aside, then removed."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(staging, dest)
        return
    old = temporary_sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except OSError:
        os.rename(old, dest)
        raise
    remove_path(old)  # a replaced link goes, the folder it pointed to stays


# --------------------------------------------------------------------------------------------------------------
# Sources: a URL, a file:// URL, an archive or a checkout


def is_web_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


def local_path(source: str) -> Path:
    if urlsplit(source).scheme == "file":
        return Path(url2pathname(urlsplit(source).path))
    return Path(source).expanduser()


@contextlib.contextmanager
def local_source(spec: DatasetSpec, source: str | None, dest: Path, out: TextIO) -> Iterator[tuple[Path, str]]:
    """(local archive or folder, how to name it in messages); a URL is downloaded beside `dest` and removed after."""
    source = source or spec.url
    if not is_web_url(source):
        path = local_path(source)
        if not path.exists():
            raise DatasetError(f"--source {source}: no such file or folder.")
        yield path, str(path)
        return
    download = temporary_sibling(dest, "download")
    try:
        fetch(spec, source, download, out)
        yield download, source
    finally:
        download.unlink(missing_ok=True)


def fetch(spec: DatasetSpec, url: str, target: Path, out: TextIO) -> None:
    """Streams `url` into `target` with a progress line; a network failure says how to get the archive another way."""
    print(f"downloading {url}", file=out)
    try:
        request = Request(url, headers={"User-Agent": "harness.datasets"})
        with urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, target.open("wb") as file:
            total = int(response.headers.get("Content-Length") or 0)
            copy_with_progress(response, file, total, out)
    except NETWORK_ERRORS as e:
        archive = f"{spec.homepage.rsplit('/', 1)[-1]}.zip"
        raise DatasetError(
            f"could not download {url}: {network_reason(e)}.\n"
            f"Download the archive by other means (a browser, or `curl -L -o {archive} {url}`) or clone "
            f"{spec.homepage}, then pass the archive or the clone's folder with --source:\n"
            f"  python -m harness.datasets {spec.name} --source {archive}"
        ) from None


def network_reason(error: BaseException) -> str:
    # A plain URLError wraps the cause ("[Errno -2] Name or service not known"); HTTPError says "HTTP Error 404: ...".
    if type(error) is URLError:
        return str(error.reason)
    return str(error) or type(error).__name__


def copy_with_progress(response: IO[bytes], file: IO[bytes], total: int, out: TextIO) -> None:
    done = shown_mib = 0
    try:
        while chunk := response.read(CHUNK_BYTES):
            file.write(chunk)
            done += len(chunk)
            if done // MIB != shown_mib:  # one update per MiB keeps a log readable
                shown_mib = done // MIB
                print(f"\r  {progress_text(done, total)}", end="", file=out, flush=True)
    finally:
        print(f"\r  {progress_text(done, total)}", file=out)  # ends the line, also when the transfer breaks


def progress_text(done: int, total: int) -> str:
    # GitHub streams its archives without a length, so the total is often unknown.
    if total:
        return f"{done / MIB:.1f} of {total / MIB:.1f} MiB ({100 * done // total}%)"
    return f"{done / MIB:.1f} MiB"


# --------------------------------------------------------------------------------------------------------------
# Copying the expected files out of a source

Opener = Callable[[], IO[bytes]]


def copy_dataset(spec: DatasetSpec, source: Path, label: str, target: Path) -> dict[str, str]:
    """Copies every expected file found in `source` into `target`; returns {file: problem} for unreadable ones."""
    if source.is_dir():
        folder = dataset_folder(spec, source)
        if not any((folder / name).is_file() for name in spec.files):
            raise DatasetError(f"{label} holds no {spec.archive_folder}/ folder and no file of {spec.title}; "
                               f"expected a checkout of {spec.homepage}.")
        return copy_from_folder(spec, folder, target)
    if zipfile.is_zipfile(source):
        return copy_from_archive(spec, label, zip_members(source), target)
    if tarfile.is_tarfile(source):
        return copy_from_archive(spec, label, tar_members(source), target)
    raise DatasetError(f"{label} is neither a folder nor a .zip or .tar.gz archive; expected an archive of "
                       f"{spec.homepage} such as {spec.url}, or a checkout of it.")


def dataset_folder(spec: DatasetSpec, checkout: Path) -> Path:
    """The checkout's dataset folder; a folder that holds no such subfolder is taken as the dataset folder itself."""
    inner = checkout / spec.archive_folder
    return inner if inner.is_dir() else checkout


def copy_from_folder(spec: DatasetSpec, folder: Path, target: Path) -> dict[str, str]:
    problems = {}
    for name in spec.files:
        if (folder / name).is_file():
            try:
                copy_file(lambda name=name: (folder / name).open("rb"), target / name)
            except OSError as e:
                problems[name] = f"unreadable ({e})"
    return problems


def zip_members(archive: Path) -> Iterator[tuple[str, Opener]]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                yield info.filename, lambda info=info: zf.open(info)


def tar_members(archive: Path) -> Iterator[tuple[str, Opener]]:
    # Read in archive order: a .tar.gz cannot seek backwards without decompressing again from the start.
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if member.isfile():
                yield member.name, lambda member=member: tf.extractfile(member)


def copy_from_archive(spec: DatasetSpec, label: str, members: Iterator[tuple[str, Opener]],
                      target: Path) -> dict[str, str]:
    """Copies the expected files from `<top>/dataset/` (GitHub's archives) or `dataset/` at the archive's top."""
    wanted = set(spec.files)
    problems: dict[str, str] = {}
    prefixes: set[str] = set()
    try:
        for member, opener in members:
            found = split_member(member, spec.archive_folder)
            if found is None or found[1] not in wanted:
                continue
            prefixes.add(found[0])
            try:
                copy_file(opener, target / found[1])
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a bad CRC, a damaged deflate stream
                problems[found[1]] = f"unreadable in the archive ({e})"
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        problems[f"({label})"] = f"the archive is damaged and could not be read to the end ({e})"
    if not prefixes and not problems:
        raise DatasetError(f"{label} holds no {spec.archive_folder}/ folder with any file of {spec.title}; expected "
                           f"an archive of {spec.homepage} such as {spec.url} (its files under "
                           f"<top folder>/{spec.archive_folder}/).")
    if len(prefixes) > 1:
        found = ", ".join(sorted(prefixes))
        raise DatasetError(f"{label} holds more than one {spec.archive_folder}/ folder ({found}); pass an archive of "
                           "one checkout.")
    return problems


def split_member(member: str, folder: str) -> tuple[str, str] | None:
    """('top/dataset/', 'dog/00.jpg') for 'top/dataset/dog/00.jpg'; also for 'dataset/dog/00.jpg'; else None."""
    parts = member.removeprefix("./").split("/")
    for depth in (0, 1):
        if len(parts) > depth + 1 and parts[depth] == folder:
            return "/".join(parts[: depth + 1]) + "/", "/".join(parts[depth + 1:])
    return None


def copy_file(opener: Opener, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with opener() as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, CHUNK_BYTES)
    except BaseException as e:
        target.unlink(missing_ok=True)  # a half-copied file must read as missing, not as a bad image
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise DatasetError(f"could not write {target.name} beside the destination: {e}") from None
        raise


# --------------------------------------------------------------------------------------------------------------
# Checking the copied files


def check_files(spec: DatasetSpec, folder: Path, skip: dict[str, str]) -> dict[str, str]:
    """{file: problem} for every expected file of `folder` that is missing, empty or does not decode."""
    problems = {}
    for name in spec.files:
        if name in skip:
            continue
        path = folder / name
        if not path.is_file():
            problems[name] = "missing"
        elif path.stat().st_size == 0:
            problems[name] = "empty"
        elif path.suffix.lower() in (".jpg", ".jpeg"):
            problem = jpeg_problem(path)
            if problem:
                problems[name] = problem
        elif path.suffix == ".txt":
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                problems[name] = f"not UTF-8 text ({e})"
    return problems


def jpeg_problem(path: Path) -> str | None:
    from PIL import Image, ImageFile, UnidentifiedImageError  # only here: the protocol loader's import stays light

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched this on; a cut file must fail
    try:
        with Image.open(path) as image:
            if image.format not in JPEG_FORMATS:
                return f"not a JPEG image (it is {image.format})"
            image.draft("RGB", (CHECK_DRAFT_SIZE, CHECK_DRAFT_SIZE))
            image.load()
    except UnidentifiedImageError:
        return "unreadable image (not an image format PIL knows)"
    except Exception as e:  # PIL raises many kinds for a bad file (OSError, SyntaxError, ValueError, ...)
        return f"unreadable image ({type(e).__name__}: {e})"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return None


def problem_report(spec: DatasetSpec, label: str, dest: Path, problems: dict[str, str]) -> str:
    lines = grouped_problems(spec, problems)
    return (f"{label} is not a complete copy of {spec.title} ({len(lines)} problem(s)); nothing was written to "
            f"{dest}:\n" + "\n".join(f"  - {line}" for line in lines))


def grouped_problems(spec: DatasetSpec, problems: dict[str, str]) -> list[str]:
    """One line per problem in manifest order; a folder whose files are all missing is one line."""
    lines = [f"{name}: {problem}" for name, problem in problems.items() if name not in spec.files]
    groups: dict[str, list[str]] = {}
    for name in spec.files:
        groups.setdefault(name.rsplit("/", 1)[0] + "/" if "/" in name else name, []).append(name)
    for group, names in groups.items():
        if len(names) > 1 and all(problems.get(name) == "missing" for name in names):
            first, last = (name.rsplit("/", 1)[-1] for name in (names[0], names[-1]))
            lines.append(f"{group}: missing (expected {len(names)} files, {first} to {last})")
        else:
            lines.extend(f"{name}: {problems[name]}" for name in names if name in problems)
    return lines


# --------------------------------------------------------------------------------------------------------------
# Command line


def licence_note(spec: DatasetSpec, dest: Path) -> str:
    return spec.licence_summary.format(licence_file=dest / spec.licence_file)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.datasets",
        description="Download a public dataset into the folder the protocols read it from, checking every file.",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="dataset to install")
    parser.add_argument("--dest", type=Path, default=None,
                        help="destination folder (default: data/<dataset> at the top of the repository)")
    parser.add_argument("--source", metavar="URL_OR_PATH", default=None,
                        help="an http(s) or file:// URL, a local .zip or .tar.gz archive of the repository, or a "
                             "local checkout of it (default: the dataset's public archive)")
    parser.add_argument("--force", action="store_true", help="replace the destination even if it is complete")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.dataset]
    dest = Path(args.dest or spec.default_dest).expanduser().absolute()
    try:
        install(spec, args.source, dest, force=args.force)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the destination cannot be written: permissions, a full disk
        print(f"error: could not write {spec.title} into {dest}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {dest}.", file=sys.stderr)
        return 130
    print(licence_note(spec, dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
