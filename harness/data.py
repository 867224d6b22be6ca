"""Instance images: finding, validating, decoding and preparing a subject's photos for training and scoring.

`check_instances` opens and fully decodes every image of a subject and reports every bad file together in one
`InstanceDataError`; `prepare_instances` turns the photos into square RGB PNGs at the training resolution, cached
on disk under a key made of the files' bytes, the resolution and `PREP_VERSION`. Decoding is EXIF-aware and turns
any mode (palette, alpha, CMYK, 16-bit, float) into 8-bit RGB, with transparent areas on white.

What this module does not hold: class images, latents, augmentation, anything that needs torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from harness.config import SubjectSpec
from harness.store import atomic_path, atomic_write_text, file_digest, png_problem, text_digest

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Bump when the preparation below changes its output, so cached PNGs are not reused across versions.
PREP_VERSION = 1
RECOMMENDED_MIN_IMAGES = 3
RECOMMENDED_MAX_IMAGES = 6
MAX_UPSCALE = 2
MIN_CROP_SHARE = 0.5  # a centre square crop keeping less of the photo than this may cut the subject out
MAX_TRANSPARENT_SHARE = 0.75  # transparent areas become white: beyond this the subject fills little of the image
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class InstanceDataError(ValueError):
    """A subject's instance folder cannot be used; `problems` holds (path, problem) for every bad file."""

    def __init__(self, message: str, problems: list[tuple[Path, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class PreparedImage:
    """One instance photo after preparation. `digest` is the sha256 of the source file's bytes."""

    source: Path
    digest: str
    path: Path


# --------------------------------------------------------------------------------------------------------------
# Finding files


def list_instance_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name; hidden files and subfolders are ignored."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _ignored_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTENSIONS)


def folder_digest(folder: Path) -> str:
    """sha256 hex over the names and bytes of the folder's image files; the folder's own name and place do not count."""
    digest = hashlib.sha256()
    for path in list_instance_files(folder):
        name = path.name.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class _Decoded:
    image: Image.Image  # 8-bit RGB, upright
    size: tuple[int, int]  # full size, upright, before any reduced-scale decoding
    frames: int
    transparent: float = 0.0  # share of the pixels that are mostly transparent (alpha below half)


@contextlib.contextmanager
def _truncated_images_rejected() -> Iterator[None]:
    # Another library may have switched this global on; a truncated photo must be reported, not half-grey.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(path: Path, min_side: int | None = None) -> _Decoded:
    """Fully decodes the first frame. With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2 to 1/8)
    that keeps both sides at least `min_side`, which makes huge photos cheap without losing needed detail."""
    with _truncated_images_rejected(), Image.open(path) as image:
        frames = getattr(image, "n_frames", 1)
        width, height = image.size
        if min_side:
            image.draft(None, (min_side, min_side))
        image.load()
        if image.getexif().get(_ORIENTATION_TAG) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        upright = ImageOps.exif_transpose(image)
        return _Decoded(image=to_rgb8(upright), size=(width, height), frames=frames,
                        transparent=_transparent_share(upright))


def load_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB: EXIF orientation applied, first frame, transparency on white."""
    return _decode(Path(path)).image


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparent areas become white, 16-bit and float values are scaled."""
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_grey(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _transparent_share(image: Image.Image) -> float:
    """The share of pixels whose alpha is below half (0 for an image without transparency)."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return 0.0
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return float((alpha < 128).mean()) if alpha.size else 0.0


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif image.mode == "F" and low >= 0 and high <= 255:
        scaled = values
    elif image.mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 257  # 65535 / 257 == 255 exactly: the 16-bit range maps onto the 8-bit range
    else:
        scaled = (values - low) / max(high - low, 1e-12) * 255
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square of the image, resized to resolution x resolution with Lanczos."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    # reducing_gap first shrinks by an integer factor with a box filter, so Lanczos only sees a modest ratio.
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------------------------------------------
# Validation


def check_instances(subject: SubjectSpec, resolution: int) -> list[str]:
    """Decodes every instance image; raises InstanceDataError naming every bad file, else returns warnings about
    usable but odd files, each naming its file. The caller shows them (once: this is called again when images are
    prepared)."""
    folder = Path(subject.instance_dir)
    if not folder.is_dir():
        raise InstanceDataError(f"subject {subject.name!r}: the instance folder {folder} does not exist; point "
                                "instance_dir at a folder of 3-6 photos of the subject.")
    files = list_instance_files(folder)
    problems, warnings = check_image_files(files, resolution)
    usable = len(files) - len(problems)
    if problems or usable == 0:
        raise InstanceDataError(_problems_message(subject, folder, problems, usable), problems)
    ignored = _ignored_files(folder)
    if ignored:
        warnings.append(f"{folder}: ignoring {len(ignored)} file(s) without an image extension: "
                        f"{', '.join(p.name for p in ignored)} (image extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    if usable < RECOMMENDED_MIN_IMAGES:
        warnings.append(f"subject {subject.name!r}: only {usable} usable image(s) in {folder}; DreamBooth works "
                        f"best with 3-6 photos of the subject from different angles.")
    if usable > RECOMMENDED_MAX_IMAGES:
        warnings.append(f"subject {subject.name!r}: {usable} images in {folder}; DreamBooth works best with 3-6 "
                        "photos of the subject from different angles. All are used, each seen less often in a run "
                        "of the same length; keep the most varied 3-6 unless more is what you are testing.")
    return warnings


def check_image_files(paths: list[Path], resolution: int) -> tuple[list[tuple[Path, str]], list[str]]:
    """Decodes every file: ((path, problem) for each unusable one, notes about the usable ones). Any folder of
    training images (instance photos, class photos) is checked this way."""
    problems: list[tuple[Path, str]] = []
    notes: list[str] = []
    for path in paths:
        problem, file_notes = _check_file(path, resolution)
        if problem:
            problems.append((path, problem))
        else:
            notes += file_notes
    return problems, notes


def _check_file(path: Path, resolution: int) -> tuple[str | None, list[str]]:
    """(the problem that makes the file unusable or None, notes about a usable file)."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes); copy the photo again.", []
    try:
        decoded = _decode(path, resolution)
    except Image.DecompressionBombError as error:
        return f"is too large to decode safely ({error}); downscale it to a few thousand pixels a side.", []
    except UnidentifiedImageError:
        return (f"is not an image Pillow can read (its content is not {path.suffix.lower()} nor any known image "
                "format); re-export it as JPEG or PNG.", [])
    except Exception as error:  # decoders raise many types on damaged data; the user needs the file, not the type
        return _decode_problem(error), []
    width, height = decoded.size
    short = min(width, height)
    if short * MAX_UPSCALE < resolution:
        return (f"is {width}x{height} px, far smaller than the resolution {resolution} (short side {short} px, below "
                f"{resolution}/{MAX_UPSCALE}); upscaling more than {MAX_UPSCALE}x blurs the subject. Use bigger photos "
                "or a lower train.resolution.", [])
    notes = []
    if decoded.frames > 1:
        notes.append(f"{path}: has {decoded.frames} frames (animated or multi-page); only the first frame is used.")
    if short < resolution:
        notes.append(f"{path}: {width}x{height} px is upscaled to {resolution} px; a bigger photo would be sharper.")
    if short / max(width, height) < MIN_CROP_SHARE:
        notes.append(f"{path}: {width}x{height} px ({max(width, height) / short:.1f}:1); training sees only its "
                     f"centre square, {100 * short / max(width, height):.0f}% of the photo, which may leave the "
                     "subject out. Crop it around the subject.")
    if decoded.transparent > MAX_TRANSPARENT_SHARE:
        notes.append(f"{path}: {100 * decoded.transparent:.0f}% of it is transparent, which becomes white, so the "
                     f"subject fills only {100 * (1 - decoded.transparent):.0f}% of the image. Crop it closer "
                     "around the subject.")
    return None, notes


def _decode_problem(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if "truncated" in text:
        return f"is truncated: the file ends before the image does ({text}); copy or export it again."
    return f"could not be decoded ({type(error).__name__}: {text}); re-export it as JPEG or PNG."


def _problems_message(subject: SubjectSpec, folder: Path, problems: list[tuple[Path, str]], usable: int) -> str:
    if not problems:
        return (f"subject {subject.name!r}: the instance folder {folder} has no images (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}); put 3-6 photos of the subject there.")
    lines = [f"subject {subject.name!r}: {len(problems)} instance image(s) in {folder} cannot be used"
             + (" and no usable image is left:" if usable == 0 else ":")]
    lines += [f"  {path}: {problem}" for path, problem in problems]
    lines.append("Fix: replace or remove these files (every file with an image extension in the folder is used), "
                 "then run again.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Preparation, cached by content


def prepare_instances(subject: SubjectSpec, resolution: int, cache_dir: Path) -> list[PreparedImage]:
    """Square RGB PNGs of the subject's photos at `resolution`, in cache_dir/instances/<key>/NN.png.

    The key covers the photos' bytes, the resolution and PREP_VERSION; a complete cache entry (its manifest.json
    is written last, with each PNG's size) is reused without decoding anything, and prepared again when one of its
    PNGs is damaged.
    """
    folder = Path(subject.instance_dir)
    files = list_instance_files(folder) if folder.is_dir() else []
    digests = [file_digest(path) for path in files]
    out = Path(cache_dir) / "instances" / _prep_key(digests, resolution)
    names = _cached_names(out, digests, resolution)
    if names is None:
        check_instances(subject, resolution)
        names = _prepare_into(out, files, resolution)
        _write_manifest(out, digests, names, resolution)
    return [PreparedImage(source=path, digest=digest, path=out / name)
            for path, digest, name in zip(files, digests, names, strict=True)]


def _prep_key(digests: list[str], resolution: int) -> str:
    payload = json.dumps({"files": digests, "resolution": resolution, "prep_version": PREP_VERSION})
    return text_digest(payload)


def _cached_names(out: Path, digests: list[str], resolution: int) -> list[str] | None:
    """The prepared file names of a complete cache entry for exactly these sources, else None."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        images = manifest["images"]
        if (manifest["prep_version"] != PREP_VERSION or manifest["resolution"] != resolution
                or [image["source_digest"] for image in images] != digests):
            return None
        names = [image["file"] for image in images]
        problems = [(name, png_problem(out / name, image.get("bytes"))) for name, image in zip(names, images,
                                                                                                strict=True)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("%s is damaged (%s); preparing the instance images again.", path, error)
        return None
    damaged = [f"{out / name} {problem}" for name, problem in problems if problem]
    if damaged:
        logger.warning("prepared instance image(s) damaged: %s; preparing them again from the photos.",
                       "; ".join(damaged))
        return None
    return names


def prepare_image(path: Path, resolution: int) -> Image.Image:
    """A training image as it is used: its largest centred square at resolution x resolution, 8-bit RGB."""
    return center_crop_resize(_decode(path, resolution).image, resolution)


def _prepare_into(out: Path, files: list[Path], resolution: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for index, path in enumerate(files):
        name = f"{index:02d}.png"
        image = prepare_image(path, resolution)
        with atomic_path(out / name) as tmp:
            image.save(tmp, format="PNG")
        names.append(name)
    return names


def _write_manifest(out: Path, digests: list[str], names: list[str], resolution: int) -> None:
    manifest = {
        "prep_version": PREP_VERSION,
        "resolution": resolution,
        "images": [{"file": name, "source_digest": digest, "bytes": (out / name).stat().st_size}
                   for name, digest in zip(names, digests, strict=True)],
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))

