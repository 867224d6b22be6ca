"""The report's sentences, generated from the numbers: the verdict per subject and the best of each metric.

`verdict` says which configuration has the best subject fidelity (DINO) at acceptable language drift (PRES not above
the base model's interval), what prior preservation changes and where overfitting starts; `best_sentences` names
the best configuration of each metric under the subject's table. Where intervals overlap, the sentence says so
instead of ranking.

What this module does not hold: the tables these sentences sit beside (markdown.py) or the intervals and labels
they use (tables.py). It draws nothing and writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from harness.report.tables import (
    TIED,
    Estimate,
    ResultTables,
    best_of,
    config_label,
    drift_limit,
    estimate,
    field_value,
    metric_label,
    ok_rows,
    reference,
    run_groups,
    to_float,
    uses_prior,
)


def _names(labels: list[str], limit: int = 4) -> str:
    if len(labels) <= limit:
        return "; ".join(labels)
    return "; ".join(labels[:limit]) + f"; and {len(labels) - limit} more"


def _fidelity_at_acceptable_drift(tables: ResultTables, subject: str) -> list[str]:
    rows = [r for _, r in ok_rows(tables, subject).iterrows()]
    varied = tables.varied
    if not rows or not all(any(estimate(r, m).known for r in rows) for m in ("dino", "pres")):
        return ["DINO or PRES was not computed, so fidelity cannot be weighed against drift."]
    base = reference(tables, subject, "base_model")
    base_pres = estimate(base, "pres") if base is not None else Estimate(math.nan, math.nan, math.nan)
    if not base_pres.known:
        return ["The base model's PRES is missing, so there is no drift baseline; see the table."]
    limit = drift_limit(tables, subject)
    acceptable = [r for r in rows if estimate(r, "pres").known and estimate(r, "pres").mean <= limit]
    out = []
    if not acceptable:
        least = min((r for r in rows if estimate(r, "pres").known), key=lambda r: estimate(r, "pres").mean)
        out.append(f"No configuration keeps PRES within the base model's interval ({base_pres.text()}): every one "
                   f"drifts. The least drifting is **{config_label(least, varied)}** (PRES "
                   f"{estimate(least, 'pres').text()}, DINO {estimate(least, 'dino').text()}).")
        return out
    best_index, tied = best_of(acceptable, "dino", higher=True)
    if best_index is None:
        return ["No configuration with acceptable drift has a DINO value."]
    best = acceptable[best_index]
    out.append(f"Best subject fidelity at acceptable drift (PRES not above the base model's interval, "
               f"{base_pres.text()}): **{config_label(best, varied)}** with DINO {estimate(best, 'dino').text()} "
               f"and PRES {estimate(best, 'pres').text()}.")
    if tied:
        out.append(f"On DINO it is {TIED} with {_names([config_label(acceptable[i], varied) for i in tied])}: "
                   "this data does not separate them; more seeds or prompts would.")
    overall_index, _ = best_of(rows, "dino", higher=True)
    overall = rows[overall_index] if overall_index is not None else None
    if overall is not None and estimate(overall, "pres").mean > limit:
        out.append(f"The highest DINO overall, {config_label(overall, varied)} "
                   f"({estimate(overall, 'dino').text()}), pays for it with drift: PRES "
                   f"{estimate(overall, 'pres').text()}.")
    return out


def _overfitting(tables: ResultTables, subject: str) -> list[str]:
    out = []
    for _, group in run_groups(ok_rows(tables, subject)):
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
            best = max(later, key=lambda p: to_float(p.get("dino")) if estimate(p, "dino").known else -math.inf)
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
    rows = ok_rows(tables, subject)
    if "prior_loss_weight" not in tables.varied or rows.empty:
        return []
    step = int(rows["step"].max())
    at = [r for _, r in rows[rows["step"] == step].iterrows() if estimate(r, "pres").known]
    others = [k for k in tables.varied if k not in _PRIOR_ONLY_AXES]

    def rest(row: pd.Series) -> tuple:
        return tuple(field_value(row, k) for k in others)

    sentences = []
    for off in (r for r in at if not uses_prior(r)):
        matches = [r for r in at if uses_prior(r) and rest(r) == rest(off)]
        if matches:
            on = min(matches, key=lambda r: estimate(r, "pres").mean)
            sentences.append(_prior_sentence(tables, step, off, on, name_off=bool(others)))
    return sentences


def _prior_sentence(tables: ResultTables, step: int, off: pd.Series, on: pd.Series, name_off: bool) -> str:
    p_off, p_on = estimate(off, "pres"), estimate(on, "pres")
    d_off, d_on = estimate(off, "dino"), estimate(on, "dino")
    source = f" ({config_label(off, tables.varied, step=False)})" if name_off else ""
    if p_on.mean == p_off.mean:
        change = f"leaves PRES where it was: {p_off.text()}{source} and {p_on.text()}"
    else:  # the verb follows the numbers: a prior that raises drift is said to raise it
        verb = "lowers" if p_on.mean < p_off.mean else "raises"
        change = f"{verb} PRES from {p_off.text()}{source} to {p_on.text()}"
    sentence = f"At step {step}, prior preservation ({config_label(on, tables.varied, step=False)}) {change}"
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


def best_sentences(tables: ResultTables, rows: list[pd.Series], metrics: Sequence[str]) -> list[str]:
    out = []
    for m in metrics:
        best, tied = best_of(rows, m, tables.higher_is_better[m])
        if best is None:
            continue
        name = f"{metric_label(m)}: best {config_label(rows[best], tables.varied)} " \
               f"({estimate(rows[best], m).text()})"
        if tied:
            labels = [config_label(rows[i], tables.varied) for i in tied]
            out.append(f"- {name}, {TIED} with {_names(labels)}.")
        elif len(rows) > 1:
            out.append(f"- {name}, clearly: its interval overlaps no other configuration's.")
        else:
            out.append(f"- {name} (the only configuration).")
    return out
