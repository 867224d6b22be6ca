"""Metric registry and metric math on embeddings: per-image scores, means and bootstrap intervals.

Every metric is a registered `Metric`: a function from an `ImageSet` (the features of one snapshot's generated
images, of the real subject images and of the prompts' texts) to one score per image, and the facts that say how
its number is computed (scale, pairing, whether negative cosines are clipped, whether the identifier is removed
from the prompt, the backbone role it reads). The metric is the mean of those scores, with a 95% percentile
bootstrap interval over (prompt, seed) groups. The built-in metrics are defined in builtin_metrics.py and listed
here lazily; code outside the package adds its own with `register`.

What this module does not hold: the built-in metric definitions (builtin_metrics.py), computing embeddings or
LPIPS distances (embedders.py, perceptual.py), reading images or writing files. It imports numpy only, so the
protocol loader can validate metric names without loading torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from harness.registry import Registry

Kind = Literal["subject", "class"]
KINDS: tuple[str, ...] = ("subject", "class")
NORM_TOLERANCE = 1e-3
DEFAULT_BOOTSTRAP_SAMPLES = 1000


# --------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, eq=False)
class ImageSet:
    """The generated images of one snapshot, as embeddings, with the real images and the prompt texts.

    Row i of `dino`, `clip` (and of `lpips`) belongs to the image with prompts[i], seeds[i], kinds[i]. Embedding rows
    must be L2-normalised. `text_clip` maps the prompt text with the identifier removed (see `clip_t_texts`) to its
    CLIP text embedding. `lpips` is an optional (N, N) matrix of LPIPS distances, NaN where not computed.
    Missing inputs make the metrics that need them unavailable (with a note), not wrong.
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    kinds: tuple[str, ...]
    identifier: str
    dino: np.ndarray | None = None
    clip: np.ndarray | None = None
    real_dino: np.ndarray | None = None
    real_clip: np.ndarray | None = None
    text_clip: Mapping[str, np.ndarray] = field(default_factory=dict)
    lpips: np.ndarray | None = None
    image_ids: tuple[str, ...] | None = None  # e.g. file names, copied into the per-image table

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.seeds) != n or len(self.kinds) != n:
            raise ValueError(f"ImageSet: prompts, seeds and kinds must have one entry per image; got {n}, "
                             f"{len(self.seeds)} and {len(self.kinds)}.")
        bad = sorted({k for k in self.kinds if k not in KINDS})
        if bad:
            raise ValueError(f"ImageSet: unknown image kind(s) {bad}; each kind must be one of {KINDS}.")
        if self.image_ids is not None and len(self.image_ids) != n:
            raise ValueError(f"ImageSet: image_ids has {len(self.image_ids)} entries for {n} images.")
        for name in ("dino", "clip"):
            _check_embeddings(name, getattr(self, name), rows=n)
        for name in ("real_dino", "real_clip"):
            _check_embeddings(name, getattr(self, name), rows=None)
        for text, vector in self.text_clip.items():
            if np.ndim(vector) != 1:
                raise ValueError(f"ImageSet: text_clip[{text!r}] must be one embedding vector, got {np.shape(vector)}.")
            _check_embeddings(f"text_clip[{text!r}]", np.asarray(vector)[None, :], rows=1)
        if self.lpips is not None and np.shape(self.lpips) != (n, n):
            raise ValueError(f"ImageSet: lpips must be an ({n}, {n}) matrix of distances, got {np.shape(self.lpips)}.")

    def __len__(self) -> int:
        return len(self.prompts)

    def indices(self, kind: str) -> np.ndarray:
        return np.array([i for i, k in enumerate(self.kinds) if k == kind], dtype=int)


