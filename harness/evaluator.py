"""Scoring: features of generated and real images -> per-image scores -> per-snapshot metrics, as a scores record.

Three kinds of scored unit share one record format (records.py): a run's snapshot, the base model (step 0, the
same prompts and seeds) and the real images (leave-one-out real-vs-real, the paper's "Real Images" row). The
scorer computes only the features its metrics read (metrics.FEATURE_ROLES): embeddings are cached per (image
content, backbone) by embedders.py, and LPIPS distances, only between images of one prompt with different seeds,
per (pair of image contents, network) here, so re-scoring computes nothing twice.

What this module does not hold: image generation (sampling.py), the networks (embedders.py, perceptual.py) or the
metric definitions (metrics.py, builtin_metrics.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import EvalSpec, SubjectSpec
from harness.data import load_rgb
from harness.embedders import Embedder, EmbeddingCache, content_hash, embed_with_cache
from harness.metrics import (
    FEATURE_ROLES,
    ImageSet,
    MetricResult,
    clip_t_texts,
    features_for,
    roles_for,
    score,
    score_real_images,
)
from harness.perceptual import LpipsNetwork
from harness.records import scores_header, scores_name, scores_record, write_scores
from harness.timings import count

LPIPS_CACHE = "lpips"
IMAGE_EMBEDDINGS = ("dino", "clip_image")  # features that are one embedding per image


def record_name(spec: EvalSpec) -> str:
    """File name of a scores record: other backbones, metrics or LPIPS network give another file, never a stale one."""
    options = {"lpips_net": spec.lpips_net} if spec.lpips_net != EvalSpec.lpips_net else {}
    return scores_name(spec.backbones, spec.metrics, spec.bootstrap_samples, options)


class Scorer:
    """The evaluation backbones of a protocol (by role) with their embedding cache, loaded once and shared by every
    unit. It computes the features its metrics read and nothing else."""

    def __init__(self, embedders: dict[str, Any], cache: EmbeddingCache, spec: EvalSpec):
        self.embedders = embedders
        self.features = features_for(spec.metrics)
        self.cache = cache
        self.distances = EmbeddingCache(cache.cache_dir, LPIPS_CACHE)
        self.spec = spec
        missing = [r for r in roles_for(spec.metrics) if r not in embedders]
        if missing:
            needing = [m for m in spec.metrics if set(roles_for([m])) & set(missing)]
            raise ValueError(f"the metrics {', '.join(needing)} need the {', '.join(missing)} backbone(s), which "
                             "were not loaded; build the backbones with make_embedders(..., roles=roles_for(metrics)).")

    def backbones(self) -> dict[str, Any]:
        return {role: embedder.describe() for role, embedder in self.embedders.items()}

    @property
    def record_name(self) -> str:
        return record_name(self.spec)

    def embed(self, embedder: Embedder, paths: Sequence[Path]) -> np.ndarray:
        return embed_with_cache(embedder, [load_rgb(Path(p)) for p in paths], self.cache)

    def image_features(self, paths: Sequence[Path]) -> dict[str, np.ndarray | None]:
        """{backbone role: rows or None} of the image embeddings ("dino", "clip_image"): None where no metric reads
        them."""
        return {FEATURE_ROLES[feature]: self.embed(self.embedders[FEATURE_ROLES[feature]], paths)
                if feature in self.features else None for feature in IMAGE_EMBEDDINGS}

    def text_features(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if "clip_text" not in self.features or not texts:
            return {}
        encoder = self.embedders[FEATURE_ROLES["clip_text"]]
        return dict(zip(texts, encoder.embed_texts(list(texts)), strict=True))

    def lpips_matrix(self, paths: Sequence[Path], prompts: Sequence[str], seeds: Sequence[int],
                     kinds: Sequence[str]) -> np.ndarray | None:
        """(N, N) LPIPS distances between images of the same prompt and kind with different seeds (NaN elsewhere),
        or None when no metric reads them."""
        if "lpips" not in self.features:
            return None
        matrix = np.full((len(paths), len(paths)), np.nan)
        for members in same_prompt_groups(prompts, seeds, kinds):
            block = distances_with_cache(self.embedders["lpips"], [paths[i] for i in members], self.distances)
            matrix[np.ix_(members, members)] = block
        return matrix


def same_prompt_groups(prompts: Sequence[str], seeds: Sequence[int], kinds: Sequence[str]) -> list[list[int]]:
    """Indices of the images of each (kind, prompt) with two or more seeds: the pairs diversity compares."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(kinds, prompts, strict=True)):
        groups.setdefault(key, []).append(i)
    return [members for members in groups.values() if len({seeds[i] for i in members}) > 1]


def _pair_key(a: str, b: str) -> str:
    # LPIPS is symmetric (squared differences), so a pair is keyed by its two content hashes in sorted order.
    first, second = sorted((a, b))
    return f"{first}-{second}"


