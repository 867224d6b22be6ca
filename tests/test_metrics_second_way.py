"""Every built-in metric computed a second way, from the papers' definitions written out here with plain loops over
hand-made embeddings and distances, and compared with the harness to 1e-6: all-pairs means (DINO, CLIP-I, PRES),
leave-one-out for the real-images row, CLIP-T with the identifier removed on three scales (raw, Custom Diffusion's
CLIPScore, DreamBench++'s x100), and the diversities over the right pairs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from harness.metrics import METRICS, ImageSet, score, score_real_images, strip_identifier

TOLERANCE = 1e-6
DIM = 6
SEEDS = (0, 1, 2)
SUBJECT_PROMPTS = ("a <new1> cat in the snow", "a <new1> cat on the beach")
CLASS_PROMPTS = ("a cat", "a cat in the jungle")
# The subject prompts as CLIP-T must encode them, written by hand: the modifier token taken out.
WITHOUT_IDENTIFIER = {"a <new1> cat in the snow": "a cat in the snow",
                      "a <new1> cat on the beach": "a cat on the beach"}


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.normal(size=(count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(sum(x * y for x, y in zip(a, b, strict=True)) / (math.sqrt(sum(a * a)) * math.sqrt(sum(b * b))))


@pytest.fixture(scope="module")
def study() -> dict:
    """A snapshot of 2 subject and 2 class prompts x 3 seeds, 4 real images, and LPIPS distances given only
    between images of one prompt (NaN elsewhere, so a metric that read another pair would fail)."""
    rng = np.random.default_rng(7)
    images = [(kind, prompt, seed) for kind, prompts in (("subject", SUBJECT_PROMPTS), ("class", CLASS_PROMPTS))
              for prompt in prompts for seed in SEEDS]
    count = len(images)
    lpips = np.full((count, count), np.nan)
    for i, j in itertools.combinations(range(count), 2):
        if images[i][:2] == images[j][:2]:
            lpips[i, j] = lpips[j, i] = rng.uniform(0.1, 0.9)
    np.fill_diagonal(lpips, 0.0)
    clip = unit_rows(rng, count)
    texts = dict(zip(WITHOUT_IDENTIFIER.values(), unit_rows(rng, 2), strict=True))
    # The first subject image points away from its prompt, so CLIPScore's clipping at 0 matters.
    away = -clip[0] * 0.8 + unit_rows(rng, 1)[0] * 0.2
    texts["a cat in the snow"] = (away / np.linalg.norm(away)).astype(np.float32)
    return {"images": images, "dino": unit_rows(rng, count), "clip": clip, "real_dino": unit_rows(rng, 4),
            "real_clip": unit_rows(rng, 4), "text": texts, "lpips": lpips}


def image_set(study: dict) -> ImageSet:
    kinds, prompts, seeds = zip(*study["images"], strict=True)
    return ImageSet(prompts=prompts, seeds=seeds, kinds=kinds, identifier="<new1>", dino=study["dino"],
                    clip=study["clip"], real_dino=study["real_dino"], real_clip=study["real_clip"],
                    text_clip=study["text"], lpips=study["lpips"])


def harness_means(study: dict, names: list[str]) -> dict[str, float]:
    results, _ = score(image_set(study), names, bootstrap_samples=200)
    for r in results:
        assert r.available and r.ci_low <= r.mean <= r.ci_high, (r.name, r.note)
    return {r.name: r.mean for r in results}


def indices(study: dict, kind: str) -> list[int]:
    return [i for i, (k, _, _) in enumerate(study["images"]) if k == kind]


def all_pairs_mean(generated: np.ndarray, real: np.ndarray) -> float:
    """The DreamBooth paper's DINO / CLIP-I / PRES: the average cosine over all (generated, real) pairs."""
    values = [cos(g, r) for g in generated for r in real]
    return sum(values) / len(values)


def same_prompt_pairs(study: dict, kind: str) -> list[tuple[int, int]]:
    """Unordered pairs of images of one prompt with different seeds."""
    members = indices(study, kind)
    return [(i, j) for i, j in itertools.combinations(members, 2)
            if study["images"][i][1] == study["images"][j][1] and study["images"][i][2] != study["images"][j][2]]


def test_dino_clip_i_and_pres_are_the_mean_over_all_generated_x_real_pairs(study):
    subject, klass = indices(study, "subject"), indices(study, "class")
    got = harness_means(study, ["dino", "clip_i", "pres"])
    assert abs(got["dino"] - all_pairs_mean(study["dino"][subject], study["real_dino"])) < TOLERANCE
    assert abs(got["clip_i"] - all_pairs_mean(study["clip"][subject], study["real_clip"])) < TOLERANCE
    assert abs(got["pres"] - all_pairs_mean(study["dino"][klass], study["real_dino"])) < TOLERANCE


