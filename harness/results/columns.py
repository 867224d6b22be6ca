"""The columns of the result CSVs: their order, their documentation (shown in the README) and their CSV text.

Columns follow the registries: one group of metric columns per registered metric, one column per training field
and per method setting of any registered method. So they are computed when asked (`runs_columns()`), not fixed
at import, and a metric or method registered later gets its columns. `columns_markdown` renders a documentation
table for the README; `csv_text` writes a table the same way every time.

What this module does not hold: the rows (tables.py) or the records they come from (harness/records.py).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import pandas as pd

from harness.config import TrainSpec
from harness.methods import METHODS
from harness.metrics import metric_names

# Columns that measure the machine rather than the result: two executions of one study differ there and nowhere
# else (the other columns are compared as they are by the tests and benchmarks/bench_multi_gpu.py).
TIMING_COLUMNS = ("train_seconds", "seconds_per_step", "sampling_seconds", "scoring_seconds", "peak_memory_gib")

# Method settings are shown where train_text_encoder stood when it was a common training field, so the columns of
# existing studies keep their order.
SETTINGS_AFTER = "max_grad_norm"


# Not columns: the method and the steps have their own; `compile` changes speed only (train.json records whether
# a run trained compiled).
NOT_TRAIN_COLUMNS = ("method", "steps", "compile")


def common_train_columns() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainSpec) if f.name not in NOT_TRAIN_COLUMNS]


def setting_columns() -> list[str]:
    """Every method setting of every registered method, once, in registration order."""
    names = [f.name for _, cls in METHODS.items() for f in dataclasses.fields(cls.settings_type)]
    return list(dict.fromkeys(names))


def train_columns() -> list[str]:
    common = common_train_columns()
    at = common.index(SETTINGS_AFTER) + 1
    return [*common[:at], *setting_columns(), *common[at:]]


def metric_columns() -> list[str]:
    return [c for m in metric_names() for c in (m, f"{m}_ci_low", f"{m}_ci_high", f"{m}_n")]


TRAIN_DOC = ("training setting of the run: a TrainSpec field (harness/config/schema.py) or a setting of the run's "
             "method (empty where the method has none) after the grid is applied; num_class_images is 0 when "
             "prior_loss_weight is 0")


def _metric_doc() -> dict[str, str]:
    return {
        "<metric>": "mean of the metric over its images; one column per metric: " + ", ".join(metric_names())
                    + " (empty when not computed; metadata.json says why)",
        "<metric>_ci_low": "lower end of the bootstrap 95% interval over (prompt, seed) groups",
        "<metric>_ci_high": "upper end of that interval",
        "<metric>_n": "number of images (or pairs, for diversity) the mean is taken over",
    }


SETUP_DOC = {
    "clip_backbone": "CLIP model of clip_i and the clip_t metrics, as tag (weights)",
    "dino_backbone": "DINO model of dino, pres, div_subject and div_class, as tag (weights)",
    "lpips_backbone": "LPIPS network of div_lpips and div_lpips_class, as tag (weights)",
    "eval_sampler": "scheduler used to sample the evaluation images",
    "eval_steps": "denoising steps of evaluation sampling",
    "eval_guidance_scale": "classifier-free guidance scale of evaluation sampling",
    "eval_resolution": "resolution of the evaluation images (pixels)",
    "eval_seeds": "evaluation seeds, space separated",
    "model_id": "base model: hub id, local folder or 'tiny'",
    "model_revision": "hub revision of the base model (empty: the latest)",
    "harness_version": "version of the harness that wrote this file",
}


def runs_columns_doc() -> dict[str, str]:
    return {
        "protocol": "protocol name",
        "subject": "subject name",
        "class_noun": "the subject's class noun (e.g. dog)",
        "identifier": "the token that names the subject in the run's prompts: the subject's identifier, or the "
                      "method's own token (custom_diffusion's modifier_token)",
        "run_key": "the run's key: its folder under runs/ (sha256 of everything that changes the trained weights)",
        "method": "fine-tuning method",
        "step": "snapshot step: optimizer steps taken when the images were sampled",
        "run_steps": "length of the run the snapshot was taken from (with a constant schedule, the snapshot at step "
                     "s is the s-step run)",
        "varied": "the grid fields this protocol varies, comma separated (columns of the same names hold the values)",
        **{c: TRAIN_DOC for c in train_columns()},
        **_metric_doc(),
        "status": "ok (scored), failed (the run raised before this snapshot was scored) or missing (not run yet)",
        "error": "error type and message when status is failed",
        "error_phase": "the phase that failed: prepare, train, sample or score",
        "train_seconds": "wall-clock seconds of the whole training run (all snapshots)",
        "seconds_per_step": "mean wall-clock seconds per optimizer step",
        "sampling_seconds": "seconds spent generating this snapshot's evaluation images",
        "scoring_seconds": "seconds spent scoring them",
        "peak_memory_gib": "peak GPU memory of the run (GiB; empty on CPU)",
        "trainable_params": "number of parameters (elements) the method trained",
        "artifact_bytes": "size of the run's export in bytes: on disk when save is final, else what its tensors take "
                          "in fp16, the export's format (file headers and metadata aside)",
        "device": "device the run trained on",
        "optimizer_used": "optimizer the run actually used (AdamW8bit, or the fallback)",
        **SETUP_DOC,
    }


def images_columns_doc() -> dict[str, str]:
    return {
        "source": "snapshot (a fine-tuned model), base_model (step 0) or real_images (the subject's photos)",
        "protocol": "protocol name",
        "subject": "subject name",
        "run_key": "run key of the snapshot (empty for base_model and real_images)",
        "step": "snapshot step (0 for the base model, empty for real images)",
        "prompt": "the prompt the image was generated from (with the identifier)",
        "prompt_kind": "subject (names the subject), class (the generic class, for drift) or real",
        "seed": "sampling seed",
        "path": "the image file, relative to this CSV's folder when it lies under the folder that holds results/ "
                "(../../runs/...), absolute otherwise",
        "<metric>": "the image's own score for that metric, where one exists (dino, clip_i: mean cosine to the real "
                    "images; clip_t and its other scales: to its prompt; pres: class image to real images; the "
                    "diversities: mean distance to the other seeds of its prompt); empty otherwise",
    }


def references_columns_doc() -> dict[str, str]:
    return {
        "reference": "real_images (leave-one-out real-vs-real scores, the ceiling) or base_model (step 0, the floor "
                     "of fidelity and of drift)",
        "protocol": "protocol name",
        "subject": "subject name",
        "class_noun": "the subject's class noun",
        "step": "0 for the base model, empty for real images",
        **_metric_doc(),
        "sampling_seconds": "seconds spent generating the base model's images (empty for real images)",
        "scoring_seconds": "seconds spent scoring",
        **SETUP_DOC,
    }


def _expand_columns(doc: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key in doc:
        if key.startswith("<metric>"):
            out += [key.replace("<metric>", m) for m in metric_names()]
        else:
            out.append(key)
    return out


def _interleave_metrics(columns: list[str]) -> list[str]:
    """Metric columns grouped per metric (dino, dino_ci_low, ...), at the place of the first metric column."""
    metric_set = set(metric_columns())
    first = next((i for i, c in enumerate(columns) if c in metric_set), None)
    rest = [c for c in columns if c not in metric_set]
    if first is None:
        return rest
    wanted = [c for c in metric_columns() if c in set(columns)]
    return rest[:first] + wanted + rest[first:]


def runs_columns() -> list[str]:
    return _interleave_metrics(_expand_columns(runs_columns_doc()))


def images_columns() -> list[str]:
    return _expand_columns(images_columns_doc())


def references_columns() -> list[str]:
    return _interleave_metrics(_expand_columns(references_columns_doc()))


def columns_markdown(doc: Mapping[str, str]) -> str:
    """A markdown table (column | meaning) of a columns doc, the training columns folded into one row."""
    lines = ["| column | meaning |", "|---|---|"]
    train = train_columns()
    train_shown = False
    for column, meaning in doc.items():
        if column in train:
            if train_shown:
                continue
            train_shown = True
            names = ", ".join(f"`{c}`" for c in train)
            lines.append(f"| {names} | {TRAIN_DOC} |")
            continue
        lines.append(f"| `{column}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _is_integer_type(hint: Any) -> bool:
    return hint is int or int in typing.get_args(hint)


def integer_columns() -> frozenset[str]:
    """Columns written without '.0' even beside empty cells."""
    hints = dict(typing.get_type_hints(TrainSpec))
    for _, cls in METHODS.items():
        hints.update(typing.get_type_hints(cls.settings_type))
    ints = [c for c in train_columns() if _is_integer_type(hints.get(c))]
    return frozenset({"step", "run_steps", "seed", "eval_steps", "eval_resolution", "trainable_params",
                      "artifact_bytes", *ints, *(f"{m}_n" for m in metric_names())})


def csv_text(frame: pd.DataFrame) -> str:
    """The CSV text of a table: floats in their shortest exact form, integers without '.0' even beside empty
    cells, '\\n' line ends, no index; the same table always gives the same text."""
    frame = frame.copy()
    for column in integer_columns().intersection(frame.columns):
        frame[column] = pd.array([None if pd.isna(v) else int(v) for v in frame[column]], dtype="Int64")
    return frame.to_csv(index=False, lineterminator="\n")
