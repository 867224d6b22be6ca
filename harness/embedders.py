"""Image and text embedders for the metrics (CLIP through open_clip, DINO through timm), and their disk cache.

Real backbones: OpenCLIP `ViT-B-32` with the `openai` weights and timm `vit_small_patch16_224.dino` (final-normed
CLS token, pinned preprocessing). Both download once and are then cached by their libraries; offline, loading
raises `BackboneUnavailableError` with the way out. Tiny variants have the same interfaces and random weights
fixed by a seed: they make every code path run offline and say nothing about images. The `real` and `tiny` sets
defined here add the LPIPS network of perceptual.py as their `lpips` role.

Every embedder's `describe()` states its weights and its preprocessing step by step (resize, crop, interpolation,
normalisation), read from the transform it actually runs (`transform_facts`).

Every embedding is a float32 row, L2-normalised, so a dot product is a raw cosine in [-1, 1].
`embed_with_cache` stores one vector per (embedder tag, image content hash) and computes only what is missing, in
aligned batches, so a vector computed again is the same as the first.

What this module does not hold: the metric math (metrics.py), the LPIPS network (perceptual.py) and the choice of
images to score (evaluator.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from harness.backbones import TINY_SOURCE, BackboneSet, BackboneUnavailableError, offline_message, seeded
from harness.data import load_rgb, to_rgb8
from harness.perceptual import MIN_SIDE as LPIPS_MIN_SIDE
from harness.perceptual import load_lpips, tiny_lpips
from harness.store import atomic_path, discard, text_digest

if TYPE_CHECKING:
    import torch

CLIP_MODEL = "ViT-B-32"
CLIP_PRETRAINED = "openai"
DINO_MODEL = "vit_small_patch16_224.dino"
CLIP_TAG = f"open_clip:{CLIP_MODEL}/{CLIP_PRETRAINED}"  # the tags the real backbones record, as the paper used them
DINO_TAG = f"timm:{DINO_MODEL}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE = 256
DINO_CROP = 224
DINO_PREPROCESSING = (f"resize shorter side to {DINO_RESIZE} (bicubic), center crop {DINO_CROP}, "
                      f"ImageNet mean {IMAGENET_MEAN} / std {IMAGENET_STD}")
CLIP_PREPROCESSING = ("open_clip ViT-B-32/openai: resize shorter side to 224 (bicubic), center crop 224, "
                      "OpenAI CLIP mean/std")
METRIC_SCALE = "raw cosine in [-1, 1]"
PREPROCESS_THREADS = min(8, os.cpu_count() or 1)
DEFAULT_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------------------------
# Preprocessing


def as_rgb(image_or_path: Image.Image | str | Path) -> Image.Image:
    """An image in memory or on disk as 8-bit RGB, decoded as the instance images are (`data.load_rgb`): EXIF
    orientation applied, first frame, transparency on white."""
    if isinstance(image_or_path, Image.Image):
        return image_or_path if image_or_path.mode == "RGB" else to_rgb8(image_or_path)
    return load_rgb(Path(image_or_path))


def pinned_dino_transform() -> Callable[[Image.Image], torch.Tensor]:
    """The pinned DINO preprocessing: shorter side to 256 bicubic, center crop 224, ImageNet normalisation."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(DINO_RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(DINO_CROP),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _clip_transform() -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's evaluation transform for ViT-B-32/openai, built from its defaults (no download)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(size=224), is_train=False)


def transform_facts(transform: Callable[[Image.Image], torch.Tensor]) -> dict[str, str]:
    """What a torchvision-style transform does, read from its steps: resize, crop, interpolation, normalisation.

    Steps it does not know are listed under "other steps", so nothing it runs goes unsaid.
    """
    facts = {"resize": "none", "crop": "none", "interpolation": "none", "normalisation": "none"}
    others = []
    for step in getattr(transform, "transforms", [transform]):
        kind = type(step).__name__
        if kind == "Resize":
            size = step.size if isinstance(step.size, int) or len(step.size) != 1 else step.size[0]
            facts["resize"] = (f"shorter side to {size}" if isinstance(size, int)
                               else f"to {size[1]}x{size[0]} (width x height)")
            mode = getattr(step.interpolation, "value", step.interpolation)
            facts["interpolation"] = f"{mode}{', antialiased' if getattr(step, 'antialias', False) else ''}"
        elif kind == "CenterCrop":
            height, width = step.size
            facts["crop"] = f"center {width}x{height}"
        elif kind == "Normalize":
            facts["normalisation"] = (f"[0, 1] pixels, mean {_numbers(step.mean)}, std {_numbers(step.std)}")
        elif kind not in ("ToTensor", "MaybeToTensor", "MaybeConvertMode", "function"):
            others.append(kind)
    if others:
        facts["other steps"] = ", ".join(others)
    return facts


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.8g}" for v in values) + ")"


# --------------------------------------------------------------------------------------------------------------
# Embedders


