"""The report's plots, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change).

One PNG per subject and kind, each written atomically: metrics against training steps with their intervals as bands
(`plot_metrics_vs_steps`), fidelity against drift (`plot_frontier`: DINO against PRES; `plot_method_frontier`: one
line per method) and diversity against the grid (`plot_diversity`). Each returns the path it wrote, or None when
the rows have nothing to plot.

What this module does not hold: the image grids (grids.py), the tables, intervals and labels it plots from
(tables.py), or the markdown that links the figures (markdown.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.metrics import metric_names
from harness.report.tables import (
    BANNER,
    FIELD_LABELS,
    REFERENCE_LABELS,
    ResultTables,
    available,
    config_label,
    estimate,
    field_value,
    legend_title,
    method_order,
    metric_label,
    ok_rows,
    reference,
    run_groups,
    to_float,
    uses_prior,
    value_text,
)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _mark_pipeline_check(figure: Figure, tables: ResultTables) -> None:
    """A figure of a tiny-model study says so itself, across its face, wherever it is copied to."""
    if not tables.pipeline_check_only:
        return
    figure.text(0.5, 0.5, BANNER.replace(": ", "\n"), ha="center", va="center", rotation=20, fontsize=22,
                color="tab:red", alpha=0.35, weight="bold", zorder=10)


def _save(figure: Figure, path: Path) -> Path:
    from harness.store import atomic_path  # temp file in the folder + os.replace

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
    return path


COLOUR_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
# One marker per series, and a small sideways offset, so that two series with the same values both stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
DODGE_FRACTION = 0.012  # of the x range, between neighbouring series


def series_marker(index: int) -> str:
    return MARKERS[index % len(MARKERS)]


def dodge(index: int, count: int, span: float) -> float:
    """The x offset of series `index` of `count`, centred on 0, so that equal points sit side by side."""
    return (index - (count - 1) / 2) * DODGE_FRACTION * (span if span > 0 else 1.0)


def _distinct_colours(keys: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: palette(i % palette.N) for i, k in enumerate(keys)}


def _run_colours(tables: ResultTables, groups: list[tuple[str, pd.DataFrame]]) -> dict[str, Any]:
    """One colour family per value of the first grid field (the prior weight), shades within it for the rest."""
    from matplotlib import colormaps

    keys = [k for k, _ in groups]
    if not tables.varied:
        return _distinct_colours(keys)
    families: dict[str, list[str]] = {}
    for key, group in groups:
        families.setdefault(field_value(group.iloc[0], tables.varied[0]), []).append(key)
    if len(families) == len(keys) or len(families) > len(COLOUR_FAMILIES):
        return _distinct_colours(keys)
    colours = {}
    for family, members in zip(COLOUR_FAMILIES, families.values(), strict=False):
        for j, key in enumerate(members):
            shade = 0.75 if len(members) == 1 else 0.45 + 0.5 * j / (len(members) - 1)
            colours[key] = colormaps[family](shade)
    return colours


def _metric_title(metric: str, higher: bool) -> str:
    return f"{metric_label(metric)} ({'higher' if higher else 'lower'} is better)"


def _draw_reference_lines(ax: Any, tables: ResultTables, subject: str, metric: str) -> None:
    styles = {"base_model": dict(color="0.45", linestyle="--"), "real_images": dict(color="black", linestyle=":")}
    for kind, style in styles.items():
        ref = reference(tables, subject, kind)
        if ref is None or not estimate(ref, metric).known:
            continue
        e = estimate(ref, metric)
        ax.axhline(e.mean, linewidth=1.3, label=REFERENCE_LABELS[kind], **style)
        if e.has_interval:
            ax.axhspan(e.low, e.high, color=style["color"], alpha=0.08, linewidth=0)


def plot_metrics_vs_steps(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """One panel per metric: each configuration's mean against the snapshot step, with its interval as a band."""
    rows = ok_rows(tables, subject)
    metrics = available(rows, metric_names())
    if rows.empty or not metrics:
        return None
    groups = run_groups(rows)
    colours = _run_colours(tables, groups)
    band_alpha = 0.15 if len(groups) <= 3 else 0.07
    columns = min(3, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    figure = _new_figure(4.4 * columns, 3.3 * lines + 0.9)
    axes = figure.subplots(lines, columns, squeeze=False)
    steps = sorted(rows["step"].unique())
    span = float(steps[-1] - steps[0])
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, (key, group) in enumerate(groups):
            label = config_label(group.iloc[0], tables.varied, step=False)
            x = group["step"].to_numpy() + dodge(i, len(groups), span)
            ax.plot(x, group[metric], marker=series_marker(i), markersize=4.5, color=colours[key], label=label)
            ax.fill_between(x, group[f"{metric}_ci_low"], group[f"{metric}_ci_high"], color=colours[key],
                            alpha=band_alpha, linewidth=0)
        _draw_reference_lines(ax, tables, subject, metric)
        ax.set_title(_metric_title(metric, tables.higher_is_better[metric]), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric_label(metric))
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9,
                  title=legend_title(tables.varied), title_fontsize=9)
    figure.suptitle(f"{subject}: metrics against training steps (bands: 95% intervals; series side by side where "
                    "they meet)", fontsize=12)
    _mark_pipeline_check(figure, tables)
    return _save(figure, path)


