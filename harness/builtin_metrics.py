"""The built-in metrics: the DreamBooth paper's DINO, CLIP-I, CLIP-T, PRES and DIV, the DINO diversities, and CLIP-T
on the scales of Custom Diffusion and DreamBench++.

Each is a `Metric` (metrics.metric) under the name metrics.METRICS lists it by; the registry imports this module
the first time one is used. Every definition says what it pairs and how, so the results and the report can state
it next to the number:

- dino, clip_i: all pairs. Each subject-prompt image is compared with each real image of the subject; an image's
  score is its mean cosine to the real images. Their "Real Images" row is leave-one-out.
- clip_t, clip_t_clipscore, clip_t_x100: one to one. Each subject-prompt image is compared with its own prompt,
  identifier removed (metrics.strip_identifier). The scales: raw cosine; Custom Diffusion's CLIPScore
  (Hessel et al., 2021: 2.5 * max(cos, 0)); DreamBench++'s 100 * cos.
- pres: all pairs of class-prompt images and real images (DINO).
- div_*: pairs of images of the same prompt with different seeds. An image's score is its mean distance to the
  others; div_lpips is the paper's DIV.

What this module does not hold: the registry, the statistics (metrics.py) or the features (embedders.py,
perceptual.py). It imports numpy only.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from harness.metrics import ImageSet, MetricUnavailable, PerImageScores, metric, require, strip_identifier

ALL_PAIRS = "all pairs of a {kind}-prompt image and a real image of the subject; mean over the pairs"
ONE_TO_ONE = "one to one: each subject-prompt image with its own prompt"
SAME_PROMPT = "all pairs of {kind}-prompt images of one prompt with different seeds; mean over the pairs"
CLIPSCORE_WEIGHT = 2.5  # Hessel et al.'s w, which Custom Diffusion keeps
DREAMBENCH_PLUS_FACTOR = 100.0


# --------------------------------------------------------------------------------------------------------------
# Shared pieces


def _prompt_seed_groups(images: ImageSet) -> tuple[Hashable, ...]:
    return tuple(zip(images.kinds, images.prompts, images.seeds, strict=True))


def _mean_similarity_to_real(images: ImageSet, kind: str, generated: np.ndarray | None,
                             real: np.ndarray | None, backbone: str) -> PerImageScores:
    """For each image of `kind`: its mean cosine to all real images (mean over images = mean pairwise cosine)."""
    generated = require(generated, f"{backbone.upper()} embeddings of the generated images")
    real = require(real, f"{backbone.upper()} embeddings of the real images")
    if real.shape[0] == 0:
        raise MetricUnavailable("there are no real images")
    idx = images.indices(kind)
    if idx.size == 0:
        raise MetricUnavailable(f"there are no {kind}-prompt images")
    scores = np.full(len(images), np.nan)
    scores[idx] = (generated[idx].astype(np.float64) @ real.astype(np.float64).T).mean(axis=1)
    return PerImageScores(scores, _prompt_seed_groups(images))


def _diversity(images: ImageSet, kind: str, distances: np.ndarray, what: str) -> PerImageScores:
    """Per image: mean distance to the images of the same prompt with another seed. Prompts with one seed skip."""
    scores = np.full(len(images), np.nan)
    skipped = []
    by_prompt: dict[str, list[int]] = {}
    for i in images.indices(kind):
        by_prompt.setdefault(images.prompts[i], []).append(int(i))
    for prompt, members in by_prompt.items():
        if len({images.seeds[i] for i in members}) < 2:
            skipped.append(prompt)
            continue
        for i in members:
            others = [j for j in members if images.seeds[j] != images.seeds[i]]
            values = distances[i, others]
            if np.any(np.isnan(values)):
                raise ValueError(f"{what} distances are missing for prompt {prompt!r} (image {i}); supply every "
                                 "pair of images of the same prompt with different seeds.")
            scores[i] = float(np.mean(values))
    if not by_prompt:
        raise MetricUnavailable(f"there are no {kind}-prompt images")
    if len(skipped) == len(by_prompt):
        raise MetricUnavailable(f"no {kind} prompt has images of two or more seeds; diversity needs at least two")
    note = f"{len(skipped)} prompt(s) with a single seed skipped" if skipped else ""
    return PerImageScores(scores, tuple(zip(images.kinds, images.prompts, strict=True)), note)


def _one_minus_dino_cosine(images: ImageSet) -> np.ndarray:
    dino = require(images.dino, "DINO embeddings of the generated images").astype(np.float64)
    return 1.0 - dino @ dino.T


def _lpips_distances(images: ImageSet) -> np.ndarray:
    if images.lpips is None:
        raise MetricUnavailable("LPIPS distances were not supplied (the scorer computes them when an LPIPS metric "
                                "is in eval.metrics)")
    return np.asarray(images.lpips, dtype=np.float64)


def _text_cosines(images: ImageSet) -> PerImageScores:
    """Per subject-prompt image: the cosine of its CLIP embedding with its prompt's, identifier removed."""
    clip = require(images.clip, "CLIP embeddings of the generated images")
    if not images.text_clip:
        raise MetricUnavailable("no CLIP text embeddings of the prompts supplied")
    idx = images.indices("subject")
    if idx.size == 0:
        raise MetricUnavailable("there are no subject-prompt images")
    scores = np.full(len(images), np.nan)
    for i in idx:
        text = strip_identifier(images.prompts[i], images.identifier)
        if text not in images.text_clip:
            raise ValueError(f"text_clip has no embedding for {text!r} (prompt {images.prompts[i]!r} without "
                             f"{images.identifier!r}); embed every text of clip_t_texts(...).")
        scores[i] = float(clip[i].astype(np.float64) @ np.asarray(images.text_clip[text], dtype=np.float64))
    return PerImageScores(scores, _prompt_seed_groups(images))


