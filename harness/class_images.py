"""Class-image pools for prior preservation.

One pool per (base model with revision, class prompt, resolution, sampler settings, seed), keyed by a hash of
exactly those fields, so a changed model or prompt never reuses stale images. A run with n class images uses the
first n images of its pool; asking for more grows the pool, it never regenerates it.

This module holds the pool identity and the planning of pools, and below them the generation: batched (the batch
never changes an image: each image has its own seed, PoolSpec.image_seed, and its own generator), in half
precision on a GPU, resumable image by image (each PNG is written atomically with a JSON sidecar holding its seed
and prompt), with the pool's manifest written last. `ensure_pool` is the entry point.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from PIL import Image
from tqdm.auto import tqdm

from harness.config import ClassImageSpec, ModelSpec
from harness.config.fields import in_identity
from harness.grid import RunSpec
from harness.store import atomic_path, atomic_write_json, read_json, text_digest
from harness.timings import count

if TYPE_CHECKING:  # torch and diffusers load only when images are generated: planning stays light
    import torch

    from harness.models import Components

log = logging.getLogger(__name__)

POOL_VERSION = 1


@dataclass(frozen=True)
class PoolSpec:
    """Everything that determines the images of a pool (its batch size does not: each image has its own seed)."""

    model: ModelSpec
    prompt: str
    resolution: int
    sampler: ClassImageSpec

    def identity(self) -> dict[str, Any]:
        sampler = {k: v for k, v in asdict(self.sampler).items() if in_identity(ClassImageSpec, k)}
        return {
            "version": POOL_VERSION,
            "model": {"id": self.model.id, "revision": self.model.revision, "dtype": self.model.dtype},
            "prompt": self.prompt,
            "resolution": self.resolution,
            "sampler": sampler,
        }

    @property
    def key(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return text_digest(canonical, 12)

    def image_seed(self, index: int) -> int:
        """The seed of image `index`: fixed by the pool's seed and the index, independent of batching."""
        return self.sampler.seed * 1_000_003 + index


def pool_for(run: RunSpec) -> PoolSpec | None:
    """The pool a run draws its class images from, or None without prior preservation."""
    if run.class_images is None:
        return None
    return PoolSpec(model=run.model, prompt=run.subject.class_text, resolution=run.train.resolution,
                    sampler=run.class_images)


def plan_pools(runs: list[RunSpec]) -> dict[PoolSpec, int]:
    """Each pool the runs need and the number of images it must hold (the largest n asked of it)."""
    sizes: dict[PoolSpec, int] = {}
    for run in runs:
        pool = pool_for(run)
        if pool is not None:
            sizes[pool] = max(sizes.get(pool, 0), run.train.num_class_images)
    return sizes


def pool_dir(cache_dir: Path, pool: PoolSpec) -> Path:
    return Path(cache_dir) / "class_images" / pool.key


# --------------------------------------------------------------------------------------------------------------
# Generation
#
# Layout of a pool folder: 000000.png, 000000.json (its seed and prompt; written after the PNG, so an image counts
# only once both exist), ... and manifest.json (the pool identity and its images), written last.

MANIFEST = "manifest.json"
SAVE_THREADS = 4
ComponentsSource = Union["Components", Callable[[], "Components"]]


def image_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.png"


def sidecar_path(png: Path) -> Path:
    return png.with_suffix(".json")


def is_present(folder: Path, index: int) -> bool:
    """Image `index` is complete: its sidecar is written after its PNG."""
    png = image_path(folder, index)
    return sidecar_path(png).is_file() and png.is_file()


def missing_indices(folder: Path, n: int) -> list[int]:
    """Indices below n whose image is not on disk yet."""
    return [i for i in range(n) if not is_present(folder, i)]


def present_prefix(folder: Path) -> int:
    """How many images, from index 0 on, are complete."""
    count = 0
    while is_present(folder, count):
        count += 1
    return count


def ensure_pool(
    pool: PoolSpec,
    n: int,
    cache_dir: Path,
    components_or_loader: ComponentsSource,
    device: torch.device | str,
    batch_size: int | None = None,
) -> list[Path]:
    """The first n images of the pool, generating only those missing.

    `components_or_loader` is the model or a function that loads it; a function is only called when images are
    missing. `batch_size` overrides the pool's ClassImageSpec.batch_size; neither changes which images exist, and
    once a pool has images, the batch size they were rendered with is kept so that a repaired or grown pool is the
    same, image for image, as one rendered in one go.
    """
    if n < 0:
        raise ValueError(f"cannot ask a pool for {n} images.")
    folder = pool_dir(cache_dir, pool)
    _check_manifest(folder, pool)
    todo = missing_indices(folder, n)
    if todo:
        components = components_or_loader() if callable(components_or_loader) else components_or_loader
        batch = batch_size or pool.sampler.batch_size or recorded_batch(folder)
        generate_images(pool, todo, folder, components, device, batch)
    if todo or not (folder / MANIFEST).is_file():
        _write_manifest(folder, pool)
    return [image_path(folder, i) for i in range(n)]


def recorded_batch(folder: Path) -> int | None:
    """The batch size the pool's images were rendered with, from their sidecars (None for a new pool)."""
    for sidecar in sorted(Path(folder).glob("*.json")):
        if sidecar.name == MANIFEST:
            continue
        try:
            batch = read_json(sidecar).get("batch_size")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(batch, int) and batch > 0:
            return batch
    return None


def aligned_batch(index: int, batch: int) -> list[int]:
    """The batch image `index` is rendered in: [k*batch, (k+1)*batch), so that an image's batch, and with it its
    exact pixels, never depends on which other images were missing."""
    start = index // batch * batch
    return list(range(start, start + batch))


