"""Class-image pools: keys, reuse, growth, resuming image by image, and independence from the batch size."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from harness import class_images
from harness.backends.tiny import build_tiny_components
from harness.class_images import PoolSpec, ensure_pool, pool_dir
from harness.config import ClassImageSpec, ModelSpec

POOL = PoolSpec(model=ModelSpec(id="tiny"), prompt="a dog", resolution=32, sampler=ClassImageSpec(steps=2))


class Loader:
    """Loads the tiny model on demand and counts how often it was asked to."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return build_tiny_components()


@pytest.fixture
def rendered(monkeypatch):
    """Records which image indices are rendered."""
    seen: list[int] = []
    real = class_images.render_images

    def spy(pipe, pool, indices, device):
        seen.extend(indices)
        return real(pipe, pool, indices, device)

    monkeypatch.setattr(class_images, "render_images", spy)
    return seen


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_pool_keys_change_with_each_identity_field():
    variants = [
        POOL,
        replace(POOL, model=ModelSpec(id="other/model")),
        replace(POOL, model=ModelSpec(id="tiny", revision="abc")),
        replace(POOL, model=ModelSpec(id="tiny", dtype="bf16")),
        replace(POOL, prompt="a cat"),
        replace(POOL, resolution=64),
        replace(POOL, sampler=replace(POOL.sampler, sampler="ddim")),
        replace(POOL, sampler=replace(POOL.sampler, steps=3)),
        replace(POOL, sampler=replace(POOL.sampler, guidance_scale=5.0)),
        replace(POOL, sampler=replace(POOL.sampler, seed=1)),
        replace(POOL, sampler=replace(POOL.sampler, negative_prompt="blurry")),
    ]
    assert len({v.key for v in variants}) == len(variants)
    assert replace(POOL, sampler=replace(POOL.sampler, batch_size=7)).key == POOL.key


def test_reuse_and_growth_generate_only_what_is_missing(tmp_path, rendered):
    """Images are rendered in whole aligned batches (4 on a CPU) and every image of a batch is kept."""
    loader = Loader()
    first = ensure_pool(POOL, 2, tmp_path, loader, "cpu")
    assert rendered == [0, 1, 2, 3] and loader.calls == 1
    assert first == [pool_dir(tmp_path, POOL) / f"{i:06d}.png" for i in range(2)]
    before = [p.read_bytes() for p in first]

    assert ensure_pool(POOL, 2, tmp_path, loader, "cpu") == first
    assert ensure_pool(POOL, 4, tmp_path, loader, "cpu")[:2] == first  # already rendered with the first batch
    assert ensure_pool(POOL, 1, tmp_path, loader, "cpu") == first[:1]  # a prefix of the pool
    assert rendered == [0, 1, 2, 3] and loader.calls == 1  # nothing generated, the model not even loaded

    grown = ensure_pool(POOL, 5, tmp_path, loader, "cpu")
    assert rendered == [0, 1, 2, 3, 4, 5, 6, 7] and loader.calls == 2
    assert grown[:2] == first and [p.read_bytes() for p in first] == before  # never regenerated


@pytest.mark.slow
def test_a_grown_pool_equals_one_rendered_at_once(tmp_path):
    components = build_tiny_components()
    grown = [ensure_pool(POOL, n, tmp_path / "grown", components, "cpu", batch_size=2) for n in (1, 3, 6)][-1]
    once = ensure_pool(POOL, 6, tmp_path / "once", components, "cpu", batch_size=2)
    for a, b in zip(grown, once, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_sidecars_and_manifest_record_seed_and_prompt(tmp_path):
    pool = replace(POOL, sampler=replace(POOL.sampler, seed=7))
    paths = ensure_pool(pool, 3, tmp_path, build_tiny_components(), "cpu")
    for i, path in enumerate(paths):
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["seed"] == pool.image_seed(i) and sidecar["prompt"] == "a dog" and sidecar["index"] == i
        assert Image.open(path).size == (32, 32)
    manifest = json.loads((pool_dir(tmp_path, pool) / "manifest.json").read_text())
    # A CPU renders batches of 4, and the whole batch is kept: the pool holds 4 images.
    assert manifest["count"] == 4 and manifest["identity"] == pool.identity() and manifest["key"] == pool.key
    assert [m["seed"] for m in manifest["images"]] == [pool.image_seed(i) for i in range(4)]


def test_generation_resumes_image_by_image(tmp_path, rendered):
    paths = ensure_pool(POOL, 3, tmp_path, build_tiny_components(), "cpu")
    original = pixels(paths[1])
    paths[1].with_suffix(".json").unlink()  # as if killed after writing the PNG, before its sidecar
    (pool_dir(tmp_path, POOL) / "manifest.json").unlink()
    ensure_pool(POOL, 3, tmp_path, build_tiny_components(), "cpu")
    assert rendered == [0, 1, 2, 3, 0, 1, 2, 3]  # image 1 again, in the same batch as the first time
    assert np.array_equal(pixels(paths[1]), original)  # so its pixels are exactly the same
    assert json.loads((pool_dir(tmp_path, POOL) / "manifest.json").read_text())["count"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["pndm", "euler_a"])
def test_images_do_not_depend_on_the_batch_size(tmp_path, sampler):
    """Each image has its own seed and generator. Batched float arithmetic can round differently (about 1e-6
    here), which may move a pixel by one 8-bit level; nothing more."""
    pool = replace(POOL, sampler=replace(POOL.sampler, sampler=sampler))
    components = build_tiny_components()
    one = ensure_pool(pool, 4, tmp_path / "one", components, "cpu", batch_size=1)
    three = ensure_pool(pool, 4, tmp_path / "three", components, "cpu", batch_size=3)
    for a, b in zip(one, three, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(one[0]) - pixels(one[1])).max() > 10  # different seeds, different images


def test_a_folder_of_another_pool_is_refused(tmp_path):
    ensure_pool(POOL, 1, tmp_path, build_tiny_components(), "cpu")
    manifest = pool_dir(tmp_path, POOL) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["identity"]["prompt"] = "a cat"
    manifest.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="different class-image pool"):
        ensure_pool(POOL, 1, tmp_path, build_tiny_components(), "cpu")
