"""The markdown report of a protocol, with its plots and image grids, built from the CSVs of harness/results.

`write_report(protocol)` reads results/<protocol>/ (runs.csv, images.csv, references.csv, metadata.json) and writes
reports/<protocol>/report.md with figures/*.png beside it, for a reader choosing settings: the setup, a verdict
generated from the numbers, one table per subject (intervals shown, best marked, ties said), metric-versus-step
curves, the fidelity-drift frontier, diversity against the grid, image grids and the failed runs.
It never ranks two configurations whose intervals overlap without saying so.

    tables.py    the CSVs read back (`load_results`), intervals (`Estimate`), labels, row selections
    verdict.py   the sentences: fidelity at acceptable drift, prior effect, overfitting, best per metric
    methods.py   the method comparison of a study that varies `method`: frontier, best per method, cost, grids
    figures.py   matplotlib plots: metrics against steps, fidelity-drift frontier (per method too), diversity
    grids.py     PIL image grids (`compose_grid`, `image_grid`, `run_grid`)
    definitions.py  how every number was computed: metric recipes and backbones (`metric_definitions`)
    paper.py     the comparison with the DreamBooth paper's Table 1, with the paper's backbones only
    markdown.py  the report itself (`render_report`, `write_report`)

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend change); grids use PIL.
Nothing here reads a run folder or computes a metric: the CSVs are the only input. This file only re-exports;
`verdict` (the function) is not re-exported, since the name belongs to the submodule: import it from
harness.report.verdict.
"""

from __future__ import annotations

from harness.report.figures import COLOUR_FAMILIES, plot_diversity, plot_frontier, plot_metrics_vs_steps
from harness.report.grids import LABEL_WIDTH, PAD, TILE, compose_grid, image_grid
from harness.report.markdown import BANNER, FIGURES_DIR, REPORT_FILE, render_report, results_table, write_report
from harness.report.tables import (
    FIELD_LABELS,
    REFERENCE_LABELS,
    SHORT_FIELD_LABELS,
    TIED,
    Estimate,
    ResultTables,
    config_label,
    estimate,
    field_value,
    load_results,
    metric_label,
)
from harness.report.verdict import best_sentences

__all__ = [
    "BANNER",
    "COLOUR_FAMILIES",
    "FIELD_LABELS",
    "FIGURES_DIR",
    "LABEL_WIDTH",
    "PAD",
    "REFERENCE_LABELS",
    "REPORT_FILE",
    "SHORT_FIELD_LABELS",
    "TIED",
    "TILE",
    "Estimate",
    "ResultTables",
    "best_sentences",
    "compose_grid",
    "config_label",
    "estimate",
    "field_value",
    "image_grid",
    "load_results",
    "metric_label",
    "plot_diversity",
    "plot_frontier",
    "plot_metrics_vs_steps",
    "render_report",
    "results_table",
    "write_report",
]