def _check_manifest(folder: Path, pool: PoolSpec) -> None:
    path = folder / MANIFEST
    if path.is_file() and read_json(path).get("identity") != pool.identity():
        raise RuntimeError(f"{path} describes a different class-image pool than key {pool.key}; its images cannot "
                           f"be trusted. Delete the folder {folder} and run again.")


def _write_manifest(folder: Path, pool: PoolSpec) -> None:
    count = present_prefix(folder)
    images = [{"file": image_path(folder, i).name, **read_json(sidecar_path(image_path(folder, i)))}
              for i in range(count)]
    atomic_write_json(folder / MANIFEST, {"key": pool.key, "identity": pool.identity(), "count": count,
                                          "images": images})


def generate_images(
    pool: PoolSpec,
    indices: list[int],
    folder: Path,
    components: Components,
    device: torch.device | str,
    batch_size: int | None,
) -> None:
    """Renders and saves images `indices` of the pool, each from its own seed, in whole aligned batches (see
    `aligned_batch`); the other images of such a batch are saved too when they are not on disk yet."""
    import torch

    from harness.sampling import default_batch_size

    device = torch.device(device)
    batch = batch_size or default_batch_size(device, pool.resolution)
    pending = sorted(set(indices))
    bar = tqdm(total=len(pending), desc=f"class images {pool.prompt!r}", unit="img")
    # PNG encoding runs in threads (zlib releases the GIL) while the GPU renders the next batch.
    with _pipeline(pool, folder, components, device, batch, len(pending)) as (pipe, recipe), \
            torch.inference_mode(), ThreadPoolExecutor(SAVE_THREADS) as writers:
        saving: list[Future] = []
        while pending:
            chunk = aligned_batch(pending[0], batch)
            try:
                images = render_images(pipe, pool, chunk, device)
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = _halve_batch(batch, explicit=batch_size is not None)
                continue
            _wait(saving, bar)  # the previous batch: at most two batches of images wait in memory
            saving = [writers.submit(save_image, folder, pool, index, image, batch, recipe.name)
                      for index, image in zip(chunk, images, strict=True) if not is_present(folder, index)]
            pending = [i for i in pending if i not in chunk]
        _wait(saving, bar)
    bar.close()
    count(len(indices), "images")


def _wait(futures: list[Future], bar: tqdm) -> None:
    for future in futures:
        future.result()  # re-raises a failed write
    bar.update(len(futures))


def _halve_batch(batch: int, explicit: bool) -> int:
    import torch

    torch.cuda.empty_cache()
    if explicit:
        log.warning("class-image batch of %d does not fit in GPU memory; continuing with %d (lower "
                    "class_images.batch_size to skip this retry).", batch, batch // 2)
    return batch // 2


def render_images(pipe, pool: PoolSpec, indices: list[int], device: torch.device) -> list[Image.Image]:
    """The pool's images `indices`, each from its own seed."""
    from harness.sampling import render

    return render(pipe, [pool.prompt] * len(indices), [pool.image_seed(i) for i in indices], pool.resolution,
                  pool.sampler.steps, pool.sampler.guidance_scale, device, pool.sampler.negative_prompt)


def save_image(folder: Path, pool: PoolSpec, index: int, image: Image.Image, batch_size: int,
               render: str = "eager") -> None:
    png = image_path(folder, index)
    with atomic_path(png) as tmp:
        image.save(tmp, format="PNG")
    atomic_write_json(sidecar_path(png), {"index": index, "seed": pool.image_seed(index), "prompt": pool.prompt,
                                          "negative_prompt": pool.sampler.negative_prompt, "pool": pool.key,
                                          "batch_size": batch_size, "render": render})


def _pipeline(pool: PoolSpec, folder: Path, components: Components, device: torch.device, batch: int,
              count: int) -> contextlib.AbstractContextManager:
    """(pipeline, recipe used) for the pool: the recipe its images were rendered with, else `class_images.compile`
    resolved for `count` images (harness/inference.py). Aligned batches are always whole, so shapes never change."""
    import torch

    from harness.inference import choose_recipe, recipe_pipeline
    from harness.models import make_pipeline

    recorded = next((r for r in _sidecars(folder) if isinstance(r.get("batch_size"), int)), None)
    recipe, _ = choose_recipe(None if recorded is None else recorded.get("render", "eager"), pool.sampler.compile,
                              device, count, "sampling.class", (batch, pool.resolution))

    @contextlib.contextmanager
    def eager_pipeline():
        with _inference_placement(components, device):
            yield make_pipeline(components, pool.sampler.sampler)

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return recipe_pipeline(components, components.unet, pool.sampler.sampler, device, dtype, recipe,
                           (batch, pool.resolution), eager_pipeline)


def _sidecars(folder: Path) -> Iterator[dict[str, Any]]:
    for sidecar in sorted(Path(folder).glob("*.json")):
        if sidecar.name == MANIFEST:
            continue
        try:
            record = read_json(sidecar)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            yield record


@contextlib.contextmanager
def _inference_placement(components: Components, device: torch.device) -> Iterator[None]:
    """The model on `device` for generation, in half precision on a GPU, then back where it was.

    Modules are moved, never cast: float32 weights on a GPU run under fp16 autocast instead, so the caller's
    weights are not rounded.
    """
    import torch

    from harness.models import placed

    half = device.type == "cuda" and components.unet.dtype == torch.float32
    with placed([components.unet, components.vae, components.text_encoder], device), (
            torch.autocast("cuda", dtype=torch.float16) if half else contextlib.nullcontext()):
        yield