def plot_frontier(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """DINO against PRES, one point per configuration (run x step), each run's steps joined in order."""
    rows = ok_rows(tables, subject)
    if rows.empty or not {"dino", "pres"} <= set(available(rows, ("dino", "pres"))):
        return None
    groups = run_groups(rows)
    colours = _run_colours(tables, groups)
    steps = sorted(rows["step"].unique())
    sizes = {s: 4 + 6 * i / max(1, len(steps) - 1) for i, s in enumerate(steps)}
    figure = _new_figure(8.4, 7.0)
    ax = figure.subplots()
    for i, (key, group) in enumerate(groups):
        group = group[group["dino"].notna() & group["pres"].notna()]
        if group.empty:
            continue
        ax.errorbar(group["pres"], group["dino"],
                    xerr=[group["pres"] - group["pres_ci_low"], group["pres_ci_high"] - group["pres"]],
                    yerr=[group["dino"] - group["dino_ci_low"], group["dino_ci_high"] - group["dino"]],
                    linewidth=1.2, elinewidth=0.6, capsize=0, alpha=0.55, color=colours[key])
        ax.scatter(group["pres"], group["dino"], s=[sizes[s] ** 2 for s in group["step"]], color=colours[key],
                   marker=series_marker(i), edgecolors="white", linewidths=0.6, zorder=3,
                   label=config_label(group.iloc[0], tables.varied, step=False))
        last = group.iloc[-1]
        if len(groups) <= 4:  # more labels would collide; marker size still tells the steps apart
            ax.annotate(str(int(last["step"])), (last["pres"], last["dino"]), textcoords="offset points",
                        xytext=(7, 5), fontsize=8, color=colours[key])
    base = reference(tables, subject, "base_model")
    if base is not None and estimate(base, "dino").known and estimate(base, "pres").known:
        b_dino, b_pres = estimate(base, "dino"), estimate(base, "pres")
        ax.errorbar([b_pres.mean], [b_dino.mean], xerr=[[b_pres.mean - b_pres.low], [b_pres.high - b_pres.mean]],
                    yerr=[[b_dino.mean - b_dino.low], [b_dino.high - b_dino.mean]], marker="*", markersize=12,
                    color="0.4", linestyle="none", capsize=2, label="base model (step 0)")
        if b_pres.has_interval:
            ax.axvspan(b_pres.low, b_pres.high, color="0.5", alpha=0.08, linewidth=0,
                       label="base model PRES interval")
    real = reference(tables, subject, "real_images")
    if real is not None and estimate(real, "dino").known:
        ax.axhline(estimate(real, "dino").mean, color="black", linestyle=":", linewidth=1.2,
                   label="real images DINO")
    ax.set_xlabel("PRES: class-prompt images vs the subject (lower = less drift)")
    ax.set_ylabel("DINO: subject fidelity (higher is better)")
    figure.suptitle(f"{subject}: fidelity against language drift (better: up and to the left)", fontsize=12)
    ax.set_title(f"each run's snapshots joined in step order ({', '.join(str(int(s)) for s in steps)}); "
                 "marker size grows with the step", fontsize=9)
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=4, fontsize=8, title=legend_title(tables.varied),
                  title_fontsize=8)
    _mark_pipeline_check(figure, tables)
    return _save(figure, path)