def test_real_images_row_is_leave_one_out(study):
    results, _ = score_real_images(study["real_dino"], study["real_clip"], ["dino", "clip_i"], bootstrap_samples=200)
    for result, real in zip(results, (study["real_dino"], study["real_clip"]), strict=True):
        others = [cos(real[i], real[j]) for i in range(len(real)) for j in range(len(real)) if i != j]
        assert abs(result.mean - sum(others) / len(others)) < TOLERANCE
        with_self = [cos(real[i], real[j]) for i in range(len(real)) for j in range(len(real))]
        assert abs(result.mean - sum(with_self) / len(with_self)) > 1e-3  # self-pairs would show


def test_clip_t_on_three_scales_encodes_each_prompt_without_its_modifier_token(study):
    subject = indices(study, "subject")
    cosines = [cos(study["clip"][i], study["text"][WITHOUT_IDENTIFIER[study["images"][i][1]]]) for i in subject]
    assert min(cosines) < 0  # the clipping below is exercised
    got = harness_means(study, ["clip_t", "clip_t_clipscore", "clip_t_x100"])
    assert abs(got["clip_t"] - sum(cosines) / len(cosines)) < TOLERANCE
    clipscore = sum(2.5 * max(c, 0.0) for c in cosines) / len(cosines)  # Hessel et al.: w * max(cos, 0), w = 2.5
    assert abs(got["clip_t_clipscore"] - clipscore) < TOLERANCE
    assert abs(got["clip_t_x100"] - 100 * sum(cosines) / len(cosines)) < 100 * TOLERANCE
    assert got["clip_t_clipscore"] > 2.5 * got["clip_t"]  # without the clipping they would be equal


def test_diversities_average_only_pairs_of_one_prompt_with_different_seeds(study):
    got = harness_means(study, ["div_lpips", "div_lpips_class", "div_subject", "div_class"])
    for kind, lpips_name, dino_name in (("subject", "div_lpips", "div_subject"), ("class", "div_lpips_class",
                                                                                   "div_class")):
        pairs = same_prompt_pairs(study, kind)
        assert len(pairs) == 2 * 3  # 2 prompts, 3 seeds each: 3 pairs per prompt
        lpips = sum(study["lpips"][i, j] for i, j in pairs) / len(pairs)
        dino = sum(1 - cos(study["dino"][i], study["dino"][j]) for i, j in pairs) / len(pairs)
        assert abs(got[lpips_name] - lpips) < TOLERANCE
        assert abs(got[dino_name] - dino) < TOLERANCE


def test_div_lpips_is_unavailable_without_distances_and_names_the_missing_pair():
    images = ImageSet(prompts=("a sks dog",) * 2, seeds=(0, 1), kinds=("subject",) * 2, identifier="sks")
    results, _ = score(images, ["div_lpips"], bootstrap_samples=200)
    assert not results[0].available and "LPIPS distances were not supplied" in results[0].note
    missing = ImageSet(prompts=("a sks dog",) * 2, seeds=(0, 1), kinds=("subject",) * 2, identifier="sks",
                       lpips=np.array([[0.0, np.nan], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match="LPIPS distances are missing for prompt 'a sks dog'"):
        score(missing, ["div_lpips"], bootstrap_samples=200)


@pytest.mark.parametrize(("prompt", "identifier", "expected"), [
    ("a <new1> cat in the snow", "<new1>", "a cat in the snow"),
    ("<new1> cat", "<new1>", "cat"),
    ("a <new1>cat", "<new1>", "a cat"),  # an added token is split off wherever it stands
    ("photo of a <new1>.", "<new1>", "photo of a."),
    ("a <new1> cat with a <new1> dog", "<new1>", "a cat with a dog"),
    ("a <new12> cat", "<new1>", "a <new12> cat"),  # another modifier token stays
    ("a sks dog", "sks", "a dog"),
    ("a sksdog", "sks", "a sksdog"),
])
def test_strip_identifier_handles_words_and_modifier_tokens(prompt, identifier, expected):
    assert strip_identifier(prompt, identifier) == expected


def test_every_builtin_metric_states_its_recipe():
    for name in METRICS.names():
        metric = METRICS.get(name)
        recipe = metric.recipe()
        assert metric.name == name and recipe["pairing"] and recipe["scale"] and recipe["backbone_role"]
    facts = {name: METRICS.get(name) for name in ("dino", "clip_i", "clip_t", "clip_t_clipscore", "clip_t_x100",
                                                  "div_lpips", "div_lpips_class")}
    assert facts["clip_t_clipscore"].clips_negative is True and facts["clip_t"].clips_negative is False
    assert all(facts[n].strips_identifier for n in ("clip_t", "clip_t_clipscore", "clip_t_x100"))
    assert facts["dino"].recipe()["real_images_row"].startswith("leave-one-out")
    assert facts["clip_t"].recipe()["real_images_row"].startswith("not defined")
    assert {facts[n].backbone for n in ("div_lpips", "div_lpips_class")} == {"lpips"}
    assert facts["div_lpips"].recipe()["negative_cosines"] == "not a cosine"