def _check_embeddings(name: str, array: np.ndarray | None, rows: int | None) -> None:
    if array is None:
        return
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise ValueError(f"ImageSet: {name} must be a 2-D numpy array (one row per image), got {np.shape(array)}.")
    if rows is not None and array.shape[0] != rows:
        raise ValueError(f"ImageSet: {name} has {array.shape[0]} rows for {rows} images.")
    if array.size and not np.all(np.isfinite(array)):
        raise ValueError(f"ImageSet: {name} contains NaN or infinite values.")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    if norms.size and np.max(np.abs(norms - 1.0)) > NORM_TOLERANCE:
        raise ValueError(f"ImageSet: {name} rows must be L2-normalised (norms range {norms.min():.4f}.."
                         f"{norms.max():.4f}); divide each row by its norm.")


# A word is rejoined to the text after the identifier with one space, except before closing punctuation.
_CLOSING = tuple(".,;:!?)]}'\"")
_OPENING = tuple("([{")


def strip_identifier(prompt: str, identifier: str) -> str:
    """`prompt` without the identifier: 'a sks dog in the snow' -> 'a dog in the snow', 'a <new1> cat' -> 'a cat'.

    A word-like identifier ('sks') is removed only where it stands as a word of its own ('a sksdog' and 'a sks-dog'
    stay), which is where a tokenizer splits it off. An identifier with a non-word edge, such as Custom Diffusion's
    modifier token '<new1>', is an added token that the tokenizer splits off wherever it occurs, so it is removed
    wherever it occurs ('a <new1>cat' -> 'a cat'). Case-sensitive. The words around it are rejoined with one space
    (none before punctuation), so the text reads as the plain class prompt.
    """
    if not identifier.strip():
        raise ValueError("strip_identifier: the identifier is empty; give the subject's identifier, e.g. 'sks'.")
    pattern = _identifier_pattern(identifier.strip())
    text = prompt
    while match := pattern.search(text):
        left, right = text[:match.start()].rstrip(), text[match.end():].lstrip()
        glue = " " if left and right and not right.startswith(_CLOSING) and not left.endswith(_OPENING) else ""
        text = left + glue + right
    return text.strip()


def _identifier_pattern(identifier: str) -> re.Pattern[str]:
    """The identifier, bounded as a word on each edge that is a word character."""
    before = r"(?<![\w-])" if re.match(r"\w", identifier[0]) else ""
    after = r"(?![\w-])" if re.match(r"\w", identifier[-1]) else ""
    return re.compile(before + re.escape(identifier) + after)


def clip_t_texts(prompts: Sequence[str], kinds: Sequence[str], identifier: str) -> list[str]:
    """The distinct texts whose CLIP text embeddings `clip_t` needs (subject prompts without the identifier)."""
    texts = [strip_identifier(p, identifier) for p, k in zip(prompts, kinds, strict=True) if k == "subject"]
    return list(dict.fromkeys(texts))


# --------------------------------------------------------------------------------------------------------------
# Registry


class MetricUnavailable(Exception):
    """A metric cannot be computed for this input; the message says why and ends up in MetricResult.note."""


@dataclass(frozen=True)
class PerImageScores:
    """One score per image (NaN where the metric does not apply) and the bootstrap group of every image."""

    scores: np.ndarray
    groups: tuple[Hashable, ...]
    note: str = ""


# What a metric can read, and the backbone role that computes it (see backbones.BACKBONES).
FEATURE_ROLES: dict[str, str] = {"dino": "dino", "clip_image": "clip", "clip_text": "clip", "lpips": "lpips"}
NEGATIVE_COSINES = {None: "not a cosine", True: "clipped to 0: max(cos, 0)", False: "kept"}
IDENTIFIER_IN_PROMPT = {None: "no prompt text", True: "removed before encoding", False: "kept"}
REAL_IMAGES_ROW = "leave-one-out: each real image against the other real images of its subject"