def _diversity_axis(tables: ResultTables) -> str | None:
    if "prior_loss_weight" in tables.varied:
        return "prior_loss_weight"
    return tables.varied[0] if tables.varied else None


def plot_diversity(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """Diversity at the last common step against the prior weight, one line per class-image count."""
    rows = ok_rows(tables, subject)
    metrics = available(rows, ("div_subject", "div_class", "div_lpips", "div_lpips_class"))
    if rows.empty or not metrics:
        return None
    step = int(rows["step"].max())
    rows = rows[rows["step"] == step]
    x_field = _diversity_axis(tables)
    others = [k for k in tables.varied if k != x_field]
    figure = _new_figure(4.6 * len(metrics), 4.2)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        series = _diversity_series(rows, x_field, others)
        colours = _distinct_colours(list(series))
        span = _x_span(rows, x_field)
        for i, (label, points) in enumerate(series.items()):
            xs = [_x_position(p, x_field, rows) + dodge(i, len(series), span) for p in points]
            e = [estimate(p, metric) for p in points]
            ax.errorbar(xs, [v.mean for v in e], yerr=[[v.mean - v.low for v in e], [v.high - v.mean for v in e]],
                        marker=series_marker(i), capsize=3, color=colours[label], label=label)
        _draw_reference_lines(ax, tables, subject, metric)
        ax.set_title(_metric_title(metric, tables.higher_is_better[metric]), fontsize=10)
        ax.set_ylabel(metric_label(metric))
        _label_diversity_axis(ax, x_field, rows)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9)
    shared = " (prior weight 0 uses no class images: its point starts every line)" \
        if x_field == "prior_loss_weight" and others else ""
    figure.suptitle(f"{subject}: diversity at step {step}, bars 95% intervals{shared}", fontsize=11)
    _mark_pipeline_check(figure, tables)
    return _save(figure, path)


def _diversity_series(rows: pd.DataFrame, x_field: str | None, others: list[str]) -> dict[str, list[pd.Series]]:
    """Lines of the diversity plot: one per value of the other grid fields; runs without a prior weight start
    every line, since their class-image count means nothing."""
    records = [r for _, r in rows.iterrows()]
    if x_field is None:
        return {"configuration": records}
    shared = [r for r in records if x_field == "prior_loss_weight" and not uses_prior(r)]
    series: dict[str, list[pd.Series]] = {}
    for r in records:
        if any(r is s for s in shared):
            continue
        label = ", ".join(f"{FIELD_LABELS.get(k, k)} {field_value(r, k)}" for k in others) or "all runs"
        series.setdefault(label, []).append(r)
    if not series and shared:
        series["all runs"] = []
    for label in series:
        series[label] = sorted(shared + series[label], key=lambda r: to_float(r.get(x_field)))
    return series


def _x_span(rows: pd.DataFrame, x_field: str | None) -> float:
    """The width of the x axis the series are spread over: the values' range, or 5 for categories."""
    if not _numeric_axis(rows, x_field):
        return 5.0
    values = sorted(rows[x_field].dropna().unique())
    return float(values[-1] - values[0]) if len(values) > 1 else 1.0


def _numeric_axis(rows: pd.DataFrame, x_field: str | None) -> bool:
    return x_field is not None and pd.api.types.is_numeric_dtype(rows[x_field]) \
        and not pd.api.types.is_bool_dtype(rows[x_field])