# --------------------------------------------------------------------------------------------------------------
# Subject fidelity and drift


@metric("dino", higher_is_better=True, backbone="dino", features=("dino",), label="DINO", scale="raw cosine",
        real_images="dino", clips_negative=False, pairing=ALL_PAIRS.format(kind="subject"),
        description="mean DINO cosine between subject-prompt images and the real subject images")
def DINO(images: ImageSet) -> PerImageScores:
    return _mean_similarity_to_real(images, "subject", images.dino, images.real_dino, "dino")


@metric("clip_i", higher_is_better=True, backbone="clip", features=("clip_image",), label="CLIP-I",
        scale="raw cosine", real_images="clip_image", clips_negative=False, pairing=ALL_PAIRS.format(kind="subject"),
        description="mean CLIP image cosine between subject-prompt images and the real subject images")
def CLIP_I(images: ImageSet) -> PerImageScores:
    return _mean_similarity_to_real(images, "subject", images.clip, images.real_clip, "clip")


@metric("pres", higher_is_better=False, backbone="dino", features=("dino",), label="PRES", scale="raw cosine",
        clips_negative=False, pairing=ALL_PAIRS.format(kind="class"),
        description="mean DINO cosine between class-prompt images and the real subject images (language drift)")
def PRES(images: ImageSet) -> PerImageScores:
    return _mean_similarity_to_real(images, "class", images.dino, images.real_dino, "dino")


# --------------------------------------------------------------------------------------------------------------
# Prompt fidelity, on three scales


@metric("clip_t", higher_is_better=True, backbone="clip", features=("clip_image", "clip_text"), label="CLIP-T",
        scale="raw cosine (not x100, not x2.5)", clips_negative=False, strips_identifier=True, pairing=ONE_TO_ONE,
        description="CLIP cosine between each subject-prompt image and its prompt without the identifier")
def CLIP_T(images: ImageSet) -> PerImageScores:
    return _text_cosines(images)


@metric("clip_t_clipscore", higher_is_better=True, backbone="clip", features=("clip_image", "clip_text"),
        label="CLIPScore (Custom Diffusion)", scale="2.5 x max(cosine, 0), in [0, 2.5]", clips_negative=True,
        strips_identifier=True, pairing=ONE_TO_ONE,
        description="Custom Diffusion's text alignment: CLIPScore as Hessel et al. define it, 2.5 * max(cos, 0) "
                    "between each subject-prompt image and its prompt without the identifier")
def CLIP_T_CLIPSCORE(images: ImageSet) -> PerImageScores:
    cosines = _text_cosines(images)
    return PerImageScores(CLIPSCORE_WEIGHT * np.maximum(cosines.scores, 0.0), cosines.groups, cosines.note)


@metric("clip_t_x100", higher_is_better=True, backbone="clip", features=("clip_image", "clip_text"),
        label="CLIP-T x100 (DreamBench++)", scale="100 x cosine, in [-100, 100]", clips_negative=False,
        strips_identifier=True, pairing=ONE_TO_ONE,
        description="CLIP-T on the scale DreamBench++ quotes: 100 * cos between each subject-prompt image and its "
                    "prompt without the identifier")
def CLIP_T_X100(images: ImageSet) -> PerImageScores:
    cosines = _text_cosines(images)
    return PerImageScores(DREAMBENCH_PLUS_FACTOR * cosines.scores, cosines.groups, cosines.note)


# --------------------------------------------------------------------------------------------------------------
# Diversity


@metric("div_subject", higher_is_better=True, backbone="dino", features=("dino",),
        label="DIV-DINO (subject prompts)", scale="1 - raw cosine", clips_negative=False,
        pairing=SAME_PROMPT.format(kind="subject"),
        description="mean (1 - DINO cosine) between subject-prompt images of the same prompt, different seeds")
def DIV_SUBJECT(images: ImageSet) -> PerImageScores:
    return _diversity(images, "subject", _one_minus_dino_cosine(images), "DINO")


@metric("div_class", higher_is_better=True, backbone="dino", features=("dino",), label="DIV-DINO (class prompts)",
        scale="1 - raw cosine", clips_negative=False, pairing=SAME_PROMPT.format(kind="class"),
        description="mean (1 - DINO cosine) between class-prompt images of the same prompt, different seeds")
def DIV_CLASS(images: ImageSet) -> PerImageScores:
    return _diversity(images, "class", _one_minus_dino_cosine(images), "DINO")


@metric("div_lpips", higher_is_better=True, backbone="lpips", features=("lpips",), label="DIV (subject prompts)",
        scale="LPIPS distance", pairing=SAME_PROMPT.format(kind="subject"),
        description="the paper's DIV: mean LPIPS distance between subject-prompt images of the same prompt, "
                    "different seeds")
def DIV_LPIPS(images: ImageSet) -> PerImageScores:
    return _diversity(images, "subject", _lpips_distances(images), "LPIPS")


@metric("div_lpips_class", higher_is_better=True, backbone="lpips", features=("lpips",),
        label="DIV (class prompts)", scale="LPIPS distance", pairing=SAME_PROMPT.format(kind="class"),
        description="mean LPIPS distance between class-prompt images of the same prompt, different seeds (the "
                    "prior's diversity, which the paper's Table 3 sees fall without prior preservation)")
def DIV_LPIPS_CLASS(images: ImageSet) -> PerImageScores:
    return _diversity(images, "class", _lpips_distances(images), "LPIPS")