class Embedder(ABC):
    """Turns images into L2-normalised float32 rows, in batches, without gradients, on one device."""

    def __init__(self, model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor], *, tag: str,
                 model_id: str, source: str, preprocessing: str, device: str | torch.device,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.model = model.to(device).eval().requires_grad_(False)
        self.transform = transform
        self.tag = tag
        self.model_id = model_id
        self.source = source
        self.preprocessing = preprocessing
        self.device = device
        self.batch_size = batch_size

    @property
    def is_tiny(self) -> bool:
        return self.source == TINY_SOURCE

    @abstractmethod
    def _forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D) unnormalised features."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        rows = []
        with ThreadPoolExecutor(max_workers=PREPROCESS_THREADS) as pool:
            for start in range(0, len(images), self.batch_size):
                # Decoding and resizing dominate on a GPU; Pillow releases the GIL, so threads overlap them.
                batch = list(pool.map(self._preprocess, images[start:start + self.batch_size]))
                with torch.inference_mode():
                    features = self._forward_images(torch.stack(batch).to(self.device))
                rows.append(_normalised_numpy(features))
        return self._stack(rows)

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(as_rgb(image))

    def _stack(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of an embedding row."""

    def describe(self) -> dict[str, Any]:
        """Metadata for CSVs and reports: which backbone, weights, preprocessing and scale produced the numbers."""
        return {
            "backbone": self.tag,
            "model_id": self.model_id,
            "pretrained": self.source,
            "embedding_dim": self.dim,
            "preprocessing": self.preprocessing,
            **transform_facts(self.transform),
            "metric_scale": METRIC_SCALE,
        }


def _normalised_numpy(features: torch.Tensor) -> np.ndarray:
    import torch.nn.functional as F

    return F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32)


class ClipEmbedder(Embedder):
    """An OpenCLIP model: image embeddings and text embeddings in one space."""

    def __init__(self, model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], **kwargs: Any):
        super().__init__(model, transform, **kwargs)
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def _forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            with torch.inference_mode():
                rows.append(_normalised_numpy(self.model.encode_text(tokens)))
        return self._stack(rows)


class DinoEmbedder(Embedder):
    """A timm ViT: the CLS token after the final norm (what DINO's evaluation uses)."""

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def _forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)[:, 0]


# --------------------------------------------------------------------------------------------------------------
# Builders and the sets they form (registered in harness/backbones.py)


def load_clip(device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE) -> ClipEmbedder:
    """OpenCLIP ViT-B-32 with OpenAI's weights, using the QuickGELU activation those weights were trained with."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            CLIP_MODEL, pretrained=CLIP_PRETRAINED, force_quick_gelu=True)
    except (OSError, RuntimeError) as e:
        raise BackboneUnavailableError(offline_message(f"open_clip {CLIP_MODEL}/{CLIP_PRETRAINED}", "open_clip",
                                                        e)) from e
    return ClipEmbedder(
        model, preprocess, open_clip.get_tokenizer(CLIP_MODEL), tag=CLIP_TAG,
        model_id=f"{CLIP_MODEL} (QuickGELU)", source=f"open_clip pretrained={CLIP_PRETRAINED!r}",
        preprocessing=CLIP_PREPROCESSING, device=device, batch_size=batch_size,
    )


def load_dino(device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE) -> DinoEmbedder:
    """timm's DINO ViT-S/16 with the pinned preprocessing (not timm's data config, which could change)."""
    import timm

    try:
        model = timm.create_model(DINO_MODEL, pretrained=True, num_classes=0, global_pool="token", use_naflex=False)
    except (OSError, RuntimeError) as e:
        raise BackboneUnavailableError(offline_message(f"timm {DINO_MODEL}", "timm", e)) from e
    return DinoEmbedder(
        model, pinned_dino_transform(), tag=DINO_TAG, model_id=DINO_MODEL,
        source=f"timm pretrained ({DINO_MODEL})", preprocessing=DINO_PREPROCESSING, device=device,
        batch_size=batch_size,
    )


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_DINO_CONFIG = {"img_size": DINO_CROP, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3}


def _tiny_tag(name: str, seed: int) -> str:
    return f"tiny-random:{name}" if seed == 0 else f"tiny-random:{name}:seed{seed}"


def tiny_clip(device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> ClipEmbedder:
    """A 2-layer OpenCLIP model with random weights, the real tokenizer and the real CLIP preprocessing."""
    import open_clip

    model = seeded(seed, lambda: open_clip.CLIP(**TINY_CLIP_CONFIG))
    return ClipEmbedder(
        model, _clip_transform(), open_clip.get_tokenizer(CLIP_MODEL), tag=_tiny_tag("clip", seed),
        model_id="tiny open_clip CLIP (embed_dim 32; vision 2 layers x 64, patch 32; text 2 layers x 64)",
        source=TINY_SOURCE, preprocessing=CLIP_PREPROCESSING, device=device, batch_size=batch_size,
    )


def tiny_dino(device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> DinoEmbedder:
    """A 2-block timm ViT with random weights and the pinned DINO preprocessing."""
    from timm.models.vision_transformer import VisionTransformer

    model = seeded(seed, lambda: VisionTransformer(num_classes=0, global_pool="token", **TINY_DINO_CONFIG))
    return DinoEmbedder(
        model, pinned_dino_transform(), tag=_tiny_tag("dino", seed),
        model_id="tiny timm VisionTransformer (2 blocks x 48, patch 16)", source=TINY_SOURCE,
        preprocessing=DINO_PREPROCESSING, device=device, batch_size=batch_size,
    )


REAL_BACKBONES = BackboneSet({"clip": load_clip, "dino": load_dino, "lpips": load_lpips}, lpips_min_side=LPIPS_MIN_SIDE,
                             description=f"open_clip {CLIP_MODEL}/{CLIP_PRETRAINED}, timm {DINO_MODEL} and LPIPS")
TINY_BACKBONES = BackboneSet({"clip": tiny_clip, "dino": tiny_dino, "lpips": tiny_lpips}, random_weights=True,
                             lpips_min_side=LPIPS_MIN_SIDE,
                             description="tiny random CLIP, DINO and LPIPS (pipeline check only)")

DEFAULT_ROLES = ("clip", "dino")


def make_embedders(backbones: str, device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE,
                   roles: Iterable[str] = DEFAULT_ROLES, lpips_net: str = "alex") -> dict[str, Any]:
    """The backbones of `roles` (embedders, and the LPIPS network for `lpips`) from the backbone set
    `eval.backbones` names ("real", "tiny", "toyworld", ...); `lpips_net` is `eval.lpips_net`."""
    from harness.backbones import BACKBONES

    if backbones not in BACKBONES:
        raise ValueError(f"eval.backbones: unknown value {backbones!r}; use one of {', '.join(BACKBONES)}.")
    return BACKBONES.get(backbones).load(roles, device=device, batch_size=batch_size,
                                         options={"lpips": {"net": lpips_net}})


# --------------------------------------------------------------------------------------------------------------
# Cache


def content_hash(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and the size: the same picture re-saved (PNG, metadata) hashes the same."""
    rgb = as_rgb(image)
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _safe_tag(tag: str) -> str:
    # The short hash keeps tags that differ only in punctuation apart.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", tag).strip("_")
    return f"{readable}-{text_digest(tag, 8)}"


