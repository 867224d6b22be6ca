"""Measured throughputs by GPU, and the dry run's estimate of a study's time made from them.

The table is benchmarks/throughput.json, written by benchmarks/bench_throughput.py and shipped with the repository:

    {"schema": 1, "gpus": {"NVIDIA H100 80GB HBM3": {
        "train.dreambooth.fast.checkpointing": {"eager": {...}, "compiled": {...}},
        "sampling.eval": {...}, "sampling.class": {...}, "scoring": {...}}}}

Each figure (`eager` or `compiled`) holds its rate (`seconds_per_step` or `images_per_second`), the settings it was
measured at (`settings`: resolution, steps, batch...), and where it comes from (`commit`, `date`, `command`,
`torch`); a compiled figure also holds `compile_seconds`. The estimate scales a figure to the protocol's settings
(pixels, sampler steps, images per step) and says so; it is an estimate for the GPU it names, never a promise.

The GPU is found without importing torch (the dry run stays light): with torch when the caller already imported it,
otherwise with `nvidia-smi --query-gpu=name --format=csv,noheader`.

What this module does not hold: the measurements (benchmarks/) or the compile decisions (harness/fastpath.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.fastpath import DEFAULT_GPUS, DEFAULT_PAYBACK, Payback, decide

TABLE_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.json"
TABLE_SCHEMA = 1
SMI_QUERY = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
REFERENCE_PIXELS = 512 * 512
# The settings the figures are measured at (benchmarks/bench_throughput.py); estimates scale from these.
REFERENCE = {"train_images_per_step": 2, "eval_steps": 25, "class_steps": 50}


# --------------------------------------------------------------------------------------------------------------
# The table


@functools.lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    """The table of measured figures ({"schema", "gpus"}); an empty one when the file is missing."""
    if not Path(path).is_file():
        return {"schema": TABLE_SCHEMA, "gpus": {}}
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    if table.get("schema") != TABLE_SCHEMA or not isinstance(table.get("gpus"), dict):
        raise ValueError(f"{path}: not a throughput table of schema {TABLE_SCHEMA}; restore it with "
                         "`git checkout -- benchmarks/throughput.json`.")
    return table


def gpu_figures(gpu: str | None, table: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The figures measured on `gpu` (its name as torch or nvidia-smi give it; case and spacing ignored)."""
    if not gpu:
        return None
    gpus = (table or load_table())["gpus"]
    wanted = _normal(gpu)
    return next((figures for name, figures in gpus.items() if _normal(name) == wanted), None)


def _normal(name: str) -> str:
    return " ".join(name.lower().split())


def merge_figures(table: dict[str, Any], gpu: str, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of `table` with `figures` ({key: {"eager"|"compiled": figure}}) set for `gpu`; others are kept."""
    merged = json.loads(json.dumps(table))
    entry = merged.setdefault("gpus", {}).setdefault(gpu, {})
    for key, paths in figures.items():
        entry.setdefault(key, {}).update(paths)
    merged["schema"] = TABLE_SCHEMA
    return merged


# Class images, base-model images and evaluation images render through one compiled UNet (harness/inference.py):
# whichever kind a process renders first pays the compilation. A benchmark that measures the kinds one after another
# in one process finds the later ones' compilation nearly free (0.1 s for class images on the H100 of c29d6bd, after
# 80.8 s for evaluation images), so every sampling kind is charged the largest compile time measured for any of them.
SHARED_COMPILE = "sampling."


def compile_seconds(figures: dict[str, Any], key: str) -> float | None:
    """The compile time that `key`'s compiled path costs a process that has compiled nothing yet, from one GPU's
    figures (None when its compiled figure has none)."""
    own = (figures.get(key, {}).get("compiled") or {}).get("compile_seconds")
    if own is None or not key.startswith(SHARED_COMPILE):
        return own
    return max(float(entry["compiled"]["compile_seconds"]) for name, entry in figures.items()
               if name.startswith(SHARED_COMPILE) and (entry.get("compiled") or {}).get("compile_seconds") is not None)


def measured_payback(key: str, gpu: str | None) -> Payback | None:
    """Eager and compiled cost per unit and the compile time of `key` on `gpu`, when all three were measured."""
    figures = gpu_figures(gpu) or {}
    entry = figures.get(key, {})
    eager, compiled, seconds = entry.get("eager"), entry.get("compiled"), compile_seconds(figures, key)
    if not eager or not compiled or seconds is None:
        return None
    return Payback(_seconds_per_unit(eager), _seconds_per_unit(compiled), float(seconds),
                   f"measured on {gpu} at {compiled.get('commit', '?')}")


def payback_for(kind: str, key: str, gpu: str | None) -> Payback | None:
    """The measured payback of `key` on `gpu`; else, on the GPUs the defaults speak for (an H100 or H200), the
    default of `kind` ("training" or "sampling"); else None (nothing known: `auto` stays eager)."""
    measured = measured_payback(key, gpu)
    if measured is not None:
        return measured
    return DEFAULT_PAYBACK[kind] if gpu and any(name in gpu for name in DEFAULT_GPUS) else None


def _seconds_per_unit(figure: dict[str, Any]) -> float:
    if "seconds_per_step" in figure:
        return float(figure["seconds_per_step"])
    return 1.0 / float(figure["images_per_second"])


def training_key(method: str, memory_mode: str, gradient_checkpointing: bool) -> str:
    return f"train.{method}.{memory_mode}.{'checkpointing' if gradient_checkpointing else 'no_checkpointing'}"


# --------------------------------------------------------------------------------------------------------------
# The GPU


def find_gpu() -> tuple[str | None, str]:
    """(name of the first CUDA GPU or None, how it was found or why none was)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), "torch"
        return None, "torch sees no CUDA GPU"
    try:
        done = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"nvidia-smi unavailable ({type(error).__name__})"
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not names:
        return None, "nvidia-smi found no GPU"
    return names[0], "nvidia-smi"


