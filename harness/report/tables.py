"""The report's input and the vocabulary all its parts share: the result tables, intervals, labels, row selections.

`load_results` reads results/<protocol>/ (the CSVs and metadata.json that harness/results writes) into
`ResultTables`; `Estimate` is a mean with its 95% interval and says when two cannot be told apart (`best_of` finds
the best row of a metric and the rows tied with it); the label functions name grid fields, configurations
('w=1, n=4 @ 400') and metrics, whose labels and directions come from the metric registry (harness.metrics);
`ok_rows`, `reference` and `run_groups` select a subject's rows.

What this module does not hold: the sentences (verdict.py), the plots (figures.py), the image grids (grids.py) or
the markdown (markdown.py). It draws nothing and writes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.metrics import METRICS, metric_names
from harness.results import IMAGES_CSV, METADATA_FILE, REFERENCES_CSV, RUNS_CSV

TIED = "tied within intervals"
BANNER = "Pipeline check only: tiny random models, no quality conclusions"

FIELD_LABELS = {"prior_loss_weight": "prior weight", "num_class_images": "class images",
                "learning_rate": "learning rate", "train_text_encoder": "text encoder trained"}
SHORT_FIELD_LABELS = {"prior_loss_weight": "w", "num_class_images": "n", "learning_rate": "lr"}
REFERENCE_LABELS = {"real_images": "real images", "base_model": "base model (step 0)"}


# --------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ResultTables:
    folder: Path
    runs: pd.DataFrame
    images: pd.DataFrame
    references: pd.DataFrame
    metadata: dict[str, Any]

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m: bool(self.metadata.get("metrics", {}).get(m, {}).get("higher_is_better",
                                                                        METRICS.get(m).higher_is_better))
                for m in metric_names()}

    @property
    def varied(self) -> list[str]:
        """The grid fields that tell configurations apart within a subject (in grid order)."""
        return [k for k, _ in self.grid if k not in ("steps", "subject")]

    @property
    def grid(self) -> list[tuple[str, list[Any]]]:
        return [(k, list(v)) for k, v in self.metadata.get("grid") or []]

    @property
    def pipeline_check_only(self) -> bool:
        return bool(self.metadata.get("pipeline_check_only"))


def load_results(folder: Path) -> ResultTables:
    """The CSVs and metadata written by results.write_results; a missing file says which command writes it."""
    folder = Path(folder)
    for name in (RUNS_CSV, IMAGES_CSV, REFERENCES_CSV, METADATA_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; write the results first (run_experiment.py "
                                    "<protocol> --report-only rebuilds them from the run folders).")
    return ResultTables(
        folder=folder, runs=pd.read_csv(folder / RUNS_CSV), images=pd.read_csv(folder / IMAGES_CSV),
        references=pd.read_csv(folder / REFERENCES_CSV),
        metadata=json.loads((folder / METADATA_FILE).read_text(encoding="utf-8")),
    )


# --------------------------------------------------------------------------------------------------------------
# Intervals and labels


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    @property
    def known(self) -> bool:
        return not math.isnan(self.mean)

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def overlaps(self, other: Estimate) -> bool:
        """True when the intervals share a point, or when either lacks one (then they cannot be told apart)."""
        if not (self.has_interval and other.has_interval):
            return True
        return self.low <= other.high and other.low <= self.high

    def text(self) -> str:
        """'0.612 [0.580, 0.640]'; more decimals when the interval is too narrow to show at three."""
        if not self.known:
            return "—"
        if not self.has_interval:
            return f"{self.mean:.3f}"
        width = self.high - self.low
        decimals = 3 if width >= 0.005 or width <= 0 else min(6, math.ceil(-math.log10(width)) + 1)
        return f"{self.mean:.{decimals}f} [{self.low:.{decimals}f}, {self.high:.{decimals}f}]"


def to_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def estimate(row: pd.Series | dict[str, Any], metric: str) -> Estimate:
    return Estimate(to_float(row.get(metric)), to_float(row.get(f"{metric}_ci_low")),
                    to_float(row.get(f"{metric}_ci_high")))


def value_text(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:g}"
    return str(value)


def uses_prior(row: pd.Series | dict[str, Any]) -> bool:
    weight = to_float(row.get("prior_loss_weight"))
    return math.isnan(weight) or weight > 0


def field_value(row: pd.Series | dict[str, Any], name: str) -> str:
    """A grid value as shown; the class-image count of a run without prior preservation means nothing."""
    if name == "num_class_images" and not uses_prior(row):
        return "—"
    return value_text(row.get(name))


def config_label(row: pd.Series | dict[str, Any], varied: Sequence[str], step: bool = True) -> str:
    """A compact name of a configuration, e.g. 'w=1, n=4 @ 400'."""
    parts = [f"{SHORT_FIELD_LABELS.get(k, k)}={field_value(row, k)}" for k in varied
             if field_value(row, k) != "—"]
    name = ", ".join(parts) or "default settings"
    return f"{name} @ {int(row['step'])}" if step else name


def metric_label(metric: str) -> str:
    """The metric's name in tables and figures ("CLIP-T"), from the metric registry."""
    return METRICS.get(metric).label if metric in METRICS else metric


