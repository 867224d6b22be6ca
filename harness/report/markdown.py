"""The markdown report: `write_report` writes reports/<protocol>/report.md, with figures/*.png beside it.

`render_report` writes the figures and returns the markdown: the pipeline-check banner, the verdict, the setup
(model, grid, evaluation, backbones, hardware, wall time), the metric definitions, per subject the method
comparison (when the study varies `method`) and one table with its plots and image grids, the failed runs, the
timings and links to the CSVs; `write_report` saves it and removes the figures it no longer links.

What this module does not hold: the sentences (verdict.py), the method comparison (methods.py), the plots
(figures.py), the image grids (grids.py), the metric and backbone definitions (definitions.py), the comparison with
the paper (paper.py) or the reading of the CSVs, intervals and labels (tables.py). It computes no metric and reads
no run folder.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from harness.config import Protocol
from harness.metrics import metric_names
from harness.report.definitions import metric_definitions
from harness.report.figures import plot_diversity, plot_frontier, plot_metrics_vs_steps
from harness.report.grids import image_grid
from harness.report.methods import method_comparison, varies_method
from harness.report.paper import paper_comparison
from harness.report.tables import (
    BANNER,
    FIELD_LABELS,
    REFERENCE_LABELS,
    TIED,
    ResultTables,
    available,
    best_of,
    config_label,
    estimate,
    legend_title,
    load_results,
    metric_label,
    ok_rows,
    reference,
    value_text,
)
from harness.report.verdict import best_sentences, verdict
from harness.results import IMAGES_CSV, METADATA_FILE, REFERENCES_CSV, RUNS_CSV

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "subject"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(tables: ResultTables, subject: str) -> list[str]:
    """The subject's table: references on top, then every scored configuration; best in bold, ties marked."""
    rows = [r for _, r in ok_rows(tables, subject).iterrows()]
    metrics = available(pd.concat([ok_rows(tables, subject), tables.references]), metric_names())
    varied = tables.varied
    header = ["configuration", "step",
              *[f"{metric_label(m)} {'↑' if tables.higher_is_better[m] else '↓'}" for m in metrics]]
    lines = []
    if legend_title(varied):
        lines += [f"Configurations: {legend_title(varied)}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind in ("real_images", "base_model"):
        ref = reference(tables, subject, kind)
        if ref is not None:
            step = "" if pd.isna(ref.get("step")) else str(int(ref["step"]))
            cells = [f"*{REFERENCE_LABELS[kind]}*", step, *[estimate(ref, m).text() for m in metrics]]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    marks = {m: best_of(rows, m, tables.higher_is_better[m]) for m in metrics}
    for i, row in enumerate(rows):
        cells = [config_label(row, varied, step=False), str(int(row["step"]))]
        for m in metrics:
            text = estimate(row, m).text()
            best, tied = marks[m]
            if i == best:
                text = f"**{text}**"
            elif i in tied:
                text = f"{text} ≈"
            cells.append(text)
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    lines += ["", "**Bold**: the best configuration per column (references excluded); ≈: its interval overlaps "
                  "the best's, so the two are " + TIED + ". Brackets: 95% bootstrap intervals over (prompt, seed) "
                  "groups.", ""]
    lines += best_sentences(tables, rows, metrics)
    return lines


def _setup(tables: ResultTables, protocol: Protocol | None) -> list[str]:
    meta = tables.metadata
    model = meta.get("model", {})
    revision = ""
    if Path(str(model.get("id"))).is_absolute():
        revision = ", a local folder"
    elif model.get("id") != "tiny":
        revision = f", revision {model.get('revision') or 'not pinned (the hub latest at run time)'}"
    ev = meta.get("eval", {})
    runs = tables.runs
    lines = [
        f"- Model: `{model.get('id')}`{' (random weights)' if model.get('id') == 'tiny' else ''}{revision}, "
        f"{_dtype_text(model.get('dtype'), meta.get('devices') or [])}.",
        "- Subjects: " + ", ".join(f"{s['name']} (class '{s.get('class_noun')}', token '{s.get('identifier')}')"
                                   for s in meta.get("subjects", [])) + ".",
        "- Grid: " + ("; ".join(f"{FIELD_LABELS.get(k, k)} {v}" for k, v in tables.grid)
                      or "none (one configuration)") + f"; {runs['run_key'].nunique()} training runs, "
        f"{len(runs)} snapshots ({int((runs['status'] == 'ok').sum())} scored).",
        f"- Evaluation: seeds {ev.get('seeds')}, {ev.get('sampler')} with {ev.get('steps')} steps, guidance "
        f"{ev.get('guidance_scale')}; {len(ev.get('class_prompts', []))} class prompts.",
        "- Metric backbones: " + ("; ".join(f"{k}: `{v.get('label')}`" for k, v in meta.get("backbones", {}).items())
                                  or "not recorded") + ". Each metric's scale, pairing and preprocessing are in "
        "the tables below; numbers are comparable only with the same backbones and recipe.",
        f"- Hardware: {', '.join(meta.get('devices') or []) or 'not recorded'}" + _peak_memory(runs) + ".",
        f"- Wall time: {_duration(_wall_seconds(tables))} (training, sampling and scoring of the recorded runs).",
        f"- Harness {meta.get('harness_version')}; protocol file `{meta.get('protocol_path')}`.",
    ]
    return lines


def _dtype_text(dtype: str | None, devices: list[str]) -> str:
    """The dtype the study ran in: a CPU computes in fp32 whatever model.dtype asks for the GPU."""
    if devices and all(d == "cpu" for d in devices) and dtype not in (None, "fp32"):
        return f"fp32 (ran on the CPU, which computes in fp32; model.dtype {dtype} applies on a GPU)"
    return str(dtype)


def _peak_memory(runs: pd.DataFrame) -> str:
    peak = runs["peak_memory_gib"].max() if "peak_memory_gib" in runs else math.nan
    return "" if pd.isna(peak) else f"; peak GPU memory {peak:.1f} GiB"


def _wall_seconds(tables: ResultTables) -> float:
    runs = tables.runs
    train = runs.drop_duplicates("run_key")["train_seconds"].sum(min_count=1)
    sampled = runs[["sampling_seconds", "scoring_seconds"]].sum(min_count=1).sum()
    refs = tables.references[["sampling_seconds", "scoring_seconds"]].sum(min_count=1).sum()
    return float(sum(v for v in (train, sampled, refs) if not pd.isna(v)))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _failures(tables: ResultTables) -> list[str]:
    runs = tables.runs
    failed = runs[runs["status"] == "failed"]
    missing = runs[runs["status"] == "missing"]
    if failed.empty and missing.empty:
        return ["All runs finished and were scored."]
    lines = []
    if not failed.empty:
        lines += ["| run | subject | configuration | steps not scored | phase | error |", "|---|---|---|---|---|---|"]
        for key, group in failed.groupby("run_key", sort=False):
            first = group.iloc[0]
            steps = ", ".join(str(int(s)) for s in group["step"])
            lines.append(f"| `{key}` | {first['subject']} | {_md_cell(config_label(first, tables.varied, False))} | "
                         f"{steps} | {value_text(first['error_phase'])} | {_md_cell(value_text(first['error']))} |")
        lines += ["", "The full traceback is in `error.json` in the run's folder; fix the cause and run the protocol "
                      "again: finished work is kept."]
    if not missing.empty:
        keys = ", ".join(f"`{k}` (steps {', '.join(str(int(s)) for s in g['step'])})"
                         for k, g in missing.groupby("run_key", sort=False))
        lines += ["", f"Not scored yet (no result and no error): {keys}."]
    return lines


def _timings(tables: ResultTables) -> list[str]:
    timings = tables.metadata.get("timings")
    if not timings:
        return []
    lines = ["## Timings", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {float(seconds):.1f} |" for phase, seconds in timings.items()]
    return lines + [""]


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _figures_for_subject(tables: ResultTables, subject: str, figures: Path, out_dir: Path,
                         protocol: Protocol | None) -> list[str]:
    name = _safe_name(subject)
    lines: list[str] = []
    plots: list[tuple[str, Callable[[ResultTables, str, Path], Path | None], str]] = [
        ("metrics_vs_steps", plot_metrics_vs_steps, "Metrics against training steps"),
        ("frontier", plot_frontier, "Fidelity against drift"),
        ("diversity", plot_diversity, "Diversity against the grid"),
    ]
    for suffix, plot, caption in plots:
        written = plot(tables, subject, figures / f"{name}_{suffix}.png")
        if written:
            lines += [f"**{caption}**", "", f"![{subject}: {caption.lower()}]({_link(written, out_dir)})", ""]
    for kind in ("subject", "class"):
        preferred = _preferred_prompts(protocol, subject, kind)
        made = image_grid(tables, subject, kind, preferred, figures / f"{name}_grid_{kind}.png")
        if made:
            path, prompt, seed = made
            caption = f"Images of the {kind} prompt \"{prompt}\" (seed {seed})"
            lines += [f"**{caption}**", "", f"![{subject}: {caption}]({_link(path, out_dir)})", ""]
    return lines


def _preferred_prompts(protocol: Protocol | None, subject: str, kind: str) -> tuple[str, ...]:
    if protocol is None or subject not in {s.name for s in protocol.subjects}:
        return ()
    from harness.prompts import class_prompts, subject_prompts

    spec = protocol.subject(subject)
    return subject_prompts(spec, protocol.eval) if kind == "subject" else class_prompts(spec, protocol.eval)


def _sentence(text: str) -> str:
    """The text with its first letter in upper case; unlike str.capitalize, names such as CLIP keep their case."""
    return text[:1].upper() + text[1:]


def render_report(tables: ResultTables, out_dir: Path, protocol: Protocol | None = None) -> str:
    """Writes the figures under out_dir/figures and returns the markdown that links them."""
    figures = out_dir / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    meta = tables.metadata
    subjects = list(dict.fromkeys(tables.runs["subject"]))
    lines = [f"# Report: {meta.get('protocol')}", ""]
    if tables.pipeline_check_only:
        lines += [f"> **{BANNER}.** {_sentence(str(meta.get('pipeline_check_reason') or ''))}: the numbers and "
                  "images below only show that every stage of the pipeline runs; they say nothing about DreamBooth "
                  "or about these settings.", ""]
    if meta.get("scope_note"):
        lines += [f"> **Scope.** {_sentence(str(meta['scope_note']))}.", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    lines += ["## Verdict", ""]
    for subject in subjects:
        lines += [f"**{subject}**", "", *verdict(tables, subject), ""]
    lines += ["Each comparison above uses 95% bootstrap intervals over (prompt, seed) groups; where intervals "
              "overlap the report says so instead of ranking.", ""]
    lines += ["## Setup", "", *_setup(tables, protocol), "", "### Metrics", "", *metric_definitions(tables), ""]
    lines += paper_comparison(tables)
    for subject in subjects:
        if varies_method(tables):
            preferred = {kind: _preferred_prompts(protocol, subject, kind) for kind in ("subject", "class")}
            lines += [f"## Methods compared: {subject}", "",
                      *method_comparison(tables, subject, figures, out_dir, _safe_name(subject), preferred), ""]
        lines += [f"## Results: {subject}", "", *results_table(tables, subject), ""]
        lines += _figures_for_subject(tables, subject, figures, out_dir, protocol)
    lines += ["## Failed runs", "", *_failures(tables), ""]
    lines += _timings(tables)
    files = ", ".join(f"[{n}]({_link(tables.folder / n, out_dir)})" for n in (RUNS_CSV, IMAGES_CSV, REFERENCES_CSV,
                                                                             METADATA_FILE))
    lines += ["## Data", "", f"Every number above comes from {files} (load them with `pandas.read_csv`).", ""]
    return "\n".join(lines)


def _remove_stale_figures(figures: Path, linked: str) -> None:
    for png in figures.glob("*.png"):
        if f"{FIGURES_DIR}/{png.name}" not in linked:
            png.unlink()


def write_report(protocol: Protocol, results_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """Writes reports/<protocol>/report.md and its figures from results/<protocol>/; returns the report's path."""
    from harness.store import atomic_write_text

    tables = load_results(Path(results_dir) if results_dir is not None else protocol.results_dir)
    out = Path(out_dir) if out_dir is not None else protocol.reports_dir
    out.mkdir(parents=True, exist_ok=True)
    text = render_report(tables, out, protocol)
    _remove_stale_figures(out / FIGURES_DIR, text)
    atomic_write_text(out / REPORT_FILE, text)
    return out / REPORT_FILE
