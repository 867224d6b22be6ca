"""Fabricated on-disk records of a finished study, written with the harness's own record writers.

`fabricate_study` writes, for a protocol's runs: spec.json, train.json (or error.json for a failed run) and one
scores record per snapshot with tiny real PNGs, plus the base-model and real-image reference records. The numbers
are plausible and follow `metric_value`, so tests know what to expect; `overrides` pins chosen values. Every file
goes through harness/records.py (and the run store), so the fakes cannot drift from what the harness writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.config import Protocol, SubjectSpec
from harness.grid import RunSpec, expand
from harness.metrics import METRICS, metric_names
from harness.prompts import class_prompts, subject_prompts
from harness.records import (
    ErrorRecord,
    TrainRecord,
    scores_header,
    scores_name,
    scores_record,
    snapshot_dir,
    write_error,
    write_scores,
    write_train,
)
from harness.results import sort_runs
from harness.store import RunStore

FIXED_DIGESTS = {"dog": "0" * 64, "cat": "1" * 64}
HALF_WIDTH = {"clip_t": 0.01}  # interval half-widths; 0.03 for the others
SCORES_NAME = scores_name("tiny", ["dino", "clip_i", "clip_t", "pres", "div_subject", "div_class"], 200)
TINY_BACKBONES = {"clip": {"backbone": "tiny-clip-0", "pretrained": "random (tiny, pipeline check only)"},
                  "dino": {"backbone": "tiny-dino-0", "pretrained": "random (tiny, pipeline check only)"}}
REAL_BACKBONES = {"clip": {"backbone": "open_clip:ViT-B-32/openai", "pretrained": "open_clip pretrained='openai'"},
                  "dino": {"backbone": "timm:vit_small_patch16_224.dino", "pretrained": "timm pretrained"}}
Value = tuple[float, float, float]  # mean, ci_low, ci_high
TRAINABLE = {"dreambooth": 859_520_964, "lora": 797_184, "custom_diffusion": 19_169_280}  # SD 1.5's, per method


@dataclass(frozen=True)
class Study:
    runs: list[RunSpec]
    run_folders: list[Path]
    score_files: list[Path]  # snapshots, then references


def metric_value(name: str, weight: float, count: int, fraction: float) -> Value | None:
    """A plausible value of a metric for a run with prior weight `weight` at `fraction` of its training."""
    prior = weight > 0
    mean = {
        "dino": 0.40 + 0.25 * fraction + (0.0 if prior else 0.03) + 0.0002 * count - 0.01 * weight,
        "clip_i": 0.60 + 0.20 * fraction,
        "clip_t": 0.31 - 0.03 * fraction - (0.0 if prior else 0.01),
        "pres": 0.42 + (0.05 if prior else 0.25) * fraction - 0.00005 * count - 0.02 * weight * fraction,
        "div_subject": 0.40 - 0.08 * fraction,
        "div_class": 0.42 - (0.03 if prior else 0.12) * fraction + 0.0001 * count,
    }.get(name)
    if mean is None:
        return None
    half = HALF_WIDTH.get(name, 0.03)
    return (round(mean, 6), round(mean - half, 6), round(mean + half, 6))


BASE_VALUES: dict[str, Value] = {
    "dino": (0.30, 0.27, 0.33), "clip_i": (0.55, 0.52, 0.58), "clip_t": (0.32, 0.31, 0.33),
    "pres": (0.40, 0.37, 0.43), "div_subject": (0.45, 0.42, 0.48), "div_class": (0.46, 0.43, 0.49),
}
REAL_VALUES: dict[str, Value] = {"dino": (0.774, 0.74, 0.80), "clip_i": (0.885, 0.86, 0.91),
                                 "div_subject": (0.35, 0.31, 0.39)}


def _png(path: Path, colour: tuple[int, int, int], seed: int, size: int = 16) -> Path:
    """A small PNG: a flat colour with a little seeded noise (so seeds differ)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _metric_entry(name: str, value: Value | None) -> dict[str, Any]:
    backbone = METRICS.get(name).backbone  # the role, as the evaluator writes it
    if value is None:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "n_groups": 0,
                "higher_is_better": name != "pres", "backbone": backbone,
                "note": "LPIPS weights are not available offline" if name == "div_lpips" else "not applicable"}
    mean, low, high = value
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": 8, "n_groups": 8,
            "higher_is_better": name != "pres", "backbone": backbone, "note": ""}


def _images(protocol: Protocol, subject: SubjectSpec, folder: Path, colour: tuple[int, int, int],
            score: float) -> list[dict[str, Any]]:
    """The images of a snapshot or of the base model, with the prompts of `subject` (a run's names the subject
    with its method's token)."""
    out = []
    for kind, prompts in (("subject", subject_prompts(subject, protocol.eval)),
                          ("class", class_prompts(subject, protocol.eval))):
        for p, prompt in enumerate(prompts):
            for seed in protocol.eval.seeds:
                path = _png(folder / f"{kind}_{p:02d}_seed{seed}.png", colour, seed)
                scores = {"dino": score, "clip_i": score + 0.2, "clip_t": 0.3} if kind == "subject" else \
                    {"pres": score}
                out.append({"path": str(path), "prompt": prompt, "prompt_kind": kind, "seed": seed,
                            "scores": scores})
    return out