def _x_position(row: pd.Series, x_field: str | None, rows: pd.DataFrame) -> float:
    if _numeric_axis(rows, x_field):
        return float(row[x_field])
    categories = _categories(rows, x_field)
    return float(categories.index(_category(row, x_field)))


def _category(row: pd.Series, x_field: str | None) -> str:
    return value_text(row[x_field]) if x_field else str(row["run_key"])


def _categories(rows: pd.DataFrame, x_field: str | None) -> list[str]:
    return list(dict.fromkeys(_category(r, x_field) for _, r in rows.iterrows()))


def _label_diversity_axis(ax: Any, x_field: str | None, rows: pd.DataFrame) -> None:
    ax.set_xlabel(FIELD_LABELS.get(x_field, x_field) if x_field else "configuration")
    if _numeric_axis(rows, x_field):
        ax.set_xticks(sorted(rows[x_field].unique()))
    else:
        categories = _categories(rows, x_field)
        ax.set_xticks(range(len(categories)), categories)


def plot_method_frontier(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """DINO against PRES with one line per method: every snapshot of the method as a faint point, and its frontier
    (the snapshots no other snapshot of the method beats on both DINO and PRES) joined in PRES order."""
    rows = ok_rows(tables, subject)
    if rows.empty or "method" not in rows or not {"dino", "pres"} <= set(available(rows, ("dino", "pres"))):
        return None
    rows = rows[rows["dino"].notna() & rows["pres"].notna()]
    methods = method_order(tables, rows)
    colours = _distinct_colours(methods)
    figure = _new_figure(8.4, 7.0)
    ax = figure.subplots()
    for method in methods:
        own = rows[rows["method"] == method]
        ax.scatter(own["pres"], own["dino"], s=18, color=colours[method], alpha=0.3, linewidths=0)
        front = frontier(own)
        ax.errorbar(front["pres"], front["dino"],
                    xerr=[front["pres"] - front["pres_ci_low"], front["pres_ci_high"] - front["pres"]],
                    yerr=[front["dino"] - front["dino_ci_low"], front["dino_ci_high"] - front["dino"]],
                    marker="o", markersize=6, linewidth=1.8, elinewidth=0.6, capsize=0, color=colours[method],
                    label=f"{method} (frontier of {len(own)} snapshots)")
    base = reference(tables, subject, "base_model")
    if base is not None and estimate(base, "dino").known and estimate(base, "pres").known:
        b_dino, b_pres = estimate(base, "dino"), estimate(base, "pres")
        ax.plot([b_pres.mean], [b_dino.mean], marker="*", markersize=14, color="0.4", linestyle="none",
                label="base model (step 0)")
        if b_pres.has_interval:
            ax.axvspan(b_pres.low, b_pres.high, color="0.5", alpha=0.08, linewidth=0,
                       label="base model PRES interval")
    real = reference(tables, subject, "real_images")
    if real is not None and estimate(real, "dino").known:
        ax.axhline(estimate(real, "dino").mean, color="black", linestyle=":", linewidth=1.2, label="real images DINO")
    ax.set_xlabel("PRES: class-prompt images vs the subject (lower = less drift)")
    ax.set_ylabel("DINO: subject fidelity (higher is better)")
    figure.suptitle(f"{subject}: fidelity against drift per method (better: up and to the left)", fontsize=12)
    ax.set_title("faint points: every configuration and step; lines: each method's frontier, 95% intervals",
                 fontsize=9)
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=3, fontsize=8)
    return _save(figure, path)


def frontier(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows no other row beats on both DINO (higher) and PRES (lower), in PRES order."""
    ordered = rows.sort_values(["pres", "dino"], ascending=[True, False])
    keep, best = [], -math.inf
    for index, row in ordered.iterrows():
        if row["dino"] > best:
            keep.append(index)
            best = row["dino"]
    return ordered.loc[keep]
