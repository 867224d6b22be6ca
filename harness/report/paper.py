"""The report's comparison with the DreamBooth paper's Table 1, shown only when the study used the paper's backbones.

Table 1 of the paper (Ruiz et al., CVPR 2023) gives, for DreamBooth on Stable Diffusion, DINO 0.668, CLIP-I 0.803
and CLIP-T 0.305, and for the real images DINO 0.774 and CLIP-I 0.885. It measures them with CLIP ViT-B/32 and
DINO ViT-S/16, which are the `real` backbone set's CLIP and DINO. With other backbones the numbers live on another
scale, so the section is left out.

The paper averages over all of DreamBench. This study's rows pool every image of its subjects: the real images
(leave-one-out), the base model at step 0, and each configuration at each step where every subject was scored.
Each row has a 95% bootstrap interval over (subject, prompt, seed) groups. The per-image scores come from
images.csv.

What this module does not hold: the per-subject tables (markdown.py), the metric math (metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd

from harness.embedders import CLIP_TAG, DINO_TAG
from harness.metrics import DEFAULT_BOOTSTRAP_SAMPLES, bootstrap_ci
from harness.report.tables import Estimate, ResultTables, config_label, metric_label

PAPER = "DreamBooth (Ruiz et al., CVPR 2023), Table 1"
PAPER_BACKBONES = {"clip": CLIP_TAG, "dino": DINO_TAG}
COMPARED = ("dino", "clip_i", "clip_t")
PAPER_ROWS: tuple[tuple[str, Mapping[str, float]], ...] = (
    ("DreamBooth, Stable Diffusion (paper)", {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}),
    ("real images (paper)", {"dino": 0.774, "clip_i": 0.885}),
)
PAPER_SUBJECTS = 30


def uses_paper_backbones(metadata: Mapping[str, Any]) -> bool:
    """True when the study's CLIP and DINO are the paper's (a random or other network's label differs)."""
    backbones = metadata.get("backbones") or {}
    return all(isinstance(backbones.get(role), Mapping) and backbones[role].get("label") == tag
               for role, tag in PAPER_BACKBONES.items())


def pooled(images: pd.DataFrame, metrics: Sequence[str], bootstrap_samples: int) -> dict[str, Estimate]:
    """Mean of each metric's per-image scores over `images`, with its 95% bootstrap interval over images (one per
    subject, prompt and seed); metrics without scores are left out."""
    out = {}
    for metric in metrics:
        scored = images[images[metric].notna()] if metric in images else images.iloc[0:0]
        if scored.empty:
            continue
        # One image per (subject, prompt, seed) of a snapshot, one per file of the real images: the path is the group.
        groups = list(scored["path"])
        low, high = bootstrap_ci(scored[metric].to_numpy(dtype=float), groups, bootstrap_samples, seed=0)
        out[metric] = Estimate(float(scored[metric].mean()), low, high)
    return out


def complete_snapshots(tables: ResultTables, subjects: Sequence[str]) -> Iterator[tuple[str, int, set[str]]]:
    """(configuration label, step, its run keys) for each configuration and step scored for every subject."""
    runs = tables.runs[tables.runs["status"] == "ok"]
    varied = tables.varied
    keys = [*varied, "step"]
    for _, group in runs.groupby([runs[k].astype(str) for k in keys], sort=False):
        if set(subjects) <= set(group["subject"]):
            first = group.iloc[0]
            yield config_label(first, varied, step=False), int(first["step"]), set(group["run_key"])


def paper_comparison(tables: ResultTables) -> list[str]:
    """The section comparing this study with the paper's Table 1, or nothing when the backbones differ."""
    meta = tables.metadata
    if not uses_paper_backbones(meta):
        return []
    subjects = [s["name"] for s in meta.get("subjects", [])]
    samples = int((meta.get("eval") or {}).get("bootstrap_samples") or DEFAULT_BOOTSTRAP_SAMPLES)
    images = tables.images
    subject_images = images[(images["prompt_kind"] == "subject") & images["subject"].isin(subjects)]
    ours = [
        ("real images (this study)", pooled(images[(images["source"] == "real_images")
                                                   & images["subject"].isin(subjects)], COMPARED, samples)),
        ("base model, step 0 (this study)",
         pooled(subject_images[subject_images["source"] == "base_model"], COMPARED, samples)),
    ]
    for label, step, keys in complete_snapshots(tables, subjects):
        chosen = subject_images[(subject_images["source"] == "snapshot") & subject_images["run_key"].isin(keys)
                                & (subject_images["step"] == step)]
        ours.append((f"{label} @ {step} (this study)", pooled(chosen, COMPARED, samples)))
    header = ["", *(f"{metric_label(m)} ↑" for m in COMPARED), "subjects"]
    lines = ["## Comparison with the DreamBooth paper", "",
             f"{PAPER} next to this study, which scores with the paper's backbones (`{CLIP_TAG}`, `{DINO_TAG}`).",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values in PAPER_ROWS:
        cells = [f"*{label}*", *(f"{values[m]:.3f}" if m in values else "—" for m in COMPARED), str(PAPER_SUBJECTS)]
        lines.append("| " + " | ".join(cells) + " |")
    for label, estimates in ours:
        cells = [label, *(estimates[m].text() if m in estimates else "—" for m in COMPARED), str(len(subjects))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"The paper averages its {PAPER_SUBJECTS} DreamBench subjects (25 prompts x 4 images each); the rows "
                  f"of this study pool every subject-prompt image of its {len(subjects)} subject(s), and the real "
                  "images leave-one-out. Brackets: 95% bootstrap intervals over (subject, prompt, seed) groups. This "
                  "study's CLIP-T removes the identifier from the prompt; the paper does not say whether it did. "
                  "The base model, the sampler and the training settings may also differ from the paper's: read a "
                  "gap as a reason to look closer, not as a finding.", ""]
    return lines
