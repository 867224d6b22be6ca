"""Scoring: embeddings of generated and real images -> per-image scores -> per-snapshot metrics, as `scores.json`.

Three kinds of scored unit share one record format (see results.py): a run's snapshot, the base model (step 0,
the same prompts and seeds) and the real images (leave-one-out real-vs-real, the paper's "Real Images" row).
Embeddings are cached per (image content, backbone) by embedders.py, so re-scoring computes nothing twice.

What this module does not hold: image generation (sampling.py) or the metric definitions (metrics.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import EvalSpec, SubjectSpec
from harness.data import load_rgb
from harness.embedders import ClipEmbedder, Embedder, EmbeddingCache, embed_with_cache
from harness.metrics import ImageSet, MetricResult, clip_t_texts, score, score_real_images
from harness.store import atomic_write_json

SCORES_SCHEMA = 1


def record_name(spec: EvalSpec) -> str:
    """File name of a scores record: other backbones or metrics give another file, never a stale one."""
    identity = json.dumps([spec.backbones, list(spec.metrics), spec.bootstrap_samples, SCORES_SCHEMA])
    return f"scores-{hashlib.sha256(identity.encode()).hexdigest()[:8]}.json"


class Scorer:
    """The evaluation backbones of a protocol with their embedding cache, loaded once and shared by every unit."""

    def __init__(self, embedders: dict[str, Embedder], cache: EmbeddingCache, spec: EvalSpec):
        self.clip: ClipEmbedder = embedders["clip"]  # type: ignore[assignment]
        self.dino: Embedder = embedders["dino"]
        self.cache = cache
        self.spec = spec

    def backbones(self) -> dict[str, Any]:
        return {"clip": self.clip.describe(), "dino": self.dino.describe()}

    @property
    def record_name(self) -> str:
        return record_name(self.spec)

    def embed(self, embedder: Embedder, paths: Sequence[Path]) -> np.ndarray:
        return embed_with_cache(embedder, [load_rgb(Path(p)) for p in paths], self.cache)

    def real_embeddings(self, real_paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        return self.embed(self.dino, real_paths), self.embed(self.clip, real_paths)


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
    return {"schema": SCORES_SCHEMA, "kind": kind, "protocol": protocol, "subject": subject.name,
            "class_noun": subject.class_noun, "identifier": subject.identifier, "run_key": run_key, "step": step}


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
    text_vectors = scorer.clip.embed_texts(texts) if texts else np.zeros((0, scorer.clip.dim), np.float32)
    real_dino, real_clip = scorer.real_embeddings(real_paths)
    images = ImageSet(
        prompts=prompts, seeds=tuple(int(s["seed"]) for s in samples), kinds=kinds, identifier=subject.identifier,
        dino=scorer.embed(scorer.dino, paths), clip=scorer.embed(scorer.clip, paths),
        real_dino=real_dino, real_clip=real_clip, text_clip=dict(zip(texts, text_vectors, strict=True)),
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
    images = [{"path": s["path"], "prompt": s["prompt"], "prompt_kind": s["prompt_kind"], "seed": int(s["seed"])}
              for s in samples]
    return _record(scorer, _header(kind, protocol, subject, run_key, step), results, images, table, sampler,
                   {**seconds, "scoring": time.perf_counter() - started})


def real_images_record(scorer: Scorer, real_paths: Sequence[Path], subject: SubjectSpec, protocol: str
                       ) -> dict[str, Any]:
    """The "Real Images" reference row: leave-one-out similarity among the subject's photos."""
    real_dino, real_clip = scorer.real_embeddings(real_paths)
    results, table = score_real_images(real_dino, real_clip, scorer.spec.metrics, scorer.spec.bootstrap_samples,
                                       seed=0, image_ids=[str(p) for p in real_paths])
    images = [{"path": str(p), "prompt": "", "prompt_kind": "real", "seed": None} for p in real_paths]
    return _record(scorer, _header("real_images", protocol, subject, None, None), results, images, table, None, {})


def _record(scorer: Scorer, header: dict[str, Any], results: Sequence[MetricResult], images: list[dict[str, Any]],
            table: Sequence[dict[str, Any]], sampler: dict[str, Any] | None, seconds: dict[str, float]
            ) -> dict[str, Any]:
    """A scores record: the header, the metrics, and each image with the per-image scores that apply to it."""
    for image, row in zip(images, table, strict=True):
        image["scores"] = {m: _scores_json(row[m]) for m in scorer.spec.metrics if _scores_json(row[m]) is not None}
    return {
        **header,
        "metrics": {r.name: _metric_json(r) for r in results},
        "backbones": scorer.backbones(),
        "sampler": sampler,
        "images": images,
        "seconds": seconds,
    }


def write_record(path: Path, record: dict[str, Any]) -> Path:
    atomic_write_json(path, record)
    return path

