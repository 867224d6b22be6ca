"""The report's account of how every number was computed: one table of metric recipes, one of backbones.

Both come from results/<protocol>/metadata.json: the recipe of each metric (metrics.Metric.recipe: scale, pairing,
negative cosines, the identifier in the prompt, the real-images row) and the backbones as they described themselves
when they scored (weights, resize, crop, interpolation, normalisation). Nothing here is written twice: a metric's
facts live on the registered metric, a backbone's on its embedder.

What this module does not hold: the rest of the report (markdown.py), the facts themselves (metrics.py,
embedders.py, perceptual.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.metrics import metric_names
from harness.report.tables import ResultTables, metric_label

BACKBONE_FACTS = ("resize", "crop", "interpolation", "normalisation")


def _cell(text: Any) -> str:
    return str(text if text not in (None, "") else "—").replace("|", "\\|").replace("\n", " ")


def _computed(tables: ResultTables, metric: str) -> bool:
    return bool(tables.runs[metric].notna().any() or tables.references[metric].notna().any())


def metric_definitions(tables: ResultTables) -> list[str]:
    """The metrics table (what each measures and how it pairs, scales and reads) and the backbones table."""
    lines = ["| metric | what it measures | direction | scale | pairing | negative cosines | identifier in the "
             "prompt | real-images row | backbone |", "|---|---|---|---|---|---|---|---|---|"]
    for m in metric_names():
        info = tables.metadata.get("metrics", {}).get(m, {})
        notes = "; ".join(info.get("notes") or [])
        what = info.get("description", "") + ("" if _computed(tables, m) else
                                              f" — *not computed*{': ' + notes if notes else ''}")
        real = "leave-one-out" if str(info.get("real_images_row", "")).startswith("leave-one-out") else "—"
        cells = [f"{metric_label(m)} (`{m}`)", what, "higher is better" if info.get("higher_is_better") else
                 "lower is better", info.get("scale"), info.get("pairing"),
                 info.get("negative_cosines"), info.get("identifier"), real,
                 info.get("backbone") or "—"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Leave-one-out: each real image against the other real images of its subject (the paper's \"Real "
                  "Images\" row). Identifier removed: the subject's token (e.g. `sks`, or a modifier token such as "
                  "`<new1>`) is taken out of the prompt before the prompt is encoded.", ""]
    return lines + backbone_table(tables.metadata.get("backbones", {}))


def backbone_table(backbones: Mapping[str, Any]) -> list[str]:
    """One row per backbone role: model, weights and each preprocessing step."""
    if not backbones:
        return ["Backbones: not recorded."]
    lines = ["| backbone role | model | weights | resize | crop | interpolation | normalisation | output |",
             "|---|---|---|---|---|---|---|---|"]
    for role, entry in backbones.items():
        details = entry.get("details") if isinstance(entry, Mapping) else None
        details = details if isinstance(details, Mapping) else {}
        steps = [details.get(fact) for fact in BACKBONE_FACTS]
        if not any(steps):  # a record from before the steps were recorded: its preprocessing in one sentence
            steps = [details.get("preprocessing"), None, None, None]
        cells = [f"`{role}`", f"`{entry.get('label', '')}`: {details.get('model_id', '')}",
                 details.get("pretrained"), *steps, details.get("metric_scale")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines
