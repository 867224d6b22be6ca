"""The method comparison of a study that varies `method`: which method gives what, at what cost.

`method_comparison(tables, subject, figures, out_dir, preferred)` returns the section's markdown for one subject:
- the fidelity-drift frontier with one line per method (figures.plot_method_frontier);
- each method's best configuration at acceptable drift (PRES not above the base model's interval, the verdict's
  rule), with its intervals; a method whose DINO interval overlaps the best method's is said to be tied with it;
- the cost of each method: seconds per step, peak GPU memory, size of the export, trainable parameters;
- image grids with one row per method (its configuration from the table), a subject prompt and a class prompt.

What this module does not hold: the plots (figures.py), drawing the grids (grids.py), the intervals and labels
(tables.py), the rest of the report (markdown.py). It computes no metric and reads no run folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.report.figures import plot_method_frontier
from harness.report.grids import run_grid
from harness.report.tables import (
    TIED,
    ResultTables,
    best_of,
    config_label,
    drift_limit,
    estimate,
    method_order,
    metric_label,
    ok_rows,
    to_float,
)

SHOWN_METRICS = ("dino", "clip_t", "pres", "div_class")


def varies_method(tables: ResultTables) -> bool:
    """True when the grid trains more than one method."""
    return len(dict(tables.grid).get("method", [])) > 1


@dataclass(frozen=True)
class MethodChoice:
    """A method's configuration for the comparison: its best DINO at acceptable drift, or, when every snapshot
    drifts, its least drifting one (`acceptable` False)."""

    method: str
    row: pd.Series
    acceptable: bool


def method_choices(tables: ResultTables, subject: str) -> list[MethodChoice]:
    rows = ok_rows(tables, subject)
    limit = drift_limit(tables, subject)
    choices = []
    for method in method_order(tables, rows):
        own = [r for _, r in rows[rows["method"] == method].iterrows()
               if estimate(r, "dino").known and estimate(r, "pres").known]
        if not own:
            continue
        fine = [r for r in own if limit is not None and estimate(r, "pres").mean <= limit]
        if fine:
            best, _ = best_of(fine, "dino", higher=True)
            choices.append(MethodChoice(method, fine[best], True))
        else:
            choices.append(MethodChoice(method, min(own, key=lambda r: estimate(r, "pres").mean), False))
    return choices


def _label(tables: ResultTables, row: pd.Series) -> str:
    return config_label(row, [k for k in tables.varied if k != "method"])


# --------------------------------------------------------------------------------------------------------------
# Markdown


def method_comparison(tables: ResultTables, subject: str, figures: Path, out_dir: Path, name: str,
                      preferred: dict[str, Sequence[str]]) -> list[str]:
    """The comparison's markdown for one subject; its figures are written under `figures` with prefix `name`."""
    choices = method_choices(tables, subject)
    if not choices:
        return ["No method has a scored snapshot with DINO and PRES yet."]
    lines = [*_best_table(tables, choices), "", *_verdict(choices), ""]
    plot = plot_method_frontier(tables, subject, figures / f"{name}_methods_frontier.png")
    if plot:
        lines += ["**Fidelity against drift, one line per method**", "",
                  f"![{subject}: fidelity against drift per method]({_link(plot, out_dir)})", ""]
    lines += ["**Cost per method**", "", *cost_table(tables, subject), ""]
    varied = [k for k in tables.varied if k != "method"]
    rows = [(f"{c.method}: {config_label(c.row, varied, step=False)}", c.row["run_key"]) for c in choices]
    for kind in ("subject", "class"):
        made = run_grid(tables, subject, kind, preferred.get(kind, ()), rows, "Rows: the methods' configurations "
                        "from the table", figures / f"{name}_methods_grid_{kind}.png")
        if made:
            path, prompt, seed = made
            caption = f"Each method on the {kind} prompt \"{prompt}\" (seed {seed})"
            lines += [f"**{caption}**", "", f"![{subject}: {caption}]({_link(path, out_dir)})", ""]
    return lines