class EmbeddingCache:
    """One .npy vector per (network tag, key) under cache_dir/<folder>/, each written atomically.

    The key is an image's content hash for embeddings (folder `embeddings`); the LPIPS distances of image pairs use
    the same store under `lpips` (evaluator.py).
    """

    def __init__(self, cache_dir: str | Path, folder: str = "embeddings"):
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / folder

    def path(self, tag: str, image_hash: str) -> Path:
        return self.root / _safe_tag(tag) / image_hash[:2] / f"{image_hash}.npy"

    def get(self, tag: str, image_hash: str) -> np.ndarray | None:
        path = self.path(tag, image_hash)
        try:
            vector = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as error:
            discard(f"cannot be read ({error})", path)  # computed again and rewritten
            return None
        if vector.ndim != 1 or vector.dtype != np.float32 or not np.all(np.isfinite(vector)):
            discard("is not a finite float32 vector", path)
            return None
        return vector

    def put(self, tag: str, image_hash: str, vector: np.ndarray) -> None:
        path = self.path(tag, image_hash)
        # Written beside the target and renamed over it, so a run killed mid-write leaves no partial .npy.
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            np.save(out, np.asarray(vector, dtype=np.float32), allow_pickle=False)


def embed_with_cache(embedder: Embedder, images_or_paths: Iterable[Image.Image | str | Path],
                     cache: EmbeddingCache) -> np.ndarray:
    """Embeddings of the images (N, D), computing only those not cached for this embedder.

    The images are embedded in aligned batches of the list ([k*batch, (k+1)*batch)): a batch with any image missing
    from the cache is embedded whole, so an embedding computed again (after a kill, or a damaged cache file) comes
    from the same batch as the first time and is the same to the last bit.
    """
    items = list(images_or_paths)
    rows: list[np.ndarray] = []
    for start in range(0, len(items), embedder.batch_size):
        images = [as_rgb(item) for item in items[start:start + embedder.batch_size]]
        hashes = [content_hash(image) for image in images]
        cached = [cache.get(embedder.tag, image_hash) for image_hash in hashes]
        if any(vector is None for vector in cached):
            computed = embedder.embed_images(images)
            for image_hash, vector, new in zip(hashes, cached, computed, strict=True):
                if vector is None:
                    cache.put(embedder.tag, image_hash, new)
            cached = [new if vector is None else vector for vector, new in zip(cached, computed, strict=True)]
        rows.extend(cached)
    if not rows:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack(rows)
