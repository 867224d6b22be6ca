"""The markdown report of a protocol, with its plots and image grids, built from the CSVs of results.py.

`write_report(protocol)` reads results/<protocol>/ (runs.csv, images.csv, references.csv, metadata.json) and writes
reports/<protocol>/report.md with figures/*.png beside it, for a reader choosing settings: the setup, a verdict
generated from the numbers, one table per subject (intervals shown, best marked, ties said), metric-versus-step
curves, the fidelity-drift frontier, diversity against the grid, image grids and the failed runs.
It never ranks two configurations whose intervals overlap without saying so.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend change); grids use PIL.
Nothing here reads a run folder or computes a metric: the CSVs are the only input.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from harness.config import Protocol
from harness.results import IMAGES_CSV, METADATA_FILE, METRIC_NAMES, REFERENCES_CSV, RUNS_CSV

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
BANNER = "Pipeline check only: tiny random models, no quality conclusions"
TIED = "tied within intervals"

METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES",
                 "div_subject": "DIV (subject prompts)", "div_class": "DIV (class prompts)",
                 "div_lpips": "DIV (LPIPS)"}
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
        return {m: bool(self.metadata.get("metrics", {}).get(m, {}).get("higher_is_better", m != "pres"))
                for m in METRIC_NAMES}

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


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def estimate(row: pd.Series | dict[str, Any], metric: str) -> Estimate:
    return Estimate(_float(row.get(metric)), _float(row.get(f"{metric}_ci_low")), _float(row.get(f"{metric}_ci_high")))


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:g}"
    return str(value)


def _uses_prior(row: pd.Series | dict[str, Any]) -> bool:
    weight = _float(row.get("prior_loss_weight"))
    return math.isnan(weight) or weight > 0


def field_value(row: pd.Series | dict[str, Any], name: str) -> str:
    """A grid value as shown; the class-image count of a run without prior preservation means nothing."""
    if name == "num_class_images" and not _uses_prior(row):
        return "—"
    return _value_text(row.get(name))


def config_label(row: pd.Series | dict[str, Any], varied: Sequence[str], step: bool = True) -> str:
    """A compact name of a configuration, e.g. 'w=1, n=4 @ 400'."""
    parts = [f"{SHORT_FIELD_LABELS.get(k, k)}={field_value(row, k)}" for k in varied
             if field_value(row, k) != "—"]
    name = ", ".join(parts) or "default settings"
    return f"{name} @ {int(row['step'])}" if step else name


def _metric_title(metric: str, higher: bool) -> str:
    return f"{METRIC_LABELS.get(metric, metric)} ({'higher' if higher else 'lower'} is better)"


def _available(frame: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    return [m for m in metrics if m in frame and frame[m].notna().any()]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "subject"


def _best(rows: list[pd.Series], metric: str, higher: bool) -> tuple[int | None, list[int]]:
    """Index of the best row for a metric and the indices of rows tied with it within intervals."""
    known = [(i, estimate(r, metric)) for i, r in enumerate(rows) if estimate(r, metric).known]
    if not known:
        return None, []
    best_index, best = max(known, key=lambda ie: ie[1].mean if higher else -ie[1].mean)
    tied = [i for i, e in known if i != best_index and e.overlaps(best)]
    return best_index, tied


def _names(labels: list[str], limit: int = 4) -> str:
    if len(labels) <= limit:
        return "; ".join(labels)
    return "; ".join(labels[:limit]) + f"; and {len(labels) - limit} more"


# --------------------------------------------------------------------------------------------------------------
# Figures (matplotlib object API on Agg)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    from harness.store import atomic_path  # temp file in the folder + os.replace

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
    return path


COLOUR_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


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


def _ok_rows(tables: ResultTables, subject: str) -> pd.DataFrame:
    runs = tables.runs
    return runs[(runs["subject"] == subject) & (runs["status"] == "ok")]


def _reference(tables: ResultTables, subject: str, kind: str) -> pd.Series | None:
    refs = tables.references
    rows = refs[(refs["subject"] == subject) & (refs["reference"] == kind)]
    return rows.iloc[0] if len(rows) else None


def _run_groups(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(run_key, its rows sorted by step) in table order."""
    order = list(dict.fromkeys(rows["run_key"]))
    return [(key, rows[rows["run_key"] == key].sort_values("step")) for key in order]


