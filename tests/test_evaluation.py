"""Sampling and scoring of one snapshot with tiny models: files, sidecars, resumption, record contents."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.backends.tiny import build_tiny_components
from harness.config import EvalSpec, SubjectSpec
from harness.embedders import EmbeddingCache, make_embedders
from harness.evaluator import Scorer, real_images_record, record_name, samples_record
from harness.metrics import roles_for
from harness.records import scores_name
from harness.sampling import (
    eval_requests,
    generate,
    missing,
    read_samples,
    render,
    sampler_settings,
    samples_key,
    to_pil,
)
from tests.conftest import write_images

SPEC = EvalSpec(backbones="tiny", seeds=(0, 1), class_prompts=("a {class}", "a {class} on the beach"),
                sampler="ddim", steps=2, bootstrap_samples=100, max_subject_prompts=2)


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


@pytest.fixture
def subject(tmp_path):
    return SubjectSpec(name="dog", instance_dir=write_images(tmp_path / "dog", n=3), class_noun="dog")


def test_requests_cover_subject_and_class_prompts_with_every_seed(subject):
    requests = eval_requests(subject, SPEC)
    assert [(r.prompt_kind, r.prompt, r.seed) for r in requests] == [
        ("subject", "a sks dog in the jungle", 0), ("subject", "a sks dog in the jungle", 1),
        ("subject", "a sks dog in the snow", 0), ("subject", "a sks dog in the snow", 1),
        ("class", "a dog", 0), ("class", "a dog", 1),
        ("class", "a dog on the beach", 0), ("class", "a dog on the beach", 1),
    ]


def test_samples_key_changes_with_prompts_seeds_and_sampler(subject):
    settings = sampler_settings(SPEC, 32)
    base = samples_key(subject, SPEC, settings)
    assert samples_key(subject, replace(SPEC, seeds=(0, 2)), settings) != base
    assert samples_key(subject, SPEC, replace(settings, steps=3)) != base
    assert samples_key(replace(subject, identifier="zwx"), SPEC, settings) != base
    assert samples_key(subject, replace(SPEC, bootstrap_samples=500), settings) == base  # scoring only


def test_generate_writes_pngs_with_sidecars_and_resumes(tmp_path, subject, components):
    requests = eval_requests(subject, SPEC)
    out = tmp_path / "samples"
    settings = sampler_settings(SPEC, 32)
    meta = {"run_key": "abc", "step": 4}
    assert generate(components, requests[:3], out, settings, "cpu", "fp32", meta, batch_size=2) == 3
    assert len(missing(out, requests)) == len(requests) - 3
    assert generate(components, requests, out, settings, "cpu", "fp32", meta, batch_size=4) == len(requests) - 3
    assert generate(components, requests, out, settings, "cpu", "fp32", meta) == 0  # nothing left to do
    records = read_samples(out, requests)
    first = records[0]
    assert first["prompt"] == "a sks dog in the jungle" and first["seed"] == 0 and first["run_key"] == "abc"
    assert first["step"] == 4 and first["sampler_sampler"] == "ddim" and first["sampler_steps"] == 2
    assert Image.open(first["path"]).size == (32, 32)


def test_pixels_are_rounded_on_the_device_exactly_as_diffusers_rounds_them():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).half()
    images[0, 0, 0, :6] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 0.0, 1.0, 254.5 / 255])  # ties, ends
    expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    got = to_pil(images)
    assert [im.mode for im in got] == ["RGB"] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(expected, got, strict=True))


def test_rendered_images_equal_the_pipelines_own_pil_output(components):
    import torch

    from harness.models import make_pipeline

    pipe = make_pipeline(components, "ddim")
    ours = render(pipe, ["a dog", "a cat"], [3, 4], 32, 2, 7.5, torch.device("cpu"))
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    latents = torch.stack([torch.randn((4, 4, 4), generator=g) for g in generators])
    stock = pipe(prompt=["a dog", "a cat"], height=32, width=32, num_inference_steps=2, guidance_scale=7.5,
                 latents=latents, generator=generators, output_type="pil").images
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ours, stock, strict=True))


def test_an_image_does_not_depend_on_its_batch(tmp_path, subject, components):
    requests = eval_requests(subject, SPEC)[:4]
    settings = sampler_settings(SPEC, 32)
    generate(components, requests, tmp_path / "a", settings, "cpu", "fp32", {}, batch_size=1)
    generate(components, requests, tmp_path / "b", settings, "cpu", "fp32", {}, batch_size=4)
    for r in requests:
        a = Image.open(tmp_path / "a" / f"{r.stem}.png").tobytes()
        b = Image.open(tmp_path / "b" / f"{r.stem}.png").tobytes()
        assert sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a) < 1.0  # equal up to float noise


def test_one_snapshot_sampled_and_scored_end_to_end(tmp_path, subject, components):
    requests = eval_requests(subject, SPEC)
    out = tmp_path / "samples"
    generate(components, requests, out, sampler_settings(SPEC, 32), "cpu", "fp32", {"run_key": "abc", "step": 2})
    scorer = Scorer(make_embedders("tiny", roles=roles_for(SPEC.metrics)), EmbeddingCache(tmp_path / "cache"), SPEC)
    real = sorted(subject.instance_dir.iterdir())
    record = samples_record(scorer, read_samples(out, requests), real, subject, kind="snapshot", protocol="t",
                            run_key="abc", step=2, sampler={"name": "ddim"}, seconds={"sampling": 1.0})
    json.dumps(record)  # the record is plain JSON
    assert record["kind"] == "snapshot" and record["run_key"] == "abc" and record["step"] == 2
    assert set(record["metrics"]) == set(SPEC.metrics)
    for name in ("dino", "clip_i", "clip_t", "pres"):
        m = record["metrics"][name]
        assert -1 <= m["ci_low"] <= m["mean"] <= m["ci_high"] <= 1, name
    assert record["metrics"]["dino"]["n"] == 4 and record["metrics"]["pres"]["n"] == 4
    assert 0 <= record["metrics"]["div_class"]["mean"] <= 2
    assert len(record["images"]) == 8
    subject_image = record["images"][0]
    assert set(subject_image["scores"]) >= {"dino", "clip_i", "clip_t", "div_subject"}
    assert "pres" not in subject_image["scores"]  # PRES is a class-prompt score
    assert "tiny" in record["backbones"]["clip"]["backbone"] or "tiny" in json.dumps(record["backbones"]["clip"])

    # Scoring again embeds nothing new: the cache answers.
    calls = []
    original = scorer.embedders["dino"].embed_images
    scorer.embedders["dino"].embed_images = lambda images: calls.append(len(images)) or original(images)
    again = samples_record(scorer, read_samples(out, requests), real, subject, kind="snapshot", protocol="t",
                           run_key="abc", step=2, sampler={"name": "ddim"}, seconds={})
    assert calls == []
    assert again["metrics"]["dino"] == record["metrics"]["dino"]


def test_real_images_row_is_leave_one_out(tmp_path, subject):
    scorer = Scorer(make_embedders("tiny", roles=roles_for(SPEC.metrics)), EmbeddingCache(tmp_path / "cache"), SPEC)
    real = sorted(subject.instance_dir.iterdir())
    record = real_images_record(scorer, real, subject, "t")
    assert record["kind"] == "real_images" and record["step"] is None
    dino = record["metrics"]["dino"]
    assert dino["n"] == 3 and dino["mean"] < 0.999999  # self-pairs (cosine 1) are excluded
    assert record["metrics"]["clip_t"]["mean"] is None and record["metrics"]["clip_t"]["note"]
    assert not math.isnan(record["metrics"]["clip_i"]["mean"])


# --------------------------------------------------------------------------------------------------------------
# LPIPS distances


def write_samples(folder, groups: list[tuple[str, str, int]], size: int = 32) -> list[dict]:
    """One random PNG per (kind, prompt, seed), as sampling writes them (the sidecar fields the scorer reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    samples = []
    for i, (kind, prompt, seed) in enumerate(groups):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        samples.append({"path": str(path), "prompt": prompt, "prompt_kind": kind, "seed": seed})
    return samples


def package_lpips(a: Path, b: Path) -> float:
    """The `lpips` package's own forward on two files, with tiny_lpips's random trunk (seed 0)."""
    import warnings

    import lpips
    import torch

    from harness.backbones import seeded

    def pixels(path: Path) -> torch.Tensor:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array * 2 - 1).permute(2, 0, 1)[None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = seeded(0, lambda: lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)).eval()
    with torch.no_grad():
        return float(model(pixels(a), pixels(b)).item())


