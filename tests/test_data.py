"""Instance image loading, validation, digests and the preparation cache, on files made in tmp_path."""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import data
from harness.config import SubjectSpec
from harness.data import (
    InstanceDataError,
    PreparedImage,
    center_crop_resize,
    check_instances,
    folder_digest,
    list_instance_files,
    load_rgb,
    prepare_instances,
)

EXAMPLE_DOG = Path(__file__).resolve().parents[1] / "examples" / "subjects" / "dog"
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def subject(folder: Path) -> SubjectSpec:
    return SubjectSpec(name="thing", instance_dir=folder, class_noun="dog")


def noise_jpeg(path: Path, size=(96, 80), seed=0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def solid(path: Path, color=GREEN, size=(80, 64), **save) -> Path:
    Image.new("RGB", size, color).save(path, **save)
    return path


def close(pixel, expected, tol=6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


# --------------------------------------------------------------------------------------------------------------
# Odd but valid files load as 8-bit RGB with the right content


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)  # pure red in CMYK
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert close(image.getpixel((20, 15)), RED, tol=10)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    values = np.full((20, 30), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    values[0, 0], values[0, 1] = 65535, 0
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (20, 30, 3)
    assert tuple(pixels[10, 10]) == (128, 128, 128)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 1]) == (0, 0, 0)


def test_float_image_is_scaled(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F").save(path)
    assert tuple(load_rgb(path).getpixel((3, 3))) == (128, 128, 128)


def test_rgba_transparent_areas_become_white(tmp_path):
    path = tmp_path / "rgba.png"
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
    image.paste((0, 0, 255, 255), (0, 0, 10, 20))  # opaque blue left half
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((15, 10)) == WHITE
    assert loaded.getpixel((5, 10)) == BLUE


def test_palette_with_transparency_becomes_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0] + list(RED) + [0] * (254 * 3))
    image.paste(1, (0, 0, 8, 16))
    image.save(path, transparency=0)  # index 0 (black) is transparent
    loaded = load_rgb(path)
    assert loaded.getpixel((12, 8)) == WHITE
    assert loaded.getpixel((3, 8)) == RED


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (64, 32), GREEN)
    image.paste(RED, (0, 0, 16, 16))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    loaded = load_rgb(path)
    assert loaded.size == (32, 64)
    assert close(loaded.getpixel((28, 3)), RED)  # clockwise turn carries top-left to top-right
    assert close(loaded.getpixel((3, 3)), GREEN)