def distances_with_cache(network: LpipsNetwork, paths: Sequence[Path], cache: EmbeddingCache) -> np.ndarray:
    """The network's distance matrix of the images; computed (all pairs of the group) unless every pair is cached."""
    images = [load_rgb(Path(p)) for p in paths]
    hashes = [content_hash(image) for image in images]
    keys = {(i, j): _pair_key(hashes[i], hashes[j]) for i in range(len(images)) for j in range(i + 1, len(images))}
    cached = {pair: cache.get(network.tag, key) for pair, key in keys.items()}
    matrix = np.zeros((len(images), len(images)))
    if all(value is not None and value.shape == (1,) for value in cached.values()):
        for (i, j), value in cached.items():
            matrix[i, j] = matrix[j, i] = float(value[0])
        return matrix
    # Rounded to what the cache keeps, so a score computed now equals the same score read back later.
    matrix = network.distance_matrix(images).astype(np.float32).astype(np.float64)
    for (i, j), key in keys.items():
        cache.put(network.tag, key, np.array([matrix[i, j]], dtype=np.float32))
    return matrix


def _metric_json(result: MetricResult) -> dict[str, Any]:
    out = asdict(result)
    for key in ("mean", "ci_low", "ci_high"):
        if isinstance(out[key], float) and math.isnan(out[key]):
            out[key] = None
    out.pop("name")
    return out


def _scores_json(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _header(kind: str, protocol: str, subject: SubjectSpec, run_key: str | None, step: int | None) -> dict[str, Any]:
    return scores_header(kind, protocol, subject.name, subject.class_noun, subject.identifier, run_key, step)


def score_samples(
    scorer: Scorer,
    samples: Sequence[dict[str, Any]],
    real_paths: Sequence[Path],
    subject: SubjectSpec,
) -> tuple[list[MetricResult], list[dict[str, Any]]]:
    """Metrics and per-image scores of generated images (sidecar records with `path`, `prompt`, `prompt_kind`)."""
    paths = [Path(s["path"]) for s in samples]
    prompts = tuple(s["prompt"] for s in samples)
    kinds = tuple(s["prompt_kind"] for s in samples)
    texts = sorted(set(clip_t_texts(prompts, kinds, subject.identifier)))
    real = scorer.image_features(real_paths)
    generated = scorer.image_features(paths)
    seeds = tuple(int(s["seed"]) for s in samples)
    images = ImageSet(
        prompts=prompts, seeds=seeds, kinds=kinds, identifier=subject.identifier,
        dino=generated["dino"], clip=generated["clip"], real_dino=real["dino"], real_clip=real["clip"],
        text_clip=scorer.text_features(texts), lpips=scorer.lpips_matrix(paths, prompts, seeds, kinds),
        image_ids=tuple(str(p) for p in paths),
    )
    return score(images, scorer.spec.metrics, scorer.spec.bootstrap_samples, seed=0)


def samples_record(
    scorer: Scorer,
    samples: Sequence[dict[str, Any]],
    real_paths: Sequence[Path],
    subject: SubjectSpec,
    *,
    kind: str,
    protocol: str,
    run_key: str | None,
    step: int,
    sampler: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The scores.json record of a snapshot or of the base model."""
    started = time.perf_counter()
    results, table = score_samples(scorer, samples, real_paths, subject)
    count(len(samples), "images")
    images = [{"path": s["path"], "prompt": s["prompt"], "prompt_kind": s["prompt_kind"], "seed": int(s["seed"])}
              for s in samples]
    return _record(scorer, _header(kind, protocol, subject, run_key, step), results, images, table, sampler,
                   {**seconds, "scoring": time.perf_counter() - started})


def real_images_record(scorer: Scorer, real_paths: Sequence[Path], subject: SubjectSpec, protocol: str
                       ) -> dict[str, Any]:
    """The "Real Images" reference row: leave-one-out similarity among the subject's photos."""
    real = scorer.image_features(real_paths)
    results, table = score_real_images(real["dino"], real["clip"], scorer.spec.metrics,
                                       scorer.spec.bootstrap_samples, seed=0, image_ids=[str(p) for p in real_paths])
    images = [{"path": str(p), "prompt": "", "prompt_kind": "real", "seed": None} for p in real_paths]
    return _record(scorer, _header("real_images", protocol, subject, None, None), results, images, table, None, {})


def _record(scorer: Scorer, header: dict[str, Any], results: Sequence[MetricResult], images: list[dict[str, Any]],
            table: Sequence[dict[str, Any]], sampler: dict[str, Any] | None, seconds: dict[str, float]
            ) -> dict[str, Any]:
    """A scores record: the header, the metrics, and each image with the per-image scores that apply to it."""
    for image, row in zip(images, table, strict=True):
        image["scores"] = {m: _scores_json(row[m]) for m in scorer.spec.metrics if _scores_json(row[m]) is not None}
    return scores_record(header, {r.name: _metric_json(r) for r in results}, scorer.backbones(), sampler, images,
                         seconds)


def write_record(path: Path, record: dict[str, Any]) -> Path:
    return write_scores(path, record)

