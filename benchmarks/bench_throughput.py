"""The throughput table in one command: what the harness runs by default, measured on this GPU, as the dry run's
estimate and `compile: auto` read it (benchmarks/throughput.json, harness/throughput.py).

`--table` (the default) measures, most valuable first, each in its own process: training `fast` with checkpointing
compiled (`train.compile: true`) and eager, evaluation and class-image sampling compiled and eager (the batch the
harness picks), training `low_memory` compiled and eager, scoring. `--variants` measures what tunes the defaults:
`fast` without checkpointing, the other compile variants (whole UNet or its blocks, with or without CUDA graphs),
sampling recipes with one flag changed, a breakdown of a sampling batch, other batch sizes.

A budget (seconds, default 480) bounds the whole command: each measurement gets at most what is left of it, a
measurement that fails or runs out of time is recorded as such, and the files are rewritten after every measurement,
so a command killed half way keeps what it measured. Writes to --out (default $OUT):
    throughput.json   the figures measured here, in the table's format ({"schema", "gpus": {this GPU: ...}})
    records.json      every measurement as measured, with the commit, date, libraries and command
    table.md          the table printed at the end

    python benchmarks/bench_throughput.py --out $OUT                # on the GPU, within 10 minutes
    python benchmarks/bench_throughput.py --variants --out $OUT     # the rest, within 10 minutes
    python benchmarks/bench_throughput.py --merge $OUT/throughput.json   # fold into benchmarks/throughput.json
    python benchmarks/bench_throughput.py --update                  # measure, then fold in directly
    python benchmarks/bench_throughput.py --tiny --budget 900       # a CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_eval
import bench_train
from benchlib import REPO, markdown_table, out_dir, plain_table, provenance, run_job, write_json

TABLE = REPO / "benchmarks" / "throughput.json"
MIN_JOB_SECONDS = 30  # a measurement given less than this is skipped rather than started


def table_jobs(device: str, tiny: bool, backend: str) -> list[tuple[str, Path, dict[str, Any], float]]:
    """(label, script, options, time cap) of the default paths, most valuable first."""
    steps = bench_train.step_counts(tiny, quick=False)

    def train(mode: str, checkpointing: bool, variant: str, cap: float):
        job = bench_train.training_job(device, tiny, mode, checkpointing, variant, steps, backend)
        return (f"train {mode} {'checkpointing' if checkpointing else 'no checkpointing'} {variant}",
                bench_train.SCRIPT, job, cap)

    def sample(recipe: str, cap: float):
        job = bench_eval.sampling_job(device, tiny, recipe, ["eval", "class"], [], backend)
        return f"sampling {recipe}", bench_eval.SCRIPT, job, cap

    return [
        train("fast", True, "on", 300),
        sample("compiled", 240),
        train("fast", True, "eager", 90),
        sample("eager", 150),
        train("low_memory", True, "on", 180),
        train("low_memory", True, "eager", 90),
        ("scoring", bench_eval.SCRIPT, bench_eval.embedding_job(device, tiny), 90),
    ]


def variant_jobs(device: str, tiny: bool, backend: str) -> list[tuple[str, Path, dict[str, Any], float]]:
    """(label, script, options, time cap) of the alternatives to the defaults, most telling first."""
    steps = bench_train.step_counts(tiny, quick=True)

    def train(mode: str, checkpointing: bool, variant: str, cap: float):
        job = bench_train.training_job(device, tiny, mode, checkpointing, variant, steps, backend)
        return (f"train {mode} {'checkpointing' if checkpointing else 'no checkpointing'} {variant}",
                bench_train.SCRIPT, job, cap)

    def sample(recipe: str, kinds: list[str], batches: list[int], cap: float):
        job = bench_eval.sampling_job(device, tiny, recipe, kinds, batches, backend, rounds={"eval": 1, "class": 1})
        return f"sampling {recipe} {'+'.join(kinds)}", bench_eval.SCRIPT, job, cap

    def breakdown(recipe: str, cap: float):
        job = bench_eval.breakdown_job(device, tiny, recipe, 2 if tiny else 32, backend)
        return f"breakdown {recipe}", bench_eval.SCRIPT, job, cap

    return [
        train("fast", False, "on", 240),
        train("fast", False, "eager", 60),
        train("fast", True, "regional", 120),
        breakdown("eager", 90),
        breakdown("compiled", 150),
        train("fast", True, "full", 240),
        sample("compiled-fuse-cl", ["eval"], [], 150),
        sample("compiled+graphs", ["eval"], [], 180),
        train("low_memory", True, "regional", 150),
        sample("eager", ["eval"], [8, 16], 120),
    ]


# --------------------------------------------------------------------------------------------------------------
# From records to the table's figures


def figures_of(records: list[dict[str, Any]], origin: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{table key: {"eager"|"compiled": figure}} of what the harness runs by default (`on` and `eager` training,
    `compiled` and `eager` sampling at the harness's batch, scoring); variants are records only."""
    from harness.throughput import training_key

    stamp = {k: origin[k] for k in ("commit", "date", "torch", "command")}
    figures: dict[str, dict[str, Any]] = {}
    for r in records:
        if "error" in r:
            continue
        if r["kind"] == "training" and r["variant"] in ("on", "eager"):
            path = "compiled" if r["variant"] == "on" else "eager"
            key = training_key(r.get("method", "dreambooth"), r["mode"], r["gradient_checkpointing"])
            figure = {"seconds_per_step": round(r["seconds_per_step"], 4),
                      "peak_allocated_gib": _round(r["peak_allocated_gib"]),
                      "nvidia_smi_gib": _round(r.get("nvidia_smi_gib")),
                      "settings": {"resolution": r["resolution"], "images_per_step": 2, "variant": r["compiled"]}}
            if path == "compiled":
                figure["compile_seconds"] = round(r["compile_seconds"], 1)
            figures.setdefault(key, {})[path] = {**figure, **stamp}
        elif r["kind"] == "sampling" and r["harness_pick"] and r["recipe"] in ("compiled", "eager"):
            path = r["recipe"]
            figure = {"images_per_second": round(r["images_per_second"], 3),
                      "peak_allocated_gib": _round(r["peak_allocated_gib"]),
                      "settings": {"resolution": r["resolution"], "steps": r["steps"], "sampler": r["sampler"],
                                   "batch": r["batch"]}}
            if path == "compiled":
                figure["compile_seconds"] = round(r["compile_seconds"], 1)
            figures.setdefault(f"sampling.{r['what']}", {})[path] = {**figure, **stamp}
        elif r["kind"] == "scoring":
            figures.setdefault("scoring", {})["eager"] = {"images_per_second": round(r["images_per_second"], 1),
                                                          **stamp}
    return figures


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def merge_into_table(measured: dict[str, Any], table_path: Path = TABLE) -> None:
    """Folds a measured throughput.json into the shipped table (figures of other GPUs and keys are kept)."""
    from harness.throughput import load_table, merge_figures

    table = load_table.__wrapped__(table_path)
    for gpu, figures in measured["gpus"].items():
        table = merge_figures(table, gpu, figures)
    write_json(table_path, table)
    print(f"merged {', '.join(measured['gpus'])} into {table_path}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", action="store_true", help="measure the alternatives instead of the defaults")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all measurements together")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a check of the script)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor; --tiny: aot_eager)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results (default: $OUT)")
    parser.add_argument("--update", action="store_true", help="also fold the figures into benchmarks/throughput.json")
    parser.add_argument("--merge", type=Path, default=None, help="only fold this measured throughput.json in")
    parser.add_argument("--only", default="", help="measure only the jobs whose label starts with one of these "
                                                   "comma-separated prefixes, e.g. 'sampling,train low_memory'")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge is not None:
        merge_into_table(json.loads(args.merge.read_text(encoding="utf-8")))
        return 0
    import torch

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    folder = out_dir(args.out)
    command = "python benchmarks/bench_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    origin = provenance(command)
    gpu = origin["gpu"] or ("cpu (tiny check)" if args.tiny else "cpu")
    jobs = chosen((variant_jobs if args.variants else table_jobs)(device, args.tiny, backend), args.only)
    print(f"{len(jobs)} measurements on {gpu}, budget {args.budget:.0f} s; commit {origin['commit']}", flush=True)
    began = time.perf_counter()
    records: list[dict[str, Any]] = []
    for i, (label, script, options, cap) in enumerate(jobs, 1):
        left = args.budget - (time.perf_counter() - began)
        if left < MIN_JOB_SECONDS:
            records.append({"kind": options["measure"], "job": label, "error": f"{label} skipped: budget spent"})
            print(f"[{i}/{len(jobs)}] {label}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        print(f"[{i}/{len(jobs)}] {label} (at most {min(cap, left):.0f} s; {left:.0f} s left)", flush=True)
        records += run_job(script, options, min(cap, left), label)
        _write(folder, gpu, origin, records)
    rows = summary_rows(records)
    print(f"{gpu}: {time.perf_counter() - began:.0f} s\n{plain_table(SUMMARY_HEADER, rows)}", flush=True)
    measured = _write(folder, gpu, origin, records)
    if args.update and not args.tiny:
        merge_into_table(measured)
    return 1 if any("error" in r for r in records) else 0


def chosen(jobs: list[tuple[str, Path, dict[str, Any], float]], only: str) -> list[tuple[str, Path, dict[str, Any],
                                                                                     float]]:
    """The jobs whose label starts with one of the comma-separated prefixes of `only` (all of them when empty)."""
    prefixes = [p.strip() for p in only.split(",") if p.strip()]
    if not prefixes:
        return jobs
    picked = [job for job in jobs if any(job[0].startswith(p) for p in prefixes)]
    if not picked:
        raise SystemExit(f"--only {only!r} matches none of: {', '.join(job[0] for job in jobs)}.")
    return picked


def _write(folder: Path, gpu: str, origin: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    measured = {"schema": 1, "gpus": {gpu: figures_of(records, origin)}}
    write_json(folder / "throughput.json", measured)
    write_json(folder / "records.json", {"provenance": origin, "records": records})
    (folder / "table.md").write_text(f"{gpu}, commit {origin['commit']}, {origin['date']}, torch {origin['torch']}\n\n"
                                     f"{markdown_table(SUMMARY_HEADER, summary_rows(records))}\n", encoding="utf-8")
    return measured


SUMMARY_HEADER = ["measurement", "result", "warm-up / compile", "memory GiB"]


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r.get("job") or str(r.get("kind")), r["error"], "", ""])
        elif r["kind"] == "training":
            method = r.get("method", "dreambooth")
            method = "" if method == "dreambooth" else f"{method} "
            checkpointing = "on" if r["gradient_checkpointing"] else "off"
            what = (f"train {method}{r['mode']}, checkpointing {checkpointing}, {r['variant']}"
                    + (f" ({r['compiled']})" if r["compiled"] else ""))
            compile_s = "" if r["compile_seconds"] is None else f", compile ~{r['compile_seconds']:.0f} s"
            rows.append([what, f"{r['seconds_per_step']:.3f} s/step", f"{r['warmup_seconds']:.0f} s{compile_s}",
                         _gib(r["peak_allocated_gib"], r.get("nvidia_smi_gib"))])
        elif r["kind"] == "sampling":
            what = f"{r['what']} {r['sampler']} {r['steps']} steps, {r['recipe']}, batch {r['batch']}"
            rows.append([what + (" (harness)" if r["harness_pick"] else ""), f"{r['images_per_second']:.2f} images/s",
                         f"{r['first_batch_seconds']:.0f} s", _gib(r["peak_allocated_gib"], None)])
        elif r["kind"] == "breakdown":
            rows.append([f"breakdown batch {r['batch']}, {r['recipe_used']}",
                         f"denoise {r['denoise_seconds']:.2f} s, decode {r['decode_seconds']:.2f} s, PNG "
                         f"{r['png_seconds']:.2f} s", f"{r['first_round_seconds']:.0f} s", ""])
        else:
            rows.append([f"{r['kind']}: {r['what']}", f"{r['images_per_second']:.1f} images/s", "", ""])
    return rows


def _gib(peak: float | None, smi: float | None) -> str:
    parts = [f"{peak:.2f} alloc" if peak is not None else "", f"{smi:.2f} smi" if smi is not None else ""]
    return ", ".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