def _scores(protocol: Protocol, kind: str, spec: SubjectSpec, run_key: str | None, step: int | None,
            values: dict[str, Value | None], images: list[dict[str, Any]], backbones: dict[str, Any]) -> dict:
    header = scores_header(kind, protocol.name, spec.name, spec.class_noun, spec.identifier, run_key, step)
    sampler = {"name": protocol.eval.sampler, "steps": protocol.eval.steps,
               "guidance_scale": protocol.eval.guidance_scale, "resolution": protocol.train.resolution}
    metrics = {m: _metric_entry(m, values.get(m)) for m in protocol.eval.metrics}  # as the evaluator: the requested
    return scores_record(header, metrics, backbones, sampler, images, {"sampling": 1.5, "scoring": 0.25})


def write_references(protocol: Protocol, subject: str, folder: Path, backbones: dict[str, Any],
                     base_values: dict[str, Value] | None = None) -> list[Path]:
    spec = protocol.subject(subject)
    base = folder / subject / "base_model"
    write_scores(base / SCORES_NAME, _scores(
        protocol, "base_model", spec, None, 0, base_values or BASE_VALUES,
        _images(protocol, spec, base / "images", (90, 90, 90), 0.3), backbones))
    real = folder / subject / "real_images"
    instance_files = sorted(spec.instance_dir.glob("*.jpg"))
    images = [{"path": str(p), "prompt": "", "prompt_kind": "real", "seed": None, "scores": {"dino": 0.77}}
              for p in instance_files]
    record = _scores(protocol, "real_images", spec, None, None, REAL_VALUES, images, backbones)
    record["seconds"] = {"scoring": 0.1}
    record["sampler"] = None
    write_scores(real / SCORES_NAME, record)
    return [base / SCORES_NAME, real / SCORES_NAME]


def fabricate_study(protocol: Protocol, root: Path, *, fail_run: int | None = None, tiny_backbones: bool = True,
                    overrides: dict[tuple[int, int], dict[str, Value]] | None = None,
                    base_values: dict[str, Value] | None = None, device: str = "NVIDIA H100 80GB HBM3") -> Study:
    """Records of every run of `protocol` under root/runs and root/references.

    fail_run: index (in table order) of a run that raises after its first snapshot: it gets an error.json and no
    scores for its later steps. overrides: (run index, step) -> {metric: (mean, low, high)}. device: what train.json
    says the runs trained on.
    """
    backbones = TINY_BACKBONES if tiny_backbones else REAL_BACKBONES
    runs = sort_runs(expand(protocol, FIXED_DIGESTS))
    store = RunStore(root / "runs")
    folders, files = [], []
    for index, run in enumerate(runs):
        folder = store.open(run).path
        folders.append(folder)
        steps = run.snapshot_steps[:1] if index == fail_run else run.snapshot_steps
        for step in steps:
            values: dict[str, Value | None] = {
                m: metric_value(m, run.train.prior_loss_weight, run.train.num_class_images, step / run.train.steps)
                for m in metric_names()}
            values.update((overrides or {}).get((index, step), {}))
            colour = (40 + 60 * index % 200, 80 + 30 * step % 150, 200 - 40 * index % 160)
            snapshot = snapshot_dir(folder, "0123456789ab", step)
            images = _images(protocol, run.subject, snapshot, colour, values["dino"][0])
            files.append(write_scores(snapshot / SCORES_NAME, _scores(
                protocol, "snapshot", run.subject, run.run_key, step, values, images, backbones)))
        if index == fail_run:
            write_error(folder, ErrorRecord(
                run_key=run.run_key, error_type="OutOfMemoryError", phase="train",
                message="CUDA out of memory. Tried to allocate 2.00 GiB",
                traceback="Traceback (most recent call last):\n  ...\nOutOfMemoryError: CUDA out of memory."))
        else:
            write_train(folder, TrainRecord(
                run_key=run.run_key, final_step=run.train.steps, seconds_per_step=0.25,
                wall_seconds=0.25 * run.train.steps + 3.0, peak_memory_bytes=int(9.5 * 2**30),
                optimizer="bitsandbytes.AdamW8bit", memory_mode=run.train.memory_mode,
                mixed_precision=run.train.mixed_precision, resumed_from_step=0,
                loss_history=[{"step": s + 1, "instance": 0.1, "prior": 0.1, "lr": run.train.learning_rate}
                              for s in range(run.train.steps)],
                device=device, trainable_params=TRAINABLE.get(run.train.method, 1000),
                artifact_bytes=2 * TRAINABLE.get(run.train.method, 1000)))
    references = root / "references"
    for subject in sorted({r.subject.name for r in runs}):
        files += write_references(protocol, subject, references, backbones, base_values)
    return Study(runs=runs, run_folders=folders, score_files=files)


# The smoke grid (prior weight x steps x class images: 3 runs x 2 snapshots) on the test's image folder.
SMOKE_LIKE = """
name: {name}
model: {{id: {model}}}
subjects:
  - name: dog
    instance_dir: "{{subject_dir}}"
    class_noun: dog
train:
  resolution: 32
  learning_rate: 1.0e-4
eval:
  backbones: {backbones}
  seeds: [0, 1]
  class_prompts: ["a {{class}}", "a {{class}} on the beach"]
  max_subject_prompts: 2
  bootstrap_samples: 200
grid:
  prior_loss_weight: [0.0, 1.0]
  steps: [2, 4]
  num_class_images: [2, 4]
"""


def smoke_like(name: str = "smoke", tiny: bool = True) -> str:
    return SMOKE_LIKE.format(name=name, model="tiny" if tiny else "stable-diffusion-v1-5/stable-diffusion-v1-5",
                             backbones="tiny" if tiny else "real")