def available(frame: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    return [m for m in metrics if m in frame and frame[m].notna().any()]


def best_of(rows: list[pd.Series], metric: str, higher: bool) -> tuple[int | None, list[int]]:
    """Index of the best row for a metric and the indices of rows tied with it within intervals."""
    known = [(i, estimate(r, metric)) for i, r in enumerate(rows) if estimate(r, metric).known]
    if not known:
        return None, []
    best_index, best = max(known, key=lambda ie: ie[1].mean if higher else -ie[1].mean)
    tied = [i for i, e in known if i != best_index and e.overlaps(best)]
    return best_index, tied


# --------------------------------------------------------------------------------------------------------------
# Labels and selections shared by the figures, the grids, the verdict and the tables


def ok_rows(tables: ResultTables, subject: str) -> pd.DataFrame:
    runs = tables.runs
    return runs[(runs["subject"] == subject) & (runs["status"] == "ok")]


def reference(tables: ResultTables, subject: str, kind: str) -> pd.Series | None:
    refs = tables.references
    rows = refs[(refs["subject"] == subject) & (refs["reference"] == kind)]
    return rows.iloc[0] if len(rows) else None


def drift_limit(tables: ResultTables, subject: str) -> float | None:
    """The highest PRES that counts as acceptable drift: the top of the base model's PRES interval (its mean when
    it has no interval); None without a base-model PRES."""
    base = reference(tables, subject, "base_model")
    pres = estimate(base, "pres") if base is not None else None
    if pres is None or not pres.known:
        return None
    return pres.high if pres.has_interval else pres.mean


def run_groups(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(run_key, its rows sorted by step) in table order."""
    order = list(dict.fromkeys(rows["run_key"]))
    return [(key, rows[rows["run_key"] == key].sort_values("step")) for key in order]


IDENTIFIER_SLOT = "{identifier}"


def subject_identifier(tables: ResultTables, subject: str) -> str | None:
    """The subject's identifier as the protocol writes it (the base model's prompts use it)."""
    return next((s.get("identifier") for s in tables.metadata.get("subjects", []) if s.get("name") == subject), None)


def prompt_template(prompt: str, identifier: str | None) -> str:
    """The prompt with its identifier, as a whole word, written as {identifier}."""
    return " ".join(IDENTIFIER_SLOT if word == identifier else word for word in str(prompt).split())


def prompt_templates(tables: ResultTables, images: pd.DataFrame) -> pd.Series:
    """Each image's prompt as a template: snapshots of a method that names the subject with its own token
    ('a <new1> dog') line up with the base model's ('a sks dog')."""
    runs = tables.runs
    tokens = dict(zip(runs["run_key"], runs["identifier"], strict=True)) if "identifier" in runs else {}
    return pd.Series([prompt_template(prompt, tokens.get(key) or subject_identifier(tables, subject))
                      for prompt, key, subject in zip(images["prompt"], images["run_key"], images["subject"],
                                                      strict=True)], index=images.index, dtype=object)


def method_order(tables: ResultTables, rows: pd.DataFrame) -> list[str]:
    """The methods present in `rows`, in the grid's order (then any other, by name)."""
    grid_order = [str(m) for m in dict(tables.grid).get("method", [])]
    present = set(rows["method"])
    return [m for m in grid_order if m in present] + sorted(present - set(grid_order))


def legend_title(varied: Sequence[str]) -> str | None:
    shown = [f"{SHORT_FIELD_LABELS[k]} = {FIELD_LABELS.get(k, k)}" for k in varied if k in SHORT_FIELD_LABELS]
    return ", ".join(shown) or None