@dataclass(frozen=True)
class Metric:
    """A metric: its per-image score function and every fact the results and the report show."""

    name: str
    fn: Callable[[ImageSet], PerImageScores]
    higher_is_better: bool
    backbone: str  # the backbone role whose features it reads ("dino", "clip", "lpips", ...)
    description: str
    label: str  # as the report names it ("CLIP-T")
    scale: str  # what the number is ("raw cosine", "LPIPS distance")
    features: tuple[str, ...]  # keys of FEATURE_ROLES the metric reads; the scorer computes only these
    pairing: str  # which images each score compares, and how the scores are averaged
    real_images: str | None = None  # feature scored leave-one-out for the "Real Images" row; None: not defined
    clips_negative: bool | None = None  # negative cosines set to 0 before averaging; None: not a cosine
    strips_identifier: bool | None = None  # the identifier removed from the prompt it encodes; None: reads no text

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(FEATURE_ROLES[f] for f in self.features))

    def recipe(self) -> dict[str, Any]:
        """How the number is computed, in words: the results' metadata and the report's definitions show this.

        The backbone's weights and preprocessing are its own facts (the embedders' `describe()`).
        """
        return {
            "label": self.label,
            "description": self.description,
            "higher_is_better": self.higher_is_better,
            "scale": self.scale,
            "backbone_role": self.backbone,
            "features": list(self.features),
            "pairing": self.pairing,
            "negative_cosines": NEGATIVE_COSINES[self.clips_negative],
            "identifier": IDENTIFIER_IN_PROMPT[self.strips_identifier],
            "real_images_row": REAL_IMAGES_ROW if self.real_images else "not defined (generated images only)",
        }


BUILTIN_METRICS = ("dino", "clip_i", "clip_t", "pres", "div_subject", "div_class", "div_lpips", "div_lpips_class",
                   "clip_t_clipscore", "clip_t_x100")
METRICS: Registry[Metric] = Registry("metric", lazy={
    name: f"harness.builtin_metrics:{name.upper()}" for name in BUILTIN_METRICS})


def metric(name: str, *, higher_is_better: bool, backbone: str, description: str, label: str, scale: str,
           features: tuple[str, ...], pairing: str, real_images: str | None = None,
           clips_negative: bool | None = None, strips_identifier: bool | None = None,
           ) -> Callable[[Callable[[ImageSet], PerImageScores]], Metric]:
    """A decorator that makes a `Metric` of a per-image score function (builtin_metrics.py defines its metrics so)."""
    unknown = [f for f in features if f not in FEATURE_ROLES]
    if unknown:
        raise ValueError(f"metric {name!r}: unknown feature(s) {unknown}; known features: {', '.join(FEATURE_ROLES)}.")
    if not pairing.strip():
        raise ValueError(f"metric {name!r}: say which images each score compares (pairing=...).")

    def make(fn: Callable[[ImageSet], PerImageScores]) -> Metric:
        return Metric(name=name, fn=fn, higher_is_better=higher_is_better, backbone=backbone,
                      description=description, label=label, scale=scale, features=features, pairing=pairing,
                      real_images=real_images, clips_negative=clips_negative, strips_identifier=strips_identifier)

    return make


def register(name: str, **facts: Any) -> Callable[[Callable[[ImageSet], PerImageScores]], Callable]:
    """Adds the decorated per-image score function to METRICS under `name`; `facts` are those of `metric`."""
    make = metric(name, **facts)

    def add(fn: Callable[[ImageSet], PerImageScores]) -> Callable[[ImageSet], PerImageScores]:
        METRICS.register(name, make(fn))
        return fn

    return add


def metric_names() -> list[str]:
    """Every registered metric, in registration order: the metric columns of the CSVs."""
    return METRICS.names()


def roles_for(metric_names: Sequence[str]) -> tuple[str, ...]:
    """The backbone roles whose features the named metrics read, clip and dino first."""
    roles = {r for name in metric_names if name in METRICS for r in METRICS.get(name).roles}
    return tuple(sorted(roles, key=lambda r: (r not in ("clip", "dino"), r)))