# --------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class PhaseEstimate:
    phase: str
    work: str  # "8400 steps", "200 images"
    seconds: float | None
    basis: str  # the figure used, or why there is none


def estimate_phases(protocol: Any, runs: Sequence[Any], work: Any, figures: dict[str, Any],
                    gpu: str) -> list[PhaseEstimate]:
    """Seconds of each phase of the study (protocol, its runs and its grid.WorkEstimate) from `figures`."""
    images = work.images
    class_images, class_compiled = _class_images(protocol, work, figures, gpu, images)
    return [
        class_images,
        _training(runs, work, figures, gpu, protocol.execution.deterministic),
        _sampling(protocol, work, figures, gpu, images, compiled_already=class_compiled),
        _scoring(work, figures),
    ]


def _pick(entry: dict[str, Any], decision_compile: bool) -> tuple[dict[str, Any] | None, bool, str]:
    """The figure of the path the harness would take, else the other one (and a note saying so)."""
    wanted, other = ("compiled", "eager") if decision_compile else ("eager", "compiled")
    if entry.get(wanted):
        return entry[wanted], decision_compile, ""
    note = f"the harness would run {wanted}, no {wanted} figure yet" if entry.get(other) else ""
    return entry.get(other), not decision_compile, note


def _describe(figure: dict[str, Any], compiled: bool, *notes: str) -> str:
    path = "compiled" if compiled else "eager"
    when = ", ".join(x for x in (figure.get("commit"), figure.get("date")) if x)
    text = f"{path}{f' figure measured at {when}' if when else ' figure'}"
    return "; ".join([text, *(n for n in notes if n)])


def _scale_note(factor: float, what: str) -> str:
    return "" if abs(factor - 1) < 1e-9 else f"scaled x{factor:.2g} for {what}"


def _sampling_figure(figures: dict[str, Any], key: str, setting: str, gpu: str, images: int,
                     deterministic: bool) -> tuple[dict[str, Any] | None, bool, str]:
    entry = figures.get(key, {})
    payback = payback_for("sampling", key, gpu)
    decision = decide(setting, "cuda", images, payback, "images", deterministic=deterministic)
    return _pick(entry, decision.compile)


def _class_images(protocol: Any, work: Any, figures: dict[str, Any], gpu: str,
                  images: int) -> tuple[PhaseEstimate, bool]:
    """The class images' estimate, and whether they render compiled (then evaluation images find it compiled)."""
    spec = protocol.class_images
    label = f"{work.class_images} images"
    if not work.class_images:
        return PhaseEstimate("class images", label, 0.0, "none needed"), False
    figure, compiled, note = _sampling_figure(figures, "sampling.class", spec.compile, gpu, images,
                                              protocol.execution.deterministic)
    if figure is None:
        return PhaseEstimate("class images", label, None, "no class-image figure for this GPU"), False
    factor = spec.steps / REFERENCE["class_steps"] * _pixels(protocol.train.resolution)
    seconds = work.class_images / figure["images_per_second"] * factor
    seconds += (compile_seconds(figures, "sampling.class") or 0.0) if compiled else 0.0
    return PhaseEstimate("class images", label, seconds,
                         _describe(figure, compiled, note, _scale_note(factor, "steps and resolution"))), compiled