def test_animated_gif_uses_first_frame_and_warns(tmp_path):
    frames = [Image.new("RGB", (80, 80), color) for color in (RED, BLUE, GREEN)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    noise_jpeg(tmp_path / "a.jpg")
    noise_jpeg(tmp_path / "b.jpg", seed=1)
    assert load_rgb(tmp_path / "anim.gif").getpixel((40, 40)) == RED
    warnings = check_instances(subject(tmp_path), 64)
    assert any("anim.gif" in w and "3 frames" in w and "first frame" in w for w in warnings)


def test_huge_jpeg_is_fast_and_correct(tmp_path):
    path = tmp_path / "huge.jpg"
    image = Image.new("RGB", (6000, 4000), BLUE)
    image.paste(RED, (1000, 0, 5000, 4000))  # the centred 4000x4000 square is red
    image.save(path, format="JPEG", quality=90)
    decoded = data._decode(path, 64)
    assert decoded.size == (6000, 4000)
    assert decoded.image.size[0] < 6000  # decoded at a reduced DCT scale
    prepared = center_crop_resize(decoded.image, 64)
    assert prepared.size == (64, 64)
    assert close(prepared.getpixel((2, 32)), RED, tol=10) and close(prepared.getpixel((61, 32)), RED, tol=10)


def test_center_crop_resize_takes_the_middle_square():
    image = Image.new("RGB", (300, 100), RED)
    image.paste(BLUE, (100, 0, 200, 100))
    out = center_crop_resize(image, 32)
    assert out.size == (32, 32)
    assert {out.getpixel((x, y)) for x in (0, 16, 31) for y in (0, 31)} == {BLUE}


# --------------------------------------------------------------------------------------------------------------
# Bad files are reported together


def bomb_png(path: Path, width=30000, height=30000) -> Path:
    """A small PNG whose header claims an absurd size."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    ihdr = raw[12:29]  # chunk type and data of the first chunk
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))
    return path


def make_bad_folder(folder: Path) -> dict[str, str]:
    """Good and bad files; returns each bad file's name and a word its problem line must contain."""
    noise_jpeg(folder / "good1.jpg")
    noise_jpeg(folder / "good2.jpg", seed=1)
    solid(folder / "good3.png", size=(64, 64))
    full = (folder / "good1.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "text.jpg").write_text("this is not a photo")
    (folder / "empty.png").write_bytes(b"")
    solid(folder / "tiny.png", size=(20, 12))
    bomb_png(folder / "bomb.png")
    (folder / "notes.txt").write_text("ignored")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    return {"truncated.jpg": "truncated", "text.jpg": "not an image", "empty.png": "empty",
            "tiny.png": "20x12", "bomb.png": "too large"}


def test_all_bad_files_in_one_error(tmp_path):
    bad = make_bad_folder(tmp_path)
    with pytest.raises(InstanceDataError) as caught:
        check_instances(subject(tmp_path), 64)
    message = str(caught.value)
    lines = message.splitlines()
    for name, word in bad.items():
        line = next(line for line in lines if f"{tmp_path / name}:" in line)
        assert word in line, line
    assert {p.name for p, _ in caught.value.problems} == set(bad)
    assert "good1.jpg" not in message and "notes.txt" not in message and ".DS_Store" not in message
    assert "Fix:" in message and str(tmp_path) in lines[0]


def test_tiny_image_message_names_size_resolution_and_fix(tmp_path):
    solid(tmp_path / "small.png", size=(100, 60))
    with pytest.raises(InstanceDataError) as caught:
        check_instances(subject(tmp_path), 256)
    problem = caught.value.problems[0][1]
    assert "100x60" in problem and "256" in problem and "2x" in problem and "lower train.resolution" in problem


def test_truncated_jpeg_is_rejected_even_if_pillow_was_told_to_accept_it(tmp_path, monkeypatch):
    full = noise_jpeg(tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(full[: len(full) // 2])
    monkeypatch.setattr(data.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InstanceDataError, match="truncated"):
        check_instances(subject(tmp_path), 64)
    assert data.ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is restored


def test_no_usable_image_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no photos here")
    with pytest.raises(InstanceDataError) as caught:
        check_instances(subject(tmp_path), 64)
    assert str(tmp_path) in str(caught.value) and "no images" in str(caught.value)


def test_only_bad_files_says_nothing_usable_is_left(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(InstanceDataError, match="no usable image is left"):
        check_instances(subject(tmp_path), 64)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(InstanceDataError, match="does not exist"):
        check_instances(subject(tmp_path / "nope"), 64)


def test_two_usable_images_warn_without_logging(tmp_path, caplog):
    noise_jpeg(tmp_path / "a.jpg")
    noise_jpeg(tmp_path / "b.jpg", seed=1)
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="harness.data"):
        warnings = check_instances(subject(tmp_path), 64)
    assert any("only 2 usable" in w for w in warnings)
    assert any("notes.txt" in w for w in warnings)
    assert not caplog.records  # the caller shows the warnings, once (the check runs again when images are prepared)


def test_a_panorama_warns_that_the_centre_crop_keeps_little_of_it(tmp_path):
    for seed in range(3):
        noise_jpeg(tmp_path / f"{seed}.jpg", seed=seed)
    noise_jpeg(tmp_path / "wide.jpg", size=(600, 100))
    warnings = check_instances(subject(tmp_path), 64)
    assert [w for w in warnings if "wide.jpg" in w] == [
        f"{tmp_path / 'wide.jpg'}: 600x100 px (6.0:1); training sees only its centre square, 17% of the photo, which "
        "may leave the subject out. Crop it around the subject."]
    assert len(warnings) == 1  # the 96x80 photos (1.2:1) are fine


def test_a_mostly_transparent_png_warns_and_a_cutout_does_not(tmp_path):
    for seed in range(3):
        noise_jpeg(tmp_path / f"{seed}.jpg", seed=seed)
    sparse = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    sparse.paste((200, 30, 30, 255), (0, 0, 32, 32))  # about 10% opaque
    sparse.save(tmp_path / "sparse.png")
    cutout = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    cutout.paste((30, 30, 200, 255), (20, 20, 80, 80))  # 36% opaque: a subject on a transparent background
    cutout.save(tmp_path / "cutout.png")
    warnings = check_instances(subject(tmp_path), 64)
    assert warnings == [f"{tmp_path / 'sparse.png'}: 90% of it is transparent, which becomes white, so the subject "
                        "fills only 10% of the image. Crop it closer around the subject."]


def test_more_photos_than_recommended_warn(tmp_path):
    for seed in range(10):
        noise_jpeg(tmp_path / f"{seed}.jpg", seed=seed)
    warnings = check_instances(subject(tmp_path), 64)
    assert len(warnings) == 1 and f"subject 'thing': 10 images in {tmp_path}; DreamBooth works best with 3-6" in \
        warnings[0]
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    for seed in range(6):
        noise_jpeg(tmp_path / f"{seed}.jpg", seed=seed)
    assert check_instances(subject(tmp_path), 64) == []


def test_three_good_images_give_no_warning(tmp_path):
    for seed in range(3):
        noise_jpeg(tmp_path / f"{seed}.jpg", seed=seed)
    assert check_instances(subject(tmp_path), 64) == []


def test_example_dog_loads_cleanly():
    files = list_instance_files(EXAMPLE_DOG)
    assert [p.name for p in files] == [f"0{i}.jpg" for i in range(5)]
    assert check_instances(subject(EXAMPLE_DOG), 512) == []
    assert all(load_rgb(p).mode == "RGB" for p in files)


# --------------------------------------------------------------------------------------------------------------
# Listing and digests


def test_list_instance_files_sorted_images_only(tmp_path):
    for name in ("b.PNG", "a.jpeg", "c.webp", ".hidden.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_instance_files(tmp_path)] == ["a.jpeg", "b.PNG", "c.webp"]


def test_folder_digest_follows_bytes_not_folder_location(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    noise_jpeg(folder / "a.jpg")
    noise_jpeg(folder / "b.jpg", seed=1)
    (folder / "notes.txt").write_text("not part of the data")
    before = folder_digest(folder)
    moved = tmp_path / "elsewhere" / "two"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    assert folder_digest(moved) == before
    (moved / "notes.txt").write_text("changed, still not data")
    assert folder_digest(moved) == before
    raw = bytearray((moved / "b.jpg").read_bytes())
    raw[-10] ^= 1
    (moved / "b.jpg").write_bytes(bytes(raw))
    assert folder_digest(moved) != before


# --------------------------------------------------------------------------------------------------------------
# Preparation cache


def test_prepare_instances_writes_square_pngs_and_reuses_them(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_jpeg(folder / "a.jpg", size=(120, 90))
    solid(folder / "b.png", color=BLUE, size=(70, 100))
    noise_jpeg(folder / "c.jpg", size=(64, 64), seed=2)
    cache = tmp_path / "cache"
    first = prepare_instances(subject(folder), 48, cache)
    assert [p.source.name for p in first] == ["a.jpg", "b.png", "c.jpg"]
    assert [p.path.name for p in first] == ["00.png", "01.png", "02.png"]
    assert all(isinstance(p, PreparedImage) and p.path.parent.parent == cache / "instances" for p in first)
    assert first[0].digest == data.file_digest(folder / "a.jpg")
    for prepared in first:
        with Image.open(prepared.path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)
    assert Image.open(first[1].path).getpixel((24, 24)) == BLUE
    manifest = first[0].path.parent / "manifest.json"
    assert manifest.is_file() and not list(first[0].path.parent.glob("*.tmp"))

    mtimes = {p: os.stat(p).st_mtime_ns for p in first[0].path.parent.iterdir()}
    decodes = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a, **k: decodes.append(a) or real_decode(*a, **k))
    second = prepare_instances(subject(folder), 48, cache)
    assert second == first
    assert decodes == []
    assert {p: os.stat(p).st_mtime_ns for p in first[0].path.parent.iterdir()} == mtimes

    other = prepare_instances(subject(folder), 32, cache)
    assert other[0].path.parent != first[0].path.parent and Image.open(other[0].path).size == (32, 32)


def test_prepare_instances_redoes_an_entry_without_manifest(tmp_path):
    noise_jpeg(tmp_path / "a.jpg")
    cache = tmp_path / "cache"
    first = prepare_instances(subject(tmp_path), 32, cache)
    (first[0].path.parent / "manifest.json").unlink()
    first[0].path.write_bytes(b"half written")
    again = prepare_instances(subject(tmp_path), 32, cache)
    assert Image.open(again[0].path).size == (32, 32)
    assert (again[0].path.parent / "manifest.json").is_file()


def test_prepare_instances_validates_first(tmp_path):
    noise_jpeg(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_text("not an image")
    cache = tmp_path / "cache"
    with pytest.raises(InstanceDataError, match=r"b\.jpg"):
        prepare_instances(subject(tmp_path), 32, cache)
    assert not (cache / "instances").exists() or not any((cache / "instances").rglob("*.png"))
