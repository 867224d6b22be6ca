"""Embedders: pinned DINO preprocessing, tiny offline backbones, the embedding cache, the offline error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from harness.embedders import (
    BackboneUnavailableError,
    EmbeddingCache,
    content_hash,
    embed_with_cache,
    load_clip,
    load_dino,
    make_embedders,
    pinned_dino_transform,
    tiny_clip,
    tiny_dino,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def tiny():
    return make_embedders("tiny", device="cpu", batch_size=2)


def gradient(width: int = 300, height: int = 200) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, 255 - x], axis=-1).round().astype(np.uint8)
    return Image.fromarray(pixels)


def colour_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


class ForwardCounter:
    """Counts the images an embedder actually runs through its model."""

    def __init__(self, embedder, monkeypatch):
        self.images = 0
        self.calls = 0
        original = embedder._forward_images

        def counted(pixels):
            self.images += pixels.shape[0]
            self.calls += 1
            return original(pixels)

        monkeypatch.setattr(embedder, "_forward_images", counted)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_pinned_dino_preprocessing_matches_a_manual_computation():
    image = gradient(300, 200)
    tensor = pinned_dino_transform()(image).numpy()
    assert tensor.shape == (3, 224, 224)
    # shorter side 200 -> 256, so 300 -> 384; then the central 224 x 224: left (384-224)/2 = 80, top (256-224)/2 = 16
    resized = np.asarray(image.resize((384, 256), Image.Resampling.BICUBIC), dtype=np.float64)
    expected = ((resized[16:240, 80:304] / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    for c, y, x in [(0, 0, 0), (1, 0, 0), (2, 223, 223), (0, 112, 50), (1, 200, 7)]:
        assert tensor[c, y, x] == pytest.approx(expected[c, y, x], abs=1e-5)
    np.testing.assert_allclose(tensor, expected, atol=1e-5)
    # the crop is centred: the red channel (a left-to-right ramp) at column 0 is the value of resized column 80
    assert tensor[0, 0, 0] == pytest.approx((resized[16, 80, 0] / 255 - MEAN[0]) / STD[0], abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Tiny backbones


def test_tiny_embedders_give_normalised_deterministic_rows(tiny):
    images = colour_images(3)
    clip, dino = tiny["clip"], tiny["dino"]
    clip_rows, dino_rows = clip.embed_images(images), dino.embed_images(images)
    assert clip_rows.shape == (3, 32) and dino_rows.shape == (3, 48)
    assert clip_rows.dtype == np.float32 and dino_rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(clip_rows, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dino_rows, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(dino_rows[0], dino_rows[1])  # different images, different rows
    np.testing.assert_array_equal(tiny_dino(batch_size=2).embed_images(images), dino_rows)  # same seed, same rows
    np.testing.assert_allclose(tiny_dino(batch_size=3).embed_images(images), dino_rows, atol=1e-6)
    assert not np.allclose(tiny_dino(seed=1).embed_images(images), dino_rows)
    texts = clip.embed_texts(["a dog", "a dog in the snow", "a cat"])
    assert texts.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiny_clip().embed_texts(["a dog in the snow"])[0], texts[1], atol=1e-6)


def test_tiny_embedders_describe_themselves(tiny):
    assert set(tiny) == {"clip", "dino"}
    described = {name: e.describe() for name, e in tiny.items()}
    assert described["clip"]["backbone"] == "tiny-random:clip" and described["dino"]["backbone"] == "tiny-random:dino"
    assert described["clip"]["embedding_dim"] == 32 and described["dino"]["embedding_dim"] == 48
    for name, info in described.items():
        assert tiny[name].is_tiny
        assert info["pretrained"] == "random (tiny, pipeline check only)"
        assert info["metric_scale"] == "raw cosine in [-1, 1]"
    assert "resize shorter side to 256 (bicubic), center crop 224" in described["dino"]["preprocessing"]
    assert tiny_dino(seed=3).tag == "tiny-random:dino:seed3"


def test_describe_reads_every_preprocessing_step_from_the_transform_it_runs(tiny):
    from torchvision import transforms

    from harness.embedders import transform_facts

    dino, clip = tiny["dino"].describe(), tiny["clip"].describe()
    assert (dino["resize"], dino["crop"], dino["interpolation"]) == ("shorter side to 256", "center 224x224",
                                                                     "bicubic, antialiased")
    assert dino["normalisation"] == "[0, 1] pixels, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
    assert (clip["resize"], clip["crop"]) == ("shorter side to 224", "center 224x224")
    assert clip["normalisation"] == ("[0, 1] pixels, mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, "
                                     "0.26130258, 0.27577711)")
    other = transforms.Compose([transforms.Resize((64, 96), interpolation=transforms.InterpolationMode.BILINEAR,
                                                  antialias=False), transforms.Grayscale(3), transforms.ToTensor()])
    assert transform_facts(other) == {"resize": "to 96x64 (width x height)", "crop": "none",
                                      "interpolation": "bilinear", "normalisation": "none",
                                      "other steps": "Grayscale"}


def test_make_embedders_rejects_unknown_backbones():
    with pytest.raises(ValueError, match=r"eval\.backbones"):
        make_embedders("huge")


# --------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_is_hit_on_second_call_and_computes_in_batches(tiny, tmp_path, monkeypatch):
    dino = tiny["dino"]
    counter = ForwardCounter(dino, monkeypatch)
    cache = EmbeddingCache(tmp_path)
    images = colour_images(5)
    first = embed_with_cache(dino, images, cache)
    assert (counter.images, counter.calls) == (5, 3)  # batch size 2
    np.testing.assert_array_equal(first, dino.embed_images(images))
    counter.images = counter.calls = 0
    second = embed_with_cache(dino, images, cache)
    assert (counter.images, counter.calls) == (0, 0)
    np.testing.assert_array_equal(second, first)
    stored = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(stored) == 5 and all(p.parts[0] == "embeddings" and p.suffix == ".npy" for p in stored)
    assert all(p.parts[2] == p.stem[:2] for p in stored)  # <safe tag>/<hash[:2]>/<hash>.npy


def test_cache_computes_only_missing_images_and_is_keyed_by_tag(tiny, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    images = colour_images(3)
    embed_with_cache(tiny["dino"], images[:2], cache)
    dino_counter = ForwardCounter(tiny["dino"], monkeypatch)
    rows = embed_with_cache(tiny["dino"], images, cache)
    assert dino_counter.images == 1 and rows.shape == (3, 48)
    clip_counter = ForwardCounter(tiny["clip"], monkeypatch)
    clip_rows = embed_with_cache(tiny["clip"], images, cache)
    assert clip_counter.images == 3 and clip_rows.shape == (3, 32)
    folders = {p.name for p in (tmp_path / "embeddings").iterdir()}
    assert len(folders) == 2 and any(f.startswith("tiny-random_clip") for f in folders)


def test_resaved_png_hits_the_cache_by_content(tiny, tmp_path, monkeypatch):
    image = colour_images(1)[0]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    image.save(first, compress_level=1)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "a sks dog")
    image.save(second, compress_level=9, pnginfo=info)
    assert first.read_bytes() != second.read_bytes()
    assert content_hash(Image.open(first)) == content_hash(Image.open(second)) == content_hash(image)
    assert content_hash(image) != content_hash(image.resize((56, 41)))
    cache = EmbeddingCache(tmp_path / "cache")
    embed_with_cache(tiny["dino"], [first], cache)
    counter = ForwardCounter(tiny["dino"], monkeypatch)
    embed_with_cache(tiny["dino"], [str(second)], cache)
    assert counter.images == 0


def test_a_damaged_cache_file_is_recomputed(tiny, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    image = colour_images(1)[0]
    expected = embed_with_cache(tiny["dino"], [image], cache)
    path = cache.path(tiny["dino"].tag, content_hash(image))
    path.write_bytes(path.read_bytes()[:20])
    counter = ForwardCounter(tiny["dino"], monkeypatch)
    np.testing.assert_array_equal(embed_with_cache(tiny["dino"], [image], cache), expected)
    assert counter.images == 1
    assert np.load(path).shape == (48,)
    assert not list(path.parent.glob("*.tmp"))


# --------------------------------------------------------------------------------------------------------------
# Real backbones offline


@pytest.mark.parametrize(("load", "names"), [(load_dino, "vit_small_patch16_224.dino"), (load_clip, "ViT-B-32")])
def test_real_backbones_offline_say_how_to_run_without_them(load, names, tmp_path: Path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # a cached copy must not be found
    with pytest.raises(BackboneUnavailableError) as error:
        load(device="cpu")
    message = str(error.value)
    assert names in message and "eval.backbones: tiny" in message and "cached" in message


def test_an_embedding_computed_again_comes_from_its_first_batch(tiny, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    images = colour_images(4)  # two aligned batches of 2
    first = embed_with_cache(tiny["dino"], images, cache)
    cache.path(tiny["dino"].tag, content_hash(images[1])).unlink()
    counter = ForwardCounter(tiny["dino"], monkeypatch)
    again = embed_with_cache(tiny["dino"], images, cache)
    assert (counter.images, counter.calls) == (2, 1)  # images 0 and 1, as the first time
    np.testing.assert_array_equal(again, first)