def _best_table(tables: ResultTables, choices: list[MethodChoice]) -> list[str]:
    metrics = [m for m in SHOWN_METRICS if any(estimate(c.row, m).known for c in choices)]
    arrows = {m: "↑" if tables.higher_is_better[m] else "↓" for m in metrics}
    header = ["method", "configuration", "step", *[f"{metric_label(m)} {arrows[m]}" for m in metrics]]
    lines = ["Each method's best subject fidelity (DINO) among its snapshots whose PRES is not above the base "
             "model's interval; *italic*: every snapshot of the method drifts beyond it, its least drifting one "
             "is shown.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in choices:
        label = _label(tables, c.row) if c.acceptable else f"*{_label(tables, c.row)}*"
        cells = [c.method, label, str(int(c.row["step"])), *[estimate(c.row, m).text() for m in metrics]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def _verdict(choices: list[MethodChoice]) -> list[str]:
    fine = [c for c in choices if c.acceptable]
    drifting = [c.method for c in choices if not c.acceptable]
    lines = []
    if fine:
        best_index, tied = best_of([c.row for c in fine], "dino", higher=True)
        best = fine[best_index]
        sentence = (f"- Best subject fidelity at acceptable drift: **{best.method}** (DINO "
                    f"{estimate(best.row, 'dino').text()})")
        if tied:
            names = ", ".join(f"{fine[i].method} ({estimate(fine[i].row, 'dino').text()})" for i in tied)
            sentence += f"; {TIED} with {names}: this data does not rank them."
        elif len(fine) > 1:
            sentence += "; its interval overlaps no other method's."
        else:
            sentence += "."
        lines.append(sentence)
    if drifting:
        lines.append(f"- {', '.join(drifting)}: every snapshot drifts beyond the base model's PRES interval.")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Cost


def cost_table(tables: ResultTables, subject: str) -> list[str]:
    """Seconds per step, peak GPU memory, export size and trainable parameters of each method's runs."""
    runs = tables.runs[tables.runs["subject"] == subject].drop_duplicates("run_key")
    lines = ["| method | runs | s/step | peak GPU memory | export size | trainable parameters |",
             "|---|---|---|---|---|---|"]
    estimated = False
    for method in method_order(tables, runs):
        own = runs[runs["method"] == method]
        size = _spread(own.get("artifact_bytes"), _bytes_text)
        saved = own["save"].astype(str).eq("final").all() if "save" in own else False
        estimated |= not saved and size != "—"
        lines.append(f"| {method} | {len(own)} | {_spread(own.get('seconds_per_step'), lambda v: f'{v:.3g}')} | "
                     f"{_spread(own.get('peak_memory_gib'), lambda v: f'{v:.1f} GiB')} | "
                     f"{size}{'' if saved else ' *'} | {_spread(own.get('trainable_params'), _count_text)} |")
    lines += ["", "Medians over the method's runs, with the range when runs differ; seconds per step are wall-clock "
                  "on the device in the setup (CPU figures say nothing about a GPU). Peak GPU memory is empty on a "
                  "CPU."]
    if estimated:
        lines[-1] += " *: the run was not saved; the size is what its export's tensors take in fp16."
    return lines


def _spread(values: pd.Series | None, fmt) -> str:
    numbers = [to_float(v) for v in (values if values is not None else [])]
    numbers = sorted(v for v in numbers if not math.isnan(v))
    if not numbers:
        return "—"
    median = numbers[len(numbers) // 2] if len(numbers) % 2 else (numbers[len(numbers) // 2 - 1]
                                                                  + numbers[len(numbers) // 2]) / 2
    if fmt(numbers[0]) == fmt(numbers[-1]):
        return fmt(median)
    return f"{fmt(median)} ({fmt(numbers[0])}–{fmt(numbers[-1])})"


def _bytes_text(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _count_text(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f}"


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()
