"""The plan of a protocol: its runs, the pools and caches they share, and the work it costs.

`make_plan` is cheap (no model, no GPU): it validates the instance folders, expands the grid and counts the work.
`format_plan` renders it for `--dry-run`, with the time it should take on this machine's GPU (harness/throughput.py).
Nothing is executed here.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from harness.backbones import BACKBONES
from harness.backends import HUB, backend_name, backend_of
from harness.class_images import PoolSpec, check_class_folder, plan_pools, pool_for
from harness.config import Protocol
from harness.data import check_instances, list_instance_files
from harness.grid import RunSpec, WorkEstimate, column_name, estimate_work, expand
from harness.metrics import features_for
from harness.prompts import class_prompts, subject_prompts
from harness.throughput import estimate_lines


class UnknownRunError(ValueError):
    """`--only` named a run key that is not in the protocol's plan."""


@dataclass(frozen=True)
class Plan:
    protocol: Protocol
    runs: tuple[RunSpec, ...]
    pools: dict[PoolSpec, int]
    work: WorkEstimate
    warnings: tuple[str, ...]


def make_plan(protocol: Protocol) -> Plan:
    """Checks the instance images (fails fast on bad files) and expands the grid."""
    warnings: list[str] = list(protocol.notes)
    resolutions = {v for k, vs in protocol.grid if k == "resolution" for v in vs} or {protocol.train.resolution}
    for subject in protocol.subjects:
        for message in check_instances(subject, min(resolutions)):
            warnings.append(f"subject {subject.name!r}: {message}")
    runs = expand(protocol)
    pools = plan_pools(runs)
    for pool, n in pools.items():
        if pool.from_folder:
            warnings += check_class_folder(pool.sampler, pool.resolution, n)
    work = estimate_work(protocol, runs, {p.key: n for p, n in pools.items() if not p.from_folder})
    return Plan(protocol=protocol, runs=tuple(runs), pools=pools, work=work, warnings=tuple(warnings))


def select_runs(plan: Plan, only: Sequence[str] = ()) -> tuple[RunSpec, ...]:
    """The runs `--only` selects (every run when it names none); an unknown key is an UnknownRunError."""
    keys = [r.run_key for r in plan.runs]
    unknown = [k for k in dict.fromkeys(only) if k not in keys]
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, keys, n=1)) else k
                 for k in unknown]
        raise UnknownRunError(f"--only {', '.join(hints)}: no such run key in protocol {plan.protocol.name!r}; "
                              "--dry-run lists its runs and their keys.")
    return tuple(r for r in plan.runs if not only or r.run_key in only)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _pool_source(pool: PoolSpec) -> str:
    s = pool.sampler
    if pool.from_folder:
        return f"the photos in {s.dir} (file-name order), prepared at {pool.resolution} px"
    return (f"{pool.prompt!r} at {pool.resolution} px, {s.sampler} {s.steps} steps, guidance {s.guidance_scale:g}, "
            f"seed {s.seed}")


def _token_notes(plan: Plan) -> list[str]:
    """One line per method that names the subject with its own token, with the instance prompt it trains on."""
    lines = {}
    for run in plan.runs:
        own = plan.protocol.subject(run.subject.name).identifier
        if run.subject.identifier != own:
            lines[(run.train.method, run.subject.name)] = (
                f"{run.train.method} runs name subject {run.subject.name!r} with {run.subject.identifier!r} instead of "
                f"{own!r}: instance prompt {run.subject.instance_text!r}")
    return list(lines.values())


def format_plan(plan: Plan) -> str:
    p = plan.protocol
    model = p.model.id + (f"@{p.model.revision}" if p.model.revision else "")
    note = backend_of(p.model).plan_note
    if note:
        model += f"  ({note})"
    lines = [f"Protocol {p.name!r}  ({p.path})", f"model: {model}"]
    for s in p.subjects:
        n = len(list_instance_files(s.instance_dir))
        lines.append(f"subject {s.name!r}: {n} images in {s.instance_dir}; instance prompt {s.instance_text!r}, "
                     f"class prompt {s.class_text!r}; {len(subject_prompts(s, p.eval))} subject + "
                     f"{len(class_prompts(s, p.eval))} class eval prompts x {len(p.eval.seeds)} seeds")
    varied = list(dict.fromkeys(column_name(k) for k, _ in p.grid if k not in ("steps", "subject")))
    lines += _token_notes(plan)
    lines += ["", f"Runs ({len(plan.runs)} training runs; steps are snapshots of one run where the schedule allows; "
                  "learning rate as resolved for each run):"]
    rows = []
    for run in plan.runs:
        values = dict(run.varied)
        cells = [run.run_key, run.subject.name]
        for k in varied:
            cells.append("-" if k == "num_class_images" and not run.train.uses_prior else _fmt(values.get(k)))
        if "learning_rate" not in varied:
            cells.append(_fmt(run.train.learning_rate))
        cells.append(", ".join(map(str, run.snapshot_steps)))
        rows.append(cells)
    header = ["run_key", "subject", *varied, *([] if "learning_rate" in varied else ["learning_rate"]),
              "snapshot steps"]
    lines += ["  " + line for line in _table(header, rows)]
    lines += ["", "Shared by the runs:"]
    if plan.pools:
        for pool, n in plan.pools.items():
            users = sum(1 for r in plan.runs if pool_for(r) == pool)
            lines.append(f"  class-image pool {pool.key}: {_pool_source(pool)}: {n} images (runs use nested "
                         f"prefixes), {users} run(s)")
    else:
        lines.append("  no class-image pool (prior_loss_weight is 0 everywhere)")
    instance_images = sum(len(list_instance_files(s.instance_dir)) for s in p.subjects)
    distances = " and LPIPS distances between the seeds of each prompt" if "lpips" in features_for(p.eval.metrics) \
        else ""
    if distances and len(BACKBONES.get(p.eval.backbones).lpips_nets) > 1:  # the set honours eval.lpips_net
        distances += f" ({p.eval.lpips_net})"
    lines.append(f"  caches: VAE latents of {instance_images} instance + {plan.work.class_images} class images, text "
                 f"embeddings of the training prompts, image embeddings{distances} ({p.eval.backbones} backbones)")
    lines.append(f"  base-model images (step 0), generated once per subject: {plan.work.base_model_images}")
    w = plan.work
    lines += [
        "",
        "Work:",
        f"  training runs {w.training_runs}, optimizer steps {w.optimizer_steps} (batch {p.train.batch_size} instance"
        f" + {p.train.batch_size} class image(s) per step with prior preservation), snapshots {w.snapshots}",
        f"  images to generate: {w.class_images} class + {w.eval_images} evaluation + {w.base_model_images} base "
        f"model = {w.images}",
    ]
    lines += ["", *estimate_lines(p, plan.runs, w, model_is_sd15=backend_name(p.model.id) == HUB)]
    if plan.warnings:
        lines += ["", "Notes:"] + [f"  - {m}" for m in plan.warnings]
    return "\n".join(lines)