def features_for(metric_names: Sequence[str]) -> frozenset[str]:
    """The features (keys of FEATURE_ROLES) the named metrics read."""
    return frozenset(f for name in metric_names if name in METRICS for f in METRICS.get(name).features)


def require(array: np.ndarray | None, what: str) -> np.ndarray:
    """`array`, or MetricUnavailable saying that `what` was not supplied."""
    if array is None:
        raise MetricUnavailable(f"no {what} supplied")
    return array


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class MetricResult:
    """One metric of one image set: mean of the per-image scores, bootstrap 95% interval, counts, and a note.

    An unavailable metric has NaN mean and bounds, n = 0 and a note saying why.
    """

    name: str
    mean: float
    ci_low: float
    ci_high: float
    n: int
    n_groups: int
    backbone: str
    higher_is_better: bool
    note: str = ""

    @property
    def available(self) -> bool:
        return not math.isnan(self.mean)


def bootstrap_ci(scores: Sequence[float] | np.ndarray, groups: Sequence[Hashable],
                 n_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean score, resampling whole groups with replacement.

    Each bootstrap sample draws as many groups as there are, and its statistic is the mean of the per-image scores
    of the drawn groups (a group drawn twice counts twice). Deterministic for a given seed.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D array of scores.")
    if len(groups) != values.size:
        raise ValueError(f"bootstrap_ci: {len(groups)} groups for {values.size} scores; give one group per score.")
    if n_samples < 1:
        raise ValueError(f"bootstrap_ci: n_samples must be at least 1, got {n_samples}.")
    # Groups are numbered by first appearance (not by hash) so the draws are the same in every process.
    numbering: dict[Hashable, int] = {}
    group_of = np.array([numbering.setdefault(g, len(numbering)) for g in groups])
    group_sums = np.bincount(group_of, weights=values)
    group_sizes = np.bincount(group_of).astype(np.float64)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, group_sums.size, size=(n_samples, group_sums.size))
    statistics = group_sums[drawn].sum(axis=1) / group_sizes[drawn].sum(axis=1)
    low, high = np.percentile(statistics, [2.5, 97.5])
    return float(low), float(high)


def intervals_overlap(a: MetricResult, b: MetricResult) -> bool:
    """True when the two bootstrap intervals overlap, or when either is unknown, so the two cannot be ranked."""
    if a.name != b.name or a.backbone != b.backbone:
        raise ValueError(f"cannot compare {a.name} ({a.backbone}) with {b.name} ({b.backbone}); compare one metric "
                         "on one backbone.")
    bounds = (a.ci_low, a.ci_high, b.ci_low, b.ci_high)
    if any(math.isnan(x) for x in bounds):
        return True
    return a.ci_low <= b.ci_high and b.ci_low <= a.ci_high


def _unavailable(name: str, note: str) -> MetricResult:
    metric = METRICS.get(name) if name in METRICS else None
    return MetricResult(
        name=name, mean=math.nan, ci_low=math.nan, ci_high=math.nan, n=0, n_groups=0,
        backbone=metric.backbone if metric else "", higher_is_better=metric.higher_is_better if metric else True,
        note=note,
    )


def _summarise(metric: Metric, per_image: PerImageScores, bootstrap_samples: int, seed: int) -> MetricResult:
    mask = ~np.isnan(per_image.scores)
    if not mask.any():
        return _unavailable(metric.name, "no image to score")
    values = per_image.scores[mask]
    groups = [g for g, keep in zip(per_image.groups, mask, strict=True) if keep]
    low, high = bootstrap_ci(values, groups, bootstrap_samples, seed)
    return MetricResult(
        name=metric.name, mean=float(values.mean()), ci_low=low, ci_high=high, n=int(mask.sum()),
        n_groups=len(set(groups)), backbone=metric.backbone, higher_is_better=metric.higher_is_better,
        note=per_image.note,
    )


