"""On-disk caches of what the frozen VAE and text encoder compute, and the training data built from them.

- Latent distributions: the mean and std of `vae.encode(image).latent_dist` for every instance and class image, one
  safetensors file per image under `<cache_dir>/latents/`, keyed by the image's content hash, the model identity,
  the VAE dtype and the resolution. Training samples `mean + std * noise` from them with its own generator.
- Text embeddings: the text encoder's last hidden states of a prompt, under `<cache_dir>/text/`, keyed by the
  prompt, the model identity and the encoder dtype.

The VAE and the text encoder are moved to the device only while something is missing, and back where they were,
so once the caches exist training never holds them on the GPU. `build_training_data` gives the trainer everything
it reads: the cached distributions and embeddings of one run. A cache file that cannot be read back (cut short,
damaged) is named in the log, removed and computed again; missing entries are computed under a lock, so processes
that share the cache compute each entry once.

Nothing here trains, generates class images or prepares (crops) instance images (data.py does that).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from harness.models import Components, encode_prompts, placed
from harness.store import atomic_path, discard, file_digest, lock_file, text_digest

CACHE_VERSION = 1
# One image per VAE call: a batch's floating-point rounding depends on its other images, so a latent encoded in a
# batch would depend on which images happened to be missing together (the order runs execute in, a repair). Alone,
# every image encodes to the same bits in any order, on any worker; the cost is a few seconds, once per image.
ENCODE_BATCH = 1
LATENT_TENSORS = ("mean", "std")


@dataclass(frozen=True)
class LatentBank:
    """Cached latent distributions of a set of images: (N, C, h, w) mean and std, float32, on the CPU."""

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Latents of the images at `indices` drawn from their distributions (unscaled)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


@dataclass(frozen=True)
class TrainingData:
    """What one run trains on. Without prior preservation the class fields are None and never read; a prompt the
    method encodes in every step has no cached embedding (None)."""

    instance_latents: LatentBank
    instance_embedding: torch.Tensor | None  # (1, tokens, hidden), float32, CPU; None when encoded in each step
    instance_prompt: str
    class_latents: LatentBank | None = None
    class_embedding: torch.Tensor | None = None
    class_prompt: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Keys


def latent_key(image_digest: str, components: Components, resolution: int) -> str:
    text = f"v{CACHE_VERSION}|latent|{image_digest}|{components.identity}|{components.vae.dtype}|{resolution}"
    return text_digest(text, 24)


def text_key(prompt: str, components: Components) -> str:
    text = f"v{CACHE_VERSION}|text|{prompt}|{components.identity}|{components.text_encoder.dtype}"
    return text_digest(text, 24)


def latent_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "latents" / f"{key}.safetensors"


def text_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "text" / f"{key}.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Latent distributions


def load_image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """An image as a (3, resolution, resolution) tensor in [-1, 1]; it must already be square at that size."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (resolution, resolution):
        raise ValueError(f"{path} is {rgb.size[0]}x{rgb.size[1]} pixels but training runs at {resolution}x"
                         f"{resolution}; prepare the images at the run's resolution (data.prepare_instances does "
                         "this for instance images, class-image pools are generated at it).")
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def read_cached(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The tensors `names` of a cache file, or None when it is absent or cannot be read back (then it is removed,
    named in the log)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type, OSError or ValueError on damaged files
        discard(f"cannot be read ({type(error).__name__}: {error})", path)
        return None
    if any(name not in tensors for name in names):
        discard(f"lacks {', '.join(n for n in names if n not in tensors)}", path)
        return None
    return tensors


def latent_bank(
    components: Components, paths: Sequence[Path], resolution: int, cache_dir: Path, device: torch.device | str
) -> LatentBank:
    """The latent distributions of `paths`, encoding (in batches) only the images not cached yet."""
    keys = [latent_key(file_digest(p), components, resolution) for p in paths]
    stored = {k: read_cached(latent_path(cache_dir, k), LATENT_TENSORS) for k in keys}
    if any(v is None for v in stored.values()):
        with lock_file(Path(cache_dir) / "latents" / ".lock"):
            # Another process may have encoded them while this one waited.
            stored = {k: v if v is not None else read_cached(latent_path(cache_dir, k), LATENT_TENSORS)
                      for k, v in stored.items()}
            missing = [(p, k) for p, k in zip(paths, keys, strict=True) if stored[k] is None]
            if missing:
                with placed([components.vae], device):
                    for start in range(0, len(missing), ENCODE_BATCH):
                        _encode_and_store(components, missing[start : start + ENCODE_BATCH], resolution, cache_dir,
                                          device)
        stored = {k: v if v is not None else load_file(str(latent_path(cache_dir, k))) for k, v in stored.items()}
    return LatentBank(mean=torch.stack([stored[k]["mean"] for k in keys]),
                      std=torch.stack([stored[k]["std"] for k in keys]))


def _encode_and_store(
    components: Components, batch: list[tuple[Path, str]], resolution: int, cache_dir: Path, device
) -> None:
    vae = components.vae
    pixels = torch.stack([load_image_tensor(p, resolution) for p, _ in batch]).to(device=device, dtype=vae.dtype)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    for i, (_, key) in enumerate(batch):
        tensors = {"mean": dist.mean[i].float().cpu().contiguous(), "std": dist.std[i].float().cpu().contiguous()}
        with atomic_path(latent_path(cache_dir, key)) as tmp:
            save_file(tensors, str(tmp))


# --------------------------------------------------------------------------------------------------------------
# Text embeddings


def text_embedding(components: Components, prompt: str, cache_dir: Path, device: torch.device | str) -> torch.Tensor:
    """The frozen text encoder's embedding of `prompt`, (1, tokens, hidden) float32 on the CPU, cached on disk."""
    path = text_path(cache_dir, text_key(prompt, components))
    stored = read_cached(path, ("embedding",))
    if stored is None:
        with lock_file(path.parent / ".lock"):
            stored = read_cached(path, ("embedding",))
            if stored is None:
                with placed([components.text_encoder], device):
                    embedding = encode_prompts(components, [prompt], device)[0]
                with atomic_path(path) as tmp:
                    save_file({"embedding": embedding.float().cpu().contiguous()}, str(tmp))
                stored = load_file(str(path))
    return stored["embedding"].unsqueeze(0)


# --------------------------------------------------------------------------------------------------------------
# One run's data


def build_training_data(
    components: Components,
    instance_paths: Sequence[Path],
    instance_prompt: str,
    resolution: int,
    cache_dir: Path,
    device: torch.device | str,
    class_paths: Sequence[Path] | None = None,
    class_prompt: str | None = None,
    encoded_in_step: Collection[str] = (),
) -> TrainingData:
    """Cached latents and embeddings of a run's instance images and, with prior preservation, its class images.

    `class_paths` are the first n images of the run's pool; leave them None without prior preservation, then no
    class image is read. `encoded_in_step` names the prompt kinds ("instance", "class") the method runs through the
    text encoder in every step: their embedding is neither computed nor read here (it would be stale, e.g. once a
    token's embedding trains), and the field stays None.
    """
    if not instance_paths:
        raise ValueError("no instance images were given; a run needs at least one prepared instance image.")
    if (class_paths is None) != (class_prompt is None):
        raise ValueError("class_paths and class_prompt go together: give both (prior preservation) or neither.")
    if class_paths is not None and not class_paths:
        raise ValueError("class_paths is empty; with prior preservation a run needs at least one class image.")

    def embedding(kind: str, prompt: str) -> torch.Tensor | None:
        return None if kind in encoded_in_step else text_embedding(components, prompt, cache_dir, device)

    data = TrainingData(
        instance_latents=latent_bank(components, instance_paths, resolution, cache_dir, device),
        instance_embedding=embedding("instance", instance_prompt),
        instance_prompt=instance_prompt,
    )
    if class_paths is None:
        return data
    return replace(
        data,
        class_latents=latent_bank(components, class_paths, resolution, cache_dir, device),
        class_embedding=embedding("class", class_prompt),
        class_prompt=class_prompt,
    )
