"""Image grids drawn with PIL: tiles of images under a title, with column headers and labelled rows.

`compose_grid` lays out any labelled grid (the inference notebook uses it too); `image_grid` fills one from the
result tables and writes it atomically: a row per configuration, a column per snapshot step after the base model,
the same prompt and seed throughout, and the subject's real images as a strip on top. `run_grid` does the same for
rows the caller chooses (the method comparison's one row per method).

What this module does not hold: the matplotlib plots (figures.py) or the markdown that links the grids
(markdown.py). Besides the tables, it reads only the image files they point to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from harness.report.tables import (
    BANNER,
    IDENTIFIER_SLOT,
    ResultTables,
    config_label,
    ok_rows,
    prompt_template,
    prompt_templates,
    run_groups,
    subject_identifier,
)

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


NOTICE_COLOUR = (200, 30, 30)


def compose_grid(title: str, column_labels: list[str], rows: list[tuple[str, list[Path | None]]],
                 strip: tuple[str, list[Path]] | None = None, notice: str | None = None) -> Image.Image:
    """A labelled grid of tiles: a notice in red (a pipeline check), a title, an optional strip of reference
    images, column headers, labelled rows."""
    columns = max([len(column_labels)] + [len(paths) for _, paths in rows])
    width = LABEL_WIDTH + columns * (TILE + PAD) + PAD
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_font, label_font = _font(17), _font(14)
    notice_lines = _wrap(scratch, notice, title_font, width - 2 * PAD) if notice else []
    title_lines = _wrap(scratch, title, title_font, width - 2 * PAD)
    title_height = 24 * (len(notice_lines) + len(title_lines)) + PAD
    header_lines = max((len(_wrap(scratch, c, label_font, TILE)) for c in column_labels), default=1)
    header_height = 18 * header_lines + PAD
    strip_height = TILE + 2 * PAD + 4 if strip else 0
    height = title_height + strip_height + header_height + len(rows) * (TILE + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for line, colour in [*((n, NOTICE_COLOUR) for n in notice_lines), *((t, "black") for t in title_lines)]:
        draw.text((PAD, y), line, fill=colour, font=title_font)
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
    """The first preferred prompt template (the protocol's order) that has images, and the smallest seed it was
    drawn with. Prompts are compared as templates (`prompt_templates`), so runs that name the subject with another
    token line up with the base model."""
    candidates = images[(images["prompt_kind"] == kind) & (images["source"] == "snapshot")]
    if candidates.empty:
        return None
    present = set(candidates["template"])
    template = next((p for p in preferred if p in present), sorted(present)[0])
    seeds = candidates[candidates["template"] == template]["seed"].dropna()
    return template, int(seeds.min())


def _find_image(images: pd.DataFrame, tables: ResultTables, **match: Any) -> Path | None:
    selected = images
    for column, value in match.items():
        selected = selected[selected[column] == value]
    return _image_path(tables, selected.iloc[0]["path"]) if len(selected) else None


def image_grid(tables: ResultTables, subject: str, kind: str, preferred_prompts: Sequence[str],
               path: Path) -> tuple[Path, str, int] | None:
    """Rows: configurations; columns: the base model then the snapshot steps; same prompt and seed throughout."""
    rows = ok_rows(tables, subject)
    labelled = [(config_label(group.iloc[0], tables.varied, step=False), key) for key, group in run_groups(rows)]
    return run_grid(tables, subject, kind, preferred_prompts, labelled, "Rows: configurations", path)


def run_grid(tables: ResultTables, subject: str, kind: str, preferred_prompts: Sequence[str],
             rows: Sequence[tuple[str, str]], what_rows: str, path: Path) -> tuple[Path, str, int] | None:
    """A grid of the given (label, run_key) rows: the base model then each snapshot step, one prompt and seed.
    Returns (path, the prompt as the base model reads it, seed), or None when there is nothing to show."""
    images = tables.images[tables.images["subject"] == subject].copy()
    images["template"] = prompt_templates(tables, images)
    preferred = [prompt_template(p, subject_identifier(tables, subject)) for p in preferred_prompts]
    chosen = _pick_prompt(images, kind, preferred)
    scored = ok_rows(tables, subject)
    if chosen is None or scored.empty or not rows:
        return None
    template, seed = chosen
    same = images[(images["template"] == template) & (images["seed"] == seed)]
    steps = sorted(int(s) for s in scored[scored["run_key"].isin([k for _, k in rows])]["step"].unique())
    base = _find_image(same, tables, source="base_model")
    grid_rows = [(label, [base] + [_find_image(same, tables, source="snapshot", run_key=key, step=s) for s in steps])
                 for label, key in rows]
    real = [p for p in (_image_path(tables, v) for v in images[images["source"] == "real_images"]["path"]) if p]
    prompt = template.replace(IDENTIFIER_SLOT, subject_identifier(tables, subject) or IDENTIFIER_SLOT)
    what = "subject prompt" if kind == "subject" else "class prompt (language drift made visible)"
    title = f"{subject}: {what} \"{prompt}\", seed {seed}. {what_rows}; columns: training steps."
    grid = compose_grid(title, ["base model (step 0)"] + [f"step {s}" for s in steps], grid_rows,
                        strip=("real images (the subject)", real) if real else None,
                        notice=f"{BANNER}." if tables.pipeline_check_only else None)
    from harness.store import atomic_path

    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path, prompt, seed