def _unknown_note(name: str) -> str:
    return f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}"


def score(images: ImageSet, metric_names: Sequence[str], bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
          seed: int = 0) -> tuple[list[MetricResult], list[dict[str, Any]]]:
    """Scores one snapshot's images: one MetricResult per requested name and a per-image table.

    The table has one dict per generated image (index, image id, prompt, seed, kind, and one column per requested
    metric, NaN where the metric does not apply to that image). Unknown or unavailable metrics come back with NaN
    values and a note instead of raising.
    """
    table: list[dict[str, Any]] = [
        {"index": i, "image": images.image_ids[i] if images.image_ids else "", "prompt": images.prompts[i],
         "seed": images.seeds[i], "kind": images.kinds[i]}
        for i in range(len(images))
    ]
    results = []
    for name in metric_names:
        for row in table:
            row[name] = math.nan
        if name not in METRICS:
            results.append(_unavailable(name, _unknown_note(name)))
            continue
        metric = METRICS.get(name)
        try:
            per_image = metric.fn(images)
        except MetricUnavailable as why:
            results.append(_unavailable(name, str(why)))
            continue
        for row, value in zip(table, per_image.scores, strict=True):
            row[name] = float(value)
        results.append(_summarise(metric, per_image, bootstrap_samples, seed))
    return results, table


def leave_one_out_similarity(real: np.ndarray) -> np.ndarray:
    """Per real image: its mean cosine to the OTHER real images (never to itself)."""
    real = real.astype(np.float64)
    count = real.shape[0]
    if count < 2:
        raise MetricUnavailable(f"leave-one-out needs at least 2 real images, got {count}")
    similarity = real @ real.T
    return (similarity.sum(axis=1) - np.diag(similarity)) / (count - 1)


def score_real_images(real_dino: np.ndarray | None, real_clip: np.ndarray | None, metric_names: Sequence[str],
                      bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0,
                      image_ids: Sequence[str] | None = None) -> tuple[list[MetricResult], list[dict[str, Any]]]:
    """The "Real Images" reference row: dino and clip_i of each real image against the other real images.

    The bootstrap group is the real image. Metrics not defined for real images come back unavailable with a note.
    """
    arrays = {"dino": real_dino, "clip_image": real_clip}
    _check_embeddings("real_dino", real_dino, rows=None)
    _check_embeddings("real_clip", real_clip, rows=None)
    counts = {a.shape[0] for a in arrays.values() if a is not None}
    if len(counts) > 1:
        raise ValueError(f"score_real_images: real_dino and real_clip have different numbers of rows {sorted(counts)}; "
                         "embed the same real images with both backbones.")
    count = counts.pop() if counts else 0
    if image_ids is not None and len(image_ids) != count:
        raise ValueError(f"score_real_images: {len(image_ids)} image ids for {count} real images.")
    table: list[dict[str, Any]] = [
        {"index": i, "image": image_ids[i] if image_ids else "", "prompt": "", "seed": None, "kind": "real"}
        for i in range(count)
    ]
    results = []
    for name in metric_names:
        for row in table:
            row[name] = math.nan
        if name not in METRICS:
            results.append(_unavailable(name, _unknown_note(name)))
            continue
        metric = METRICS.get(name)
        if metric.real_images is None:
            results.append(_unavailable(name, "defined for generated images only"))
            continue
        array = arrays.get(metric.real_images)
        try:
            per_image = leave_one_out_similarity(require(array, f"{metric.backbone.upper()} embeddings "
                                                                 "of the real images"))
        except MetricUnavailable as why:
            results.append(_unavailable(name, str(why)))
            continue
        for row, value in zip(table, per_image, strict=True):
            row[name] = float(value)
        scores = PerImageScores(per_image, tuple(range(per_image.size)))
        results.append(_summarise(metric, scores, bootstrap_samples, seed))
    return results, table