def _training(runs: Sequence[Any], work: Any, figures: dict[str, Any], gpu: str,
              deterministic: bool = False) -> PhaseEstimate:
    label = f"{work.optimizer_steps} steps"
    seconds, bases, compiled_keys, scaled = 0.0, {}, set(), False
    for run in runs:
        spec = run.train
        key = training_key(spec.method, spec.memory_mode, spec.gradient_checkpointing)
        shown = key if key in figures else training_key("dreambooth", spec.memory_mode, spec.gradient_checkpointing)
        if shown not in figures:
            return PhaseEstimate("training", label, None, f"no figure for {key} on this GPU")
        decision = decide(spec.compile, "cuda", max(spec.steps, work.optimizer_steps),
                          payback_for("training", shown, gpu), "steps", warm=shown in compiled_keys,
                          deterministic=deterministic)
        figure, compiled, note = _pick(figures[shown], decision.compile)
        images_per_step = spec.batch_size * (2 if spec.uses_prior else 1)
        factor = images_per_step / REFERENCE["train_images_per_step"] * _pixels(spec.resolution)
        scaled = scaled or abs(factor - 1) > 1e-9
        seconds += spec.steps * figure["seconds_per_step"] * factor
        if compiled and shown not in compiled_keys:
            seconds += figure.get("compile_seconds", 0.0)  # once per process and shape
            compiled_keys.add(shown)
        bases.setdefault(shown, f"{shown}: {_describe(figure, compiled, note)}")
    scaling = "; scaled to each run's images per step and resolution" if scaled else ""
    return PhaseEstimate("training", label, seconds, "; ".join(bases.values()) + scaling)


def _sampling(protocol: Any, work: Any, figures: dict[str, Any], gpu: str, images: int,
              compiled_already: bool = False) -> PhaseEstimate:
    count = work.eval_images + work.base_model_images
    label = f"{count} images"
    figure, compiled, note = _sampling_figure(figures, "sampling.eval", protocol.eval.compile, gpu, images,
                                              protocol.execution.deterministic)
    if figure is None:
        return PhaseEstimate("sampling", label, None, "no evaluation-sampling figure for this GPU")
    factor = protocol.eval.steps / REFERENCE["eval_steps"] * _pixels(protocol.train.resolution)
    seconds = count / figure["images_per_second"] * factor
    if compiled and not compiled_already:  # one compiled UNet serves class images and evaluation images
        seconds += compile_seconds(figures, "sampling.eval") or 0.0
    return PhaseEstimate("sampling", label, seconds,
                         _describe(figure, compiled, note, _scale_note(factor, "steps and resolution")))


def _scoring(work: Any, figures: dict[str, Any]) -> PhaseEstimate:
    count = work.eval_images + work.base_model_images
    figure = figures.get("scoring", {}).get("eager")
    if figure is None:
        return PhaseEstimate("scoring", f"{count} images", None, "no scoring figure for this GPU")
    return PhaseEstimate("scoring", f"{count} images", count / figure["images_per_second"],
                         _describe(figure, False, ""))


def _pixels(resolution: int) -> float:
    return resolution * resolution / REFERENCE_PIXELS


def estimate_lines(protocol: Any, runs: Sequence[Any], work: Any, model_is_sd15: bool,
                   gpu: tuple[str | None, str] | None = None) -> list[str]:
    """The dry run's 'Time estimate' section for the GPU this machine has (or `gpu`, as find_gpu returns it)."""
    name, how = gpu or find_gpu()
    if name is None:
        return [f"Time estimate: no CUDA GPU found ({how}); the table holds GPU figures only."]
    if not model_is_sd15:
        return [f"Time estimate: none for model {protocol.model.id!r}: the measured figures are of the SD 1.5 "
                "architecture."]
    figures = gpu_figures(name)
    if figures is None:
        known = ", ".join(load_table()["gpus"]) or "none"
        return [f"Time estimate: no figures for {name} in {TABLE_PATH.name} (measured GPUs: {known}); "
                "`python benchmarks/bench_throughput.py --update` on this GPU adds them."]
    phases = estimate_phases(protocol, runs, work, figures, name)
    lines = [f"Time estimate for {name} (found with {how}), from figures measured on that GPU "
             f"(benchmarks/{TABLE_PATH.name}); an estimate, not a measurement:"]
    for p in phases:
        shown = "unknown" if p.seconds is None else _duration(p.seconds)
        lines.append(f"  {p.phase:<13} {p.work:>14}  {shown:>9}   {p.basis}")
    known = [p.seconds for p in phases if p.seconds is not None]
    partial = " (phases without a figure left out)" if len(known) < len(phases) else ""
    lines.append(f"  {'total':<13} {'':>14}  {_duration(sum(known)):>9}{partial}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