def test_lpips_is_computed_between_the_seeds_of_each_prompt_only_and_cached(tmp_path, subject, monkeypatch):
    groups = [("subject", "a sks dog in the snow", s) for s in (0, 1, 2)] + \
             [("subject", "a sks dog on the beach", 0)] + [("class", "a dog", s) for s in (0, 1)] + \
             [("class", "a dog in the snow", s) for s in (0, 1)]
    samples = write_samples(tmp_path / "samples", groups)
    paths = [Path(s["path"]) for s in samples]
    kinds, prompts, seeds = zip(*groups, strict=True)
    scorer = Scorer(make_embedders("tiny", roles=roles_for(SPEC.metrics)), EmbeddingCache(tmp_path / "cache"), SPEC)
    computed = []
    network = scorer.embedders["lpips"]
    original = network.distance_matrix
    monkeypatch.setattr(network, "distance_matrix", lambda images: computed.append(len(images)) or original(images))

    matrix = scorer.lpips_matrix(paths, prompts, seeds, kinds)
    assert sorted(computed) == [2, 2, 3]  # one call per prompt with two or more seeds; "on the beach" has one
    pairs = {(i, j) for i in range(8) for j in range(8) if i != j and groups[i][:2] == groups[j][:2]}
    for i in range(8):
        for j in range(8):
            if (i, j) in pairs:
                assert abs(matrix[i, j] - package_lpips(paths[i], paths[j])) < 1e-6
            elif i != j or i == 3:
                assert np.isnan(matrix[i, j]), (i, j)
    assert len(list((tmp_path / "cache" / "lpips").rglob("*.npy"))) == len(pairs) // 2

    computed.clear()
    assert np.array_equal(scorer.lpips_matrix(paths, prompts, seeds, kinds), matrix, equal_nan=True)
    assert computed == []  # every pair came from the cache
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(paths[4])  # one class image changes
    changed = scorer.lpips_matrix(paths, prompts, seeds, kinds)
    assert computed == [2] and changed[4, 5] != matrix[4, 5] and changed[0, 1] == matrix[0, 1]

    record = samples_record(scorer, samples, sorted(subject.instance_dir.iterdir()), subject, kind="snapshot",
                            protocol="t", run_key="abc", step=2, sampler={"name": "ddim"}, seconds={})
    subject_pairs = [(0, 1), (0, 2), (1, 2)]
    class_pairs = [(4, 5), (6, 7)]
    assert record["metrics"]["div_lpips"]["mean"] == pytest.approx(
        np.mean([changed[i, j] for i, j in subject_pairs]), abs=1e-6)
    assert record["metrics"]["div_lpips_class"]["mean"] == pytest.approx(
        np.mean([changed[i, j] for i, j in class_pairs]), abs=1e-6)
    assert "1 prompt(s) with a single seed skipped" in record["metrics"]["div_lpips"]["note"]
    assert record["backbones"]["lpips"]["backbone"] == "tiny-random:lpips-alex"


def test_a_scorer_without_the_backbone_its_metrics_need_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"the metrics div_lpips, div_lpips_class need the lpips backbone"):
        Scorer(make_embedders("tiny"), EmbeddingCache(tmp_path / "cache"), SPEC)


def test_record_names_keep_their_spelling_and_change_with_the_lpips_network():
    assert record_name(SPEC) == scores_name("tiny", SPEC.metrics, SPEC.bootstrap_samples)
    assert record_name(replace(SPEC, lpips_net="vgg")) not in (record_name(SPEC), scores_name(
        "tiny", SPEC.metrics, SPEC.bootstrap_samples, {"lpips_net": "alex"}))