def _draw_reference_lines(ax: Any, tables: ResultTables, subject: str, metric: str) -> None:
    styles = {"base_model": dict(color="0.45", linestyle="--"), "real_images": dict(color="black", linestyle=":")}
    for kind, style in styles.items():
        ref = _reference(tables, subject, kind)
        if ref is None or not estimate(ref, metric).known:
            continue
        e = estimate(ref, metric)
        ax.axhline(e.mean, linewidth=1.3, label=REFERENCE_LABELS[kind], **style)
        if e.has_interval:
            ax.axhspan(e.low, e.high, color=style["color"], alpha=0.08, linewidth=0)


def plot_metrics_vs_steps(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """One panel per metric: each configuration's mean against the snapshot step, with its interval as a band."""
    rows = _ok_rows(tables, subject)
    metrics = _available(rows, METRIC_NAMES)
    if rows.empty or not metrics:
        return None
    groups = _run_groups(rows)
    colours = _run_colours(tables, groups)
    band_alpha = 0.15 if len(groups) <= 3 else 0.07
    columns = min(3, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    figure = _new_figure(4.4 * columns, 3.3 * lines + 0.9)
    axes = figure.subplots(lines, columns, squeeze=False)
    steps = sorted(rows["step"].unique())
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for key, group in groups:
            label = config_label(group.iloc[0], tables.varied, step=False)
            x = group["step"].to_numpy()
            ax.plot(x, group[metric], marker="o", markersize=4, color=colours[key], label=label)
            ax.fill_between(x, group[f"{metric}_ci_low"], group[f"{metric}_ci_high"], color=colours[key],
                            alpha=band_alpha, linewidth=0)
        _draw_reference_lines(ax, tables, subject, metric)
        ax.set_title(_metric_title(metric, tables.higher_is_better[metric]), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9,
                  title=_legend_title(tables.varied), title_fontsize=9)
    figure.suptitle(f"{subject}: metrics against training steps (bands: 95% intervals)", fontsize=12)
    return _save(figure, path)


def _legend_title(varied: Sequence[str]) -> str | None:
    shown = [f"{SHORT_FIELD_LABELS[k]} = {FIELD_LABELS.get(k, k)}" for k in varied if k in SHORT_FIELD_LABELS]
    return ", ".join(shown) or None


def plot_frontier(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """DINO against PRES, one point per configuration (run x step), each run's steps joined in order."""
    rows = _ok_rows(tables, subject)
    if rows.empty or not {"dino", "pres"} <= set(_available(rows, ("dino", "pres"))):
        return None
    groups = _run_groups(rows)
    colours = _run_colours(tables, groups)
    steps = sorted(rows["step"].unique())
    sizes = {s: 4 + 6 * i / max(1, len(steps) - 1) for i, s in enumerate(steps)}
    figure = _new_figure(8.4, 7.0)
    ax = figure.subplots()
    for key, group in groups:
        group = group[group["dino"].notna() & group["pres"].notna()]
        if group.empty:
            continue
        ax.errorbar(group["pres"], group["dino"],
                    xerr=[group["pres"] - group["pres_ci_low"], group["pres_ci_high"] - group["pres"]],
                    yerr=[group["dino"] - group["dino_ci_low"], group["dino_ci_high"] - group["dino"]],
                    linewidth=1.2, elinewidth=0.6, capsize=0, alpha=0.55, color=colours[key])
        ax.scatter(group["pres"], group["dino"], s=[sizes[s] ** 2 for s in group["step"]], color=colours[key],
                   edgecolors="white", linewidths=0.6, zorder=3,
                   label=config_label(group.iloc[0], tables.varied, step=False))
        last = group.iloc[-1]
        if len(groups) <= 4:  # more labels would collide; marker size still tells the steps apart
            ax.annotate(str(int(last["step"])), (last["pres"], last["dino"]), textcoords="offset points",
                        xytext=(7, 5), fontsize=8, color=colours[key])
    base = _reference(tables, subject, "base_model")
    if base is not None and estimate(base, "dino").known and estimate(base, "pres").known:
        b_dino, b_pres = estimate(base, "dino"), estimate(base, "pres")
        ax.errorbar([b_pres.mean], [b_dino.mean], xerr=[[b_pres.mean - b_pres.low], [b_pres.high - b_pres.mean]],
                    yerr=[[b_dino.mean - b_dino.low], [b_dino.high - b_dino.mean]], marker="*", markersize=12,
                    color="0.4", linestyle="none", capsize=2, label="base model (step 0)")
        if b_pres.has_interval:
            ax.axvspan(b_pres.low, b_pres.high, color="0.5", alpha=0.08, linewidth=0,
                       label="base model PRES interval")
    real = _reference(tables, subject, "real_images")
    if real is not None and estimate(real, "dino").known:
        ax.axhline(estimate(real, "dino").mean, color="black", linestyle=":", linewidth=1.2,
                   label="real images DINO")
    ax.set_xlabel("PRES: class-prompt images vs the subject (lower = less drift)")
    ax.set_ylabel("DINO: subject fidelity (higher is better)")
    figure.suptitle(f"{subject}: fidelity against language drift (better: up and to the left)", fontsize=12)
    ax.set_title(f"each run's snapshots joined in step order ({', '.join(str(int(s)) for s in steps)}); "
                 "marker size grows with the step", fontsize=9)
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=4, fontsize=8, title=_legend_title(tables.varied),
                  title_fontsize=8)
    return _save(figure, path)


def _diversity_axis(tables: ResultTables) -> str | None:
    if "prior_loss_weight" in tables.varied:
        return "prior_loss_weight"
    return tables.varied[0] if tables.varied else None


def plot_diversity(tables: ResultTables, subject: str, path: Path) -> Path | None:
    """Diversity at the last common step against the prior weight, one line per class-image count."""
    rows = _ok_rows(tables, subject)
    metrics = _available(rows, ("div_subject", "div_class", "div_lpips"))
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
        dodge = _dodge_width(rows, x_field)
        for i, (label, points) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * dodge  # side by side, so equal values stay visible
            xs = [_x_position(p, x_field, rows) + offset for p in points]
            e = [estimate(p, metric) for p in points]
            ax.errorbar(xs, [v.mean for v in e], yerr=[[v.mean - v.low for v in e], [v.high - v.mean for v in e]],
                        marker="o", capsize=3, color=colours[label], label=label)
        _draw_reference_lines(ax, tables, subject, metric)
        ax.set_title(_metric_title(metric, tables.higher_is_better[metric]), fontsize=10)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        _label_diversity_axis(ax, x_field, rows)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9)
    shared = " (prior weight 0 uses no class images: its point starts every line)" \
        if x_field == "prior_loss_weight" and others else ""
    figure.suptitle(f"{subject}: diversity at step {step}, bars 95% intervals{shared}", fontsize=11)
    return _save(figure, path)


def _diversity_series(rows: pd.DataFrame, x_field: str | None, others: list[str]) -> dict[str, list[pd.Series]]:
    """Lines of the diversity plot: one per value of the other grid fields; runs without a prior weight start
    every line, since their class-image count means nothing."""
    records = [r for _, r in rows.iterrows()]
    if x_field is None:
        return {"configuration": records}
    shared = [r for r in records if x_field == "prior_loss_weight" and not _uses_prior(r)]
    series: dict[str, list[pd.Series]] = {}
    for r in records:
        if any(r is s for s in shared):
            continue
        label = ", ".join(f"{FIELD_LABELS.get(k, k)} {field_value(r, k)}" for k in others) or "all runs"
        series.setdefault(label, []).append(r)
    if not series and shared:
        series["all runs"] = []
    for label in series:
        series[label] = sorted(shared + series[label], key=lambda r: _float(r.get(x_field)))
    return series


def _dodge_width(rows: pd.DataFrame, x_field: str | None) -> float:
    if not _numeric_axis(rows, x_field):
        return 0.06
    values = sorted(rows[x_field].dropna().unique())
    span = (values[-1] - values[0]) if len(values) > 1 else 1.0
    return 0.012 * span


def _numeric_axis(rows: pd.DataFrame, x_field: str | None) -> bool:
    return x_field is not None and pd.api.types.is_numeric_dtype(rows[x_field]) \
        and not pd.api.types.is_bool_dtype(rows[x_field])


def _x_position(row: pd.Series, x_field: str | None, rows: pd.DataFrame) -> float:
    if _numeric_axis(rows, x_field):
        return float(row[x_field])
    categories = _categories(rows, x_field)
    return float(categories.index(_category(row, x_field)))


def _category(row: pd.Series, x_field: str | None) -> str:
    return _value_text(row[x_field]) if x_field else str(row["run_key"])


def _categories(rows: pd.DataFrame, x_field: str | None) -> list[str]:
    return list(dict.fromkeys(_category(r, x_field) for _, r in rows.iterrows()))


def _label_diversity_axis(ax: Any, x_field: str | None, rows: pd.DataFrame) -> None:
    ax.set_xlabel(FIELD_LABELS.get(x_field, x_field) if x_field else "configuration")
    if _numeric_axis(rows, x_field):
        ax.set_xticks(sorted(rows[x_field].unique()))
    else:
        categories = _categories(rows, x_field)
        ax.set_xticks(range(len(categories)), categories)


# --------------------------------------------------------------------------------------------------------------
# Image grids (PIL)

TILE = 160
LABEL_WIDTH = 190
PAD = 6


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float:
    return draw.textlength(text, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if _text_width(draw, trial, font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _tile(path: Path | None) -> Image.Image:
    """A square tile of an image (center crop); small images are enlarged without blurring."""
    if path is None or not path.is_file():
        tile = Image.new("RGB", (TILE, TILE), (225, 225, 225))
        draw = ImageDraw.Draw(tile)
        draw.text((TILE // 2, TILE // 2), "missing", fill=(110, 110, 110), font=_font(14), anchor="mm")
        return tile
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        resample = Image.Resampling.NEAREST if side < TILE else Image.Resampling.LANCZOS
        return image.resize((TILE, TILE), resample)


def compose_grid(title: str, column_labels: list[str], rows: list[tuple[str, list[Path | None]]],
                 strip: tuple[str, list[Path]] | None = None) -> Image.Image:
    """A labelled grid of tiles: a title, an optional strip of reference images, column headers, labelled rows."""
    columns = max([len(column_labels)] + [len(paths) for _, paths in rows])
    width = LABEL_WIDTH + columns * (TILE + PAD) + PAD
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_font, label_font = _font(17), _font(14)
    title_lines = _wrap(scratch, title, title_font, width - 2 * PAD)
    title_height = 24 * len(title_lines) + PAD
    header_lines = max((len(_wrap(scratch, c, label_font, TILE)) for c in column_labels), default=1)
    header_height = 18 * header_lines + PAD
    strip_height = TILE + 2 * PAD + 4 if strip else 0
    height = title_height + strip_height + header_height + len(rows) * (TILE + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, fill="black", font=title_font)
        y += 24
    if strip:
        label, paths = strip
        _draw_row(canvas, draw, label, [*paths[:columns]], y, label_font)
        y += TILE + PAD
        draw.line((PAD, y + 2, width - PAD, y + 2), fill=(160, 160, 160), width=2)
        y += PAD + 4
    for c, text in enumerate(column_labels):
        x = LABEL_WIDTH + c * (TILE + PAD)
        for i, line in enumerate(_wrap(draw, text, label_font, TILE)):
            draw.text((x + TILE // 2, y + 18 * i), line, fill="black", font=label_font, anchor="ma")
    y += header_height
    for label, paths in rows:
        _draw_row(canvas, draw, label, paths, y, label_font)
        y += TILE + PAD
    return canvas


def _draw_row(canvas: Image.Image, draw: ImageDraw.ImageDraw, label: str, paths: Sequence[Path | None], y: int,
              font: Any) -> None:
    lines = _wrap(draw, label, font, LABEL_WIDTH - 2 * PAD)
    top = y + (TILE - 18 * len(lines)) // 2
    for i, line in enumerate(lines):
        draw.text((PAD, top + 18 * i), line, fill="black", font=font)
    for c, path in enumerate(paths):
        canvas.paste(_tile(path), (LABEL_WIDTH + c * (TILE + PAD), y))


def _image_path(tables: ResultTables, value: Any) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else (tables.folder / path)


def _pick_prompt(images: pd.DataFrame, kind: str, preferred: Sequence[str]) -> tuple[str, int] | None:
    """The first preferred prompt (the protocol's order) that has images, and the smallest seed it was drawn with."""
    candidates = images[(images["prompt_kind"] == kind) & (images["source"] == "snapshot")]
    if candidates.empty:
        return None
    present = set(candidates["prompt"])
    prompt = next((p for p in preferred if p in present), sorted(present)[0])
    seeds = candidates[candidates["prompt"] == prompt]["seed"].dropna()
    return prompt, int(seeds.min())


def _find_image(images: pd.DataFrame, tables: ResultTables, **match: Any) -> Path | None:
    selected = images
    for column, value in match.items():
        selected = selected[selected[column] == value]
    return _image_path(tables, selected.iloc[0]["path"]) if len(selected) else None


def image_grid(tables: ResultTables, subject: str, kind: str, preferred_prompts: Sequence[str],
               path: Path) -> tuple[Path, str, int] | None:
    """Rows: configurations; columns: the base model then the snapshot steps; same prompt and seed throughout."""
    images = tables.images[tables.images["subject"] == subject]
    chosen = _pick_prompt(images, kind, preferred_prompts)
    rows = _ok_rows(tables, subject)
    if chosen is None or rows.empty:
        return None
    prompt, seed = chosen
    same = images[(images["prompt"] == prompt) & (images["seed"] == seed)]
    steps = sorted(int(s) for s in rows["step"].unique())
    base = _find_image(same, tables, source="base_model")
    grid_rows = []
    for key, group in _run_groups(rows):
        cells = [base] + [_find_image(same, tables, source="snapshot", run_key=key, step=s) for s in steps]
        grid_rows.append((config_label(group.iloc[0], tables.varied, step=False), cells))
    real = [p for p in (_image_path(tables, v) for v in images[images["source"] == "real_images"]["path"]) if p]
    what = "subject prompt" if kind == "subject" else "class prompt (language drift made visible)"
    title = f"{subject}: {what} \"{prompt}\", seed {seed}. Rows: configurations; columns: training steps."
    grid = compose_grid(title, ["base model (step 0)"] + [f"step {s}" for s in steps], grid_rows,
                        strip=("real images (the subject)", real) if real else None)
    from harness.store import atomic_path

    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path, prompt, seed


# --------------------------------------------------------------------------------------------------------------
# Verdict


def _fidelity_at_acceptable_drift(tables: ResultTables, subject: str) -> list[str]:
    rows = [r for _, r in _ok_rows(tables, subject).iterrows()]
    varied = tables.varied
    if not rows or not all(any(estimate(r, m).known for r in rows) for m in ("dino", "pres")):
        return ["DINO or PRES was not computed, so fidelity cannot be weighed against drift."]
    base = _reference(tables, subject, "base_model")
    base_pres = estimate(base, "pres") if base is not None else Estimate(math.nan, math.nan, math.nan)
    if not base_pres.known:
        return ["The base model's PRES is missing, so there is no drift baseline; see the table."]
    limit = base_pres.high if base_pres.has_interval else base_pres.mean
    acceptable = [r for r in rows if estimate(r, "pres").known and estimate(r, "pres").mean <= limit]
    out = []
    if not acceptable:
        least = min((r for r in rows if estimate(r, "pres").known), key=lambda r: estimate(r, "pres").mean)
        out.append(f"No configuration keeps PRES within the base model's interval ({base_pres.text()}): every one "
                   f"drifts. The least drifting is **{config_label(least, varied)}** (PRES "
                   f"{estimate(least, 'pres').text()}, DINO {estimate(least, 'dino').text()}).")
        return out
    best_index, tied = _best(acceptable, "dino", higher=True)
    if best_index is None:
        return ["No configuration with acceptable drift has a DINO value."]
    best = acceptable[best_index]
    out.append(f"Best subject fidelity at acceptable drift (PRES not above the base model's interval, "
               f"{base_pres.text()}): **{config_label(best, varied)}** with DINO {estimate(best, 'dino').text()} "
               f"and PRES {estimate(best, 'pres').text()}.")
    if tied:
        out.append(f"On DINO it is {TIED} with {_names([config_label(acceptable[i], varied) for i in tied])}: "
                   "this data does not separate them; more seeds or prompts would.")
    overall_index, _ = _best(rows, "dino", higher=True)
    overall = rows[overall_index] if overall_index is not None else None
    if overall is not None and estimate(overall, "pres").mean > limit:
        out.append(f"The highest DINO overall, {config_label(overall, varied)} "
                   f"({estimate(overall, 'dino').text()}), pays for it with drift: PRES "
                   f"{estimate(overall, 'pres').text()}.")
    return out


def _overfitting(tables: ResultTables, subject: str) -> list[str]:
    out = []
    for _, group in _run_groups(_ok_rows(tables, subject)):
        label = config_label(group.iloc[0], tables.varied, step=False)
        points = [r for _, r in group.iterrows()]
        if len(points) < 2:
            continue
        out.append(f"{label}: {_onset(points)}")
    return out


def _onset(points: list[pd.Series]) -> str:
    """Where training stops paying: the first step after which CLIP-T falls, or DINO no longer rises, beyond the
    intervals (compared with every later snapshot, so a slow steady gain still counts as rising)."""
    for i, point in enumerate(points[:-1]):
        later = points[i + 1:]
        step = int(point["step"])
        t0, d0 = estimate(point, "clip_t"), estimate(point, "dino")
        fallen = [p for p in later if t0.has_interval and estimate(p, "clip_t").has_interval
                  and estimate(p, "clip_t").high < t0.low]
        if fallen:
            worst = min(fallen, key=lambda p: estimate(p, "clip_t").mean)
            return (f"CLIP-T falls after step {step} ({t0.text()} → {estimate(worst, 'clip_t').text()} at step "
                    f"{int(worst['step'])}): prompt fidelity is being lost, overfitting starts there.")
        if d0.known and not any(d0.has_interval and estimate(p, "dino").has_interval
                                and estimate(p, "dino").low > d0.high for p in later):
            best = max(later, key=lambda p: _float(p.get("dino")) if estimate(p, "dino").known else -math.inf)
            return (f"DINO rises no further beyond the intervals after step {step} ({d0.text()}; best later "
                    f"{estimate(best, 'dino').text()} at step {int(best['step'])}): longer training buys no "
                    "measurable fidelity.")
    return (f"DINO keeps rising and CLIP-T holds up to step {int(points[-1]['step'])}: no sign of overfitting "
            "within the steps sampled; longer training may still help.")


# Axes that a run without prior preservation ignores, so they never separate it from a run with one.
_PRIOR_ONLY_AXES = frozenset({"prior_loss_weight", "num_class_images", "step"})


def _prior_effect(tables: ResultTables, subject: str) -> list[str]:
    """One sentence per configuration without prior, against the best-PRES run with prior that differs from it only
    in the prior's own settings (weight, class images), at the last step."""
    rows = _ok_rows(tables, subject)
    if "prior_loss_weight" not in tables.varied or rows.empty:
        return []
    step = int(rows["step"].max())
    at = [r for _, r in rows[rows["step"] == step].iterrows() if estimate(r, "pres").known]
    others = [k for k in tables.varied if k not in _PRIOR_ONLY_AXES]

    def rest(row: pd.Series) -> tuple:
        return tuple(field_value(row, k) for k in others)

    sentences = []
    for off in (r for r in at if not _uses_prior(r)):
        matches = [r for r in at if _uses_prior(r) and rest(r) == rest(off)]
        if matches:
            on = min(matches, key=lambda r: estimate(r, "pres").mean)
            sentences.append(_prior_sentence(tables, step, off, on, name_off=bool(others)))
    return sentences


def _prior_sentence(tables: ResultTables, step: int, off: pd.Series, on: pd.Series, name_off: bool) -> str:
    p_off, p_on = estimate(off, "pres"), estimate(on, "pres")
    d_off, d_on = estimate(off, "dino"), estimate(on, "dino")
    change = "lowers" if p_on.mean < p_off.mean else "does not lower"
    source = f" ({config_label(off, tables.varied, step=False)})" if name_off else ""
    sentence = (f"At step {step}, prior preservation ({config_label(on, tables.varied, step=False)}) {change} "
                f"PRES from {p_off.text()}{source} to {p_on.text()}")
    sentence += "; the intervals overlap, so the grid does not show a difference." if p_on.overlaps(p_off) else \
        " (intervals apart)."
    if d_on.known and d_off.known:
        cost = "within intervals" if d_on.overlaps(d_off) else "beyond the intervals"
        sentence += f" DINO moves from {d_off.text()} to {d_on.text()} ({cost})."
    return sentence


def verdict(tables: ResultTables, subject: str) -> list[str]:
    """Sentences generated from the numbers; every comparison says when the intervals overlap."""
    lines = [f"- {s}" for s in _fidelity_at_acceptable_drift(tables, subject)]
    lines += [f"- {s}" for s in _prior_effect(tables, subject)]
    onsets = _overfitting(tables, subject)
    if onsets:
        lines.append("- Where overfitting starts (the step after which CLIP-T falls or DINO stops rising beyond "
                     "the intervals):")
        lines += [f"  - {s}" for s in onsets]
    return lines


# --------------------------------------------------------------------------------------------------------------
# Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(tables: ResultTables, subject: str) -> list[str]:
    """The subject's table: references on top, then every scored configuration; best in bold, ties marked."""
    rows = [r for _, r in _ok_rows(tables, subject).iterrows()]
    metrics = _available(pd.concat([_ok_rows(tables, subject), tables.references]), METRIC_NAMES)
    varied = tables.varied
    header = ["configuration", "step",
              *[f"{METRIC_LABELS.get(m, m)} {'↑' if tables.higher_is_better[m] else '↓'}" for m in metrics]]
    lines = []
    if _legend_title(varied):
        lines += [f"Configurations: {_legend_title(varied)}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind in ("real_images", "base_model"):
        ref = _reference(tables, subject, kind)
        if ref is not None:
            step = "" if pd.isna(ref.get("step")) else str(int(ref["step"]))
            cells = [f"*{REFERENCE_LABELS[kind]}*", step, *[estimate(ref, m).text() for m in metrics]]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    marks = {m: _best(rows, m, tables.higher_is_better[m]) for m in metrics}
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


def best_sentences(tables: ResultTables, rows: list[pd.Series], metrics: Sequence[str]) -> list[str]:
    out = []
    for m in metrics:
        best, tied = _best(rows, m, tables.higher_is_better[m])
        if best is None:
            continue
        name = f"{METRIC_LABELS.get(m, m)}: best {config_label(rows[best], tables.varied)} " \
               f"({estimate(rows[best], m).text()})"
        if tied:
            labels = [config_label(rows[i], tables.varied) for i in tied]
            out.append(f"- {name}, {TIED} with {_names(labels)}.")
        elif len(rows) > 1:
            out.append(f"- {name}, clearly: its interval overlaps no other configuration's.")
        else:
            out.append(f"- {name} (the only configuration).")
    return out


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
        f"{model.get('dtype')}.",
        "- Subjects: " + ", ".join(f"{s['name']} (class '{s.get('class_noun')}', token '{s.get('identifier')}')"
                                   for s in meta.get("subjects", [])) + ".",
        "- Grid: " + ("; ".join(f"{FIELD_LABELS.get(k, k)} {v}" for k, v in tables.grid)
                      or "none (one configuration)") + f"; {runs['run_key'].nunique()} training runs, "
        f"{len(runs)} snapshots ({int((runs['status'] == 'ok').sum())} scored).",
        f"- Evaluation: seeds {ev.get('seeds')}, {ev.get('sampler')} with {ev.get('steps')} steps, guidance "
        f"{ev.get('guidance_scale')}; {len(ev.get('class_prompts', []))} class prompts.",
        "- Metric backbones: " + ("; ".join(f"{k}: `{v.get('label')}`" for k, v in meta.get("backbones", {}).items())
                                  or "not recorded") + ". Scores are raw cosines; numbers are comparable only "
        "with the same backbones.",
        f"- Hardware: {', '.join(meta.get('devices') or []) or 'not recorded'}" + _peak_memory(runs) + ".",
        f"- Wall time: {_duration(_wall_seconds(tables))} (training, sampling and scoring of the recorded runs).",
        f"- Harness {meta.get('harness_version')}; protocol file `{meta.get('protocol_path')}`.",
    ]
    return lines


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


def _metric_definitions(tables: ResultTables) -> list[str]:
    lines = ["| metric | direction | scale | backbone | what it measures |", "|---|---|---|---|---|"]
    for m in METRIC_NAMES:
        info = tables.metadata.get("metrics", {}).get(m, {})
        notes = "; ".join(info.get("notes") or [])
        computed = tables.runs[m].notna().any() or tables.references[m].notna().any()
        what = info.get("description", "") + ("" if computed else f" — *not computed*{': ' + notes if notes else ''}")
        lines.append(f"| {METRIC_LABELS.get(m, m)} (`{m}`) | {'higher' if info.get('higher_is_better') else 'lower'}"
                     f" is better | {info.get('scale', '')} | {info.get('backbone') or '—'} | {_md_cell(what)} |")
    return lines


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
                         f"{steps} | {_value_text(first['error_phase'])} | {_md_cell(_value_text(first['error']))} |")
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
    lines += ["## Setup", "", *_setup(tables, protocol), "", "### Metrics", "", *_metric_definitions(tables), ""]
    for subject in subjects:
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
