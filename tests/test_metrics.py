"""Metric math on hand-built embeddings: values, scopes, leave-one-out, identifier stripping, bootstrap."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from harness.metrics import (
    METRICS,
    ImageSet,
    MetricResult,
    PerImageScores,
    bootstrap_ci,
    clip_t_texts,
    intervals_overlap,
    score,
    score_real_images,
    strip_identifier,
)

from .conftest import REPO

DIM = 4
E = np.eye(DIM)
DIAG = (E[0] + E[1]) / math.sqrt(2)


def rows(*vectors: np.ndarray) -> np.ndarray:
    return np.stack(vectors).astype(np.float32)


def make_set(kinds, prompts, seeds, dino, clip=None, real_dino=None, real_clip=None, **kwargs) -> ImageSet:
    return ImageSet(
        prompts=tuple(prompts), seeds=tuple(seeds), kinds=tuple(kinds), identifier="sks", dino=dino, clip=clip,
        real_dino=real_dino if real_dino is not None else rows(E[0]), real_clip=real_clip, **kwargs,
    )


def result(results: list[MetricResult], name: str) -> MetricResult:
    return next(r for r in results if r.name == name)


def metric_value(image_set: ImageSet, name: str) -> float:
    results, _ = score(image_set, [name], bootstrap_samples=200)
    return result(results, name).mean


# --------------------------------------------------------------------------------------------------------------
# Similarity to the real images


def test_dino_identical_orthogonal_and_known_mean():
    real = rows(E[0], E[1])
    same = make_set(["subject"] * 2, ["a sks dog"] * 2, [0, 1], rows(E[0], E[0]), real_dino=rows(E[0], E[0]))
    assert metric_value(same, "dino") == pytest.approx(1.0)
    orthogonal = make_set(["subject"], ["a sks dog"], [0], rows(E[2]), real_dino=real)
    assert metric_value(orthogonal, "dino") == pytest.approx(0.0)
    # image 0: cosines (1, 0) -> 0.5; image 1: (1/sqrt2, 1/sqrt2) -> 0.7071
    mixed = make_set(["subject"] * 2, ["a sks dog"] * 2, [0, 1], rows(E[0], DIAG), real_dino=real)
    pairwise = (rows(E[0], DIAG) @ real.T).mean()
    assert metric_value(mixed, "dino") == pytest.approx((0.5 + 1 / math.sqrt(2)) / 2)
    assert metric_value(mixed, "dino") == pytest.approx(pairwise)


def test_clip_i_uses_clip_embeddings_not_dino():
    images = make_set(["subject"], ["a sks dog"], [0], dino=rows(E[0]), clip=rows(DIAG), real_dino=rows(E[0]),
                      real_clip=rows(E[1]))
    assert metric_value(images, "clip_i") == pytest.approx(1 / math.sqrt(2))
    assert metric_value(images, "dino") == pytest.approx(1.0)


def test_pres_uses_only_class_prompt_images():
    kinds = ["subject", "class", "class"]
    prompts = ["a sks dog", "a dog", "a dog"]
    base = make_set(kinds, prompts, [0, 0, 1], rows(E[0], E[0], E[1]))
    changed_subject = make_set(kinds, prompts, [0, 0, 1], rows(E[2], E[0], E[1]))
    changed_class = make_set(kinds, prompts, [0, 0, 1], rows(E[0], E[1], E[1]))
    assert metric_value(base, "pres") == pytest.approx(0.5)
    assert metric_value(changed_subject, "pres") == pytest.approx(0.5)
    assert metric_value(changed_class, "pres") == pytest.approx(0.0)
    # and dino, the other way round, only looks at the subject-prompt image
    assert metric_value(changed_class, "dino") == pytest.approx(1.0)
    assert metric_value(changed_subject, "dino") == pytest.approx(0.0)
    assert METRICS.get("pres").higher_is_better is False


def test_per_image_table_has_scores_only_where_the_metric_applies():
    images = make_set(["subject", "class"], ["a sks dog", "a dog"], [3, 3], rows(DIAG, E[0]),
                      image_ids=("s.png", "c.png"))
    results, table = score(images, ["dino", "pres"], bootstrap_samples=200)
    assert [row["image"] for row in table] == ["s.png", "c.png"]
    assert table[0]["dino"] == pytest.approx(1 / math.sqrt(2)) and math.isnan(table[0]["pres"])
    assert table[1]["pres"] == pytest.approx(1.0) and math.isnan(table[1]["dino"])
    assert (table[1]["kind"], table[1]["seed"], table[1]["prompt"]) == ("class", 3, "a dog")
    assert result(results, "dino").n == 1 and result(results, "pres").n == 1


# --------------------------------------------------------------------------------------------------------------
# Diversity


def test_diversity_identical_is_zero_and_orthogonal_is_one():
    same = make_set(["subject"] * 3, ["a sks dog"] * 3, [0, 1, 2], rows(E[0], E[0], E[0]))
    orthogonal = make_set(["subject"] * 3, ["a sks dog"] * 3, [0, 1, 2], rows(E[0], E[1], E[2]))
    assert metric_value(same, "div_subject") == pytest.approx(0.0)
    assert metric_value(orthogonal, "div_subject") == pytest.approx(1.0)


def test_diversity_pairs_only_different_seeds_of_the_same_prompt():
    # prompt A: seeds 0, 1, 2 with e0, e0, e1 -> pairs 0, 1, 1 -> 2/3. Prompt B (e2, e3) is class: not counted.
    images = make_set(
        ["subject"] * 3 + ["class"] * 2, ["A"] * 3 + ["B"] * 2, [0, 1, 2, 0, 1], rows(E[0], E[0], E[1], E[2], E[2]),
    )
    results, table = score(images, ["div_subject", "div_class"], bootstrap_samples=200)
    assert result(results, "div_subject").mean == pytest.approx(2 / 3)
    assert [table[i]["div_subject"] for i in range(3)] == pytest.approx([0.5, 0.5, 1.0])
    assert result(results, "div_class").mean == pytest.approx(0.0)
    assert result(results, "div_subject").n_groups == 1


def test_diversity_skips_single_seed_prompts_and_is_unavailable_without_two_seeds():
    partial = make_set(["subject"] * 3, ["A", "A", "B"], [0, 1, 0], rows(E[0], E[1], E[2]))
    res = result(score(partial, ["div_subject"], bootstrap_samples=200)[0], "div_subject")
    assert res.mean == pytest.approx(1.0) and res.n == 2
    assert "1 prompt(s) with a single seed skipped" in res.note
    single = make_set(["subject"] * 2, ["A", "B"], [0, 0], rows(E[0], E[1]))
    res = result(score(single, ["div_subject"], bootstrap_samples=200)[0], "div_subject")
    assert not res.available and math.isnan(res.ci_low) and res.n == 0
    assert "two or more seeds" in res.note


def test_div_lpips_is_unavailable_without_distances_and_computed_with_them():
    dino = rows(E[0], E[0])
    res = result(score(make_set(["subject"] * 2, ["A"] * 2, [0, 1], dino), ["div_lpips"])[0], "div_lpips")
    assert not res.available and "LPIPS" in res.note
    lpips = np.array([[0.0, 0.3], [0.3, 0.0]])
    with_lpips = make_set(["subject"] * 2, ["A"] * 2, [0, 1], dino, lpips=lpips)
    assert metric_value(with_lpips, "div_lpips") == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------------------------
# Real images, leave-one-out


def test_leave_one_out_excludes_self_pairs():
    a, b = E[0], (E[0] + E[1]) / math.sqrt(2)
    results, table = score_real_images(rows(a, b), rows(a, b), ["dino", "clip_i", "pres"], bootstrap_samples=200)
    assert result(results, "dino").mean == pytest.approx(1 / math.sqrt(2))  # not (1 + 0.707) / 2
    assert result(results, "clip_i").mean == pytest.approx(1 / math.sqrt(2))
    assert not result(results, "pres").available and "generated images only" in result(results, "pres").note
    assert [row["kind"] for row in table] == ["real", "real"]


def test_leave_one_out_matches_brute_force_and_needs_two_images():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(5, DIM))
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    expected = np.mean([real[i] @ real[j] for i in range(5) for j in range(5) if i != j])
    results, _ = score_real_images(real, None, ["dino", "clip_i"], bootstrap_samples=200)
    assert result(results, "dino").mean == pytest.approx(expected)
    assert not result(results, "clip_i").available and "CLIP" in result(results, "clip_i").note
    lonely, _ = score_real_images(rows(E[0]), None, ["dino"], bootstrap_samples=200)
    assert not lonely[0].available and "at least 2 real images" in lonely[0].note


# --------------------------------------------------------------------------------------------------------------
# CLIP-T and the identifier


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a sks dog in the snow", "a dog in the snow"),
    ("sks dog", "dog"),
    ("a photo of sks", "a photo of"),
    ("a sksdog in the snow", "a sksdog in the snow"),
    ("a sks-dog", "a sks-dog"),
    ("a dog", "a dog"),
])
def test_strip_identifier_removes_the_whole_word_only(prompt, expected):
    assert strip_identifier(prompt, "sks") == expected


def test_clip_t_compares_each_image_with_its_prompt_without_the_identifier():
    text = {"a dog in the snow": E[1].astype(np.float32), "a dog on the beach": E[0].astype(np.float32)}
    images = make_set(
        ["subject", "subject", "class"], ["a sks dog in the snow", "a sks dog on the beach", "a dog on the beach"],
        [0, 0, 0], dino=rows(E[0], E[0], E[0]), clip=rows(DIAG, E[0], E[3]), text_clip=text,
    )
    results, table = score(images, ["clip_t"], bootstrap_samples=200)
    assert [table[0]["clip_t"], table[1]["clip_t"]] == pytest.approx([1 / math.sqrt(2), 1.0])
    assert math.isnan(table[2]["clip_t"])  # class-prompt images are not scored
    assert result(results, "clip_t").mean == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert clip_t_texts(images.prompts, images.kinds, "sks") == ["a dog in the snow", "a dog on the beach"]


def test_clip_t_missing_text_embedding_is_an_error_naming_the_text():
    images = make_set(["subject"], ["a sks dog"], [0], dino=rows(E[0]), clip=rows(E[0]),
                      text_clip={"a sks dog": E[0].astype(np.float32)})
    with pytest.raises(ValueError, match="'a dog'"):
        score(images, ["clip_t"])


# --------------------------------------------------------------------------------------------------------------
# Bootstrap and comparisons


def test_bootstrap_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    scores = rng.normal(0.6, 0.1, size=40)
    groups = [(i // 2, "prompt") for i in range(40)]
    low, high = bootstrap_ci(scores, groups, n_samples=500, seed=3)
    assert low < scores.mean() < high
    assert (low, high) == bootstrap_ci(scores, groups, n_samples=500, seed=3)
    assert (low, high) != bootstrap_ci(scores, groups, n_samples=500, seed=4)


def test_bootstrap_shrinks_with_more_groups_and_resamples_whole_groups():
    rng = np.random.default_rng(2)
    few = rng.normal(size=10)
    many = rng.normal(size=1000)
    width_few = np.subtract(*bootstrap_ci(few, list(range(10)), 1000, 0)[::-1])
    width_many = np.subtract(*bootstrap_ci(many, list(range(1000)), 1000, 0)[::-1])
    assert width_many < width_few / 3
    # 10 groups of 10 identical scores carry the information of 10 images, not 100
    values = np.repeat(few, 10)
    grouped = np.subtract(*bootstrap_ci(values, list(np.repeat(np.arange(10), 10)), 1000, 0)[::-1])
    independent = np.subtract(*bootstrap_ci(values, list(range(100)), 1000, 0)[::-1])
    assert grouped > 2 * independent
    assert bootstrap_ci([0.4, 0.4, 0.4], ["g", "g", "g"], 100, 0) == pytest.approx((0.4, 0.4))


def test_score_reports_interval_around_the_mean():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(12, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = make_set(["subject"] * 12, [f"p{i // 4}" for i in range(12)], [i % 4 for i in range(12)],
                      vectors.astype(np.float32), real_dino=rows(E[0], E[1]))
    res = result(score(images, ["dino"], bootstrap_samples=300, seed=0)[0], "dino")
    assert res.ci_low <= res.mean <= res.ci_high and res.ci_low < res.ci_high
    assert (res.n, res.n_groups, res.backbone, res.higher_is_better) == (12, 12, "dino", True)


def make_result(low: float, high: float, name: str = "dino") -> MetricResult:
    return MetricResult(name, (low + high) / 2, low, high, 10, 10, "dino", True)


def test_intervals_overlap():
    assert intervals_overlap(make_result(0.1, 0.3), make_result(0.2, 0.4))
    assert not intervals_overlap(make_result(0.1, 0.2), make_result(0.25, 0.4))
    assert intervals_overlap(make_result(0.1, 0.2), make_result(math.nan, math.nan))
    with pytest.raises(ValueError, match="compare one metric"):
        intervals_overlap(make_result(0.1, 0.2), make_result(0.1, 0.2, name="pres"))


# --------------------------------------------------------------------------------------------------------------
# Registry, unknown names, input validation


def test_a_registered_metric_is_scored_and_its_features_are_checked():
    from harness.metrics import register, roles_for

    @register("test_dino_mean", higher_is_better=False, backbone="dino", features=("dino",), label="TEST",
              scale="raw cosine", pairing="all pairs of images and real images",
              description="mean DINO cosine to the real images, for every image")
    def every_image(images):
        scores = (images.dino.astype(np.float64) @ images.real_dino.astype(np.float64).T).mean(axis=1)
        return PerImageScores(scores, tuple(range(len(images))))

    try:
        images = make_set(["subject", "class"], ["a sks dog", "a dog"], [0, 0], rows(E[0], E[1]),
                          real_dino=rows(E[0], E[2]))
        results, _ = score(images, ["test_dino_mean"], bootstrap_samples=200)
        assert results[0].mean == pytest.approx(0.25)  # cosines 1, 0 (first image) and 0, 0 (second)
        assert results[0].higher_is_better is False and roles_for(["test_dino_mean", "clip_t"]) == ("clip", "dino")
        with pytest.raises(ValueError, match="registered twice"):
            register("test_dino_mean", higher_is_better=True, backbone="dino", features=("dino",), label="x",
                     scale="x", pairing="x", description="x")(every_image)
    finally:
        METRICS.unregister("test_dino_mean")
    with pytest.raises(ValueError, match="unknown feature"):
        register("test_bad", higher_is_better=True, backbone="dino", features=("depth",), label="x", scale="x",
                 pairing="x", description="x")
    with pytest.raises(ValueError, match="pairing"):
        register("test_bad", higher_is_better=True, backbone="dino", features=("dino",), label="x", scale="x",
                 pairing=" ", description="x")
    with pytest.raises(TypeError, match="pairing"):
        register("test_bad", higher_is_better=True, backbone="dino", features=("dino",), label="x", scale="x",
                 description="x")
    assert "test_bad" not in METRICS


def test_unknown_and_unavailable_metrics_come_back_with_a_note():
    images = make_set(["subject"], ["a sks dog"], [0], rows(E[0]))
    results, table = score(images, ["dino", "dinoo", "clip_i"], bootstrap_samples=200)
    unknown, clip_i = result(results, "dinoo"), result(results, "clip_i")
    assert math.isnan(unknown.mean) and "unknown metric 'dinoo'" in unknown.note and "dino" in unknown.note
    assert math.isnan(clip_i.mean) and "CLIP embeddings" in clip_i.note
    assert result(results, "dino").mean == pytest.approx(1.0)
    assert math.isnan(table[0]["clip_i"])


def test_image_set_rejects_unnormalised_or_misaligned_inputs():
    with pytest.raises(ValueError, match="L2-normalised"):
        make_set(["subject"], ["a sks dog"], [0], rows(2 * E[0]))
    with pytest.raises(ValueError, match="one entry per image"):
        make_set(["subject"], ["a sks dog", "a sks cat"], [0], rows(E[0]))
    with pytest.raises(ValueError, match="unknown image kind"):
        make_set(["subjekt"], ["a sks dog"], [0], rows(E[0]))


def test_metrics_module_does_not_import_torch():
    code = "import sys, harness.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
