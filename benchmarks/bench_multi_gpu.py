"""A study on one GPU and then on two: wall times, their ratio, and whether the results agree.

Builds the full-size Stable Diffusion 1.5 architecture with random weights (as gpu_e2e.py: nothing downloaded),
writes a protocol of 4 training runs (prior weight {0, 1} x learning rate {5e-6, 1e-5}, 512 px, snapshots at half
and all of the steps, a class-image pool, DPM-Solver++ evaluation images, tiny evaluation backbones), and runs
`run_experiment.py` on it twice, each time from scratch in its own folder so both do the same work: with
`--gpus 0` (one worker, in the command's process) and with `--gpus 0,1` (one worker process per GPU). Prints both
wall times, the ratio (the target is 0.6 or less), and whether the CSV rows agree apart from the timing columns;
writes the same into bench_multi_gpu.json in the work folder. With two workers it also records what each worker did
when (its status file, read every half second): the timeline shows what stayed serial. Random weights: the timings
are real, the metrics mean nothing.

    python benchmarks/bench_multi_gpu.py --workdir /scratch/bench_multi_gpu        # 2 GPUs, about 12 minutes
    python benchmarks/bench_multi_gpu.py --part one; ... --part two                 # the same in two commands
    python benchmarks/bench_multi_gpu.py --execution deterministic=true            # both parts with this setting
    python benchmarks/bench_multi_gpu.py --tiny --workdir /var/tmp/bmg              # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

PROTOCOL = """
name: multi_gpu
model: {{id: {model}, dtype: fp16}}
subjects:
  - {{name: dog, instance_dir: {subject}, class_noun: dog}}
train:
  resolution: {resolution}
  mixed_precision: {mixed_precision}
  num_class_images: {class_images}
class_images: {{sampler: pndm, steps: {class_steps}}}
eval:
  backbones: tiny
  seeds: [0, 1]
  max_subject_prompts: 4
  class_prompts: ["a {{class}}", "a {{class}} on the beach"]
  steps: {eval_steps}
grid:
  prior_loss_weight: [0.0, 1.0]
  learning_rate: [5.0e-6, 1.0e-5]
  steps: [{half}, {steps}]
"""
PARTS = {"one": ("1 GPU", ["--gpus", "0"]), "two": ("2 GPUs", ["--gpus", "0,1"])}
TINY_PARTS = {"one": ("1 CPU worker", ["--workers", "1"]), "two": ("2 CPU workers", ["--workers", "2"])}


def write_protocol(work: Path, tiny: bool, steps: int) -> Path:
    if tiny:
        model, settings = "tiny", {"resolution": 32, "mixed_precision": '"no"', "class_images": 4, "class_steps": 2,
                                   "eval_steps": 2}
    else:
        from gpu_e2e import save_random_sd15

        save_random_sd15(work / "sd15-random")
        model, settings = work / "sd15-random", {"resolution": 512, "mixed_precision": "bf16", "class_images": 20,
                                                 "class_steps": 50, "eval_steps": 25}
    path = work / "multi_gpu.yaml"
    path.write_text(PROTOCOL.format(model=model, subject=REPO / "examples" / "subjects" / "dog", half=steps // 2,
                                    steps=steps, **settings))
    return path


class Timeline:
    """What each worker did when: the (run, activity) of every worker's status file, read every `every` seconds
    while the study runs, as segments in seconds from the start (the files go when the study ends cleanly)."""

    def __init__(self, workers_dir: Path, every: float = 0.5):
        self.workers_dir, self.every = workers_dir, every
        self.started = time.time()
        self.segments: dict[str, list[dict]] = {}  # worker -> [{"start", "end", "run_key", "activity"}]
        self.finished: dict[str, list[dict]] = {}  # worker -> its status's list of finished runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            for path in self.workers_dir.glob("*/*.json"):
                try:
                    status = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # replaced while read
                self._note(path.stem, status)

    def _note(self, worker: str, status: dict) -> None:
        now = round(status.get("updated", time.time()) - self.started, 1)
        activity = " ".join(w for w in str(status.get("activity", "")).split() if not w[:1].isdigit())
        what = (status.get("run_key"), activity if status.get("state") != "finished" else "finished")
        segments = self.segments.setdefault(worker, [])
        if segments and (segments[-1]["run_key"], segments[-1]["activity"]) == what:
            segments[-1]["end"] = now
        else:
            if segments:
                segments[-1]["end"] = now
            segments.append({"start": now, "end": now, "run_key": what[0], "activity": what[1]})
        self.finished[worker] = status.get("finished", [])

    def summary(self) -> dict:
        """Per worker: seconds per activity (runs' activities added up), when its last run ended, its runs."""
        out = {}
        for worker, segments in sorted(self.segments.items()):
            seconds: dict[str, float] = {}
            for s in segments:
                seconds[s["activity"]] = round(seconds.get(s["activity"], 0.0) + s["end"] - s["start"], 1)
            ends = [s["end"] for s in segments if s["run_key"]]
            out[worker] = {"seconds": seconds, "last_run_ended": max(ends) if ends else None,
                           "runs": self.finished.get(worker, []), "segments": segments}
        return out


def run_part(work: Path, protocol: Path, name: str, flags: list[str]) -> dict:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)  # from scratch: caches, pools and reference rows included
    folder.mkdir(parents=True)
    started = time.perf_counter()
    with Timeline(folder / "runs" / ".workers") as timeline:
        result = subprocess.run([sys.executable, str(REPO / "run_experiment.py"), str(protocol), *flags],
                                cwd=folder, text=True, capture_output=True)
    wall = time.perf_counter() - started
    (folder / "output.txt").write_text(result.stdout + result.stderr)
    print(result.stdout[-3000:], flush=True)
    metadata = folder / "results" / "multi_gpu" / "metadata.json"
    timings = json.loads(metadata.read_text()).get("timings") if metadata.is_file() else None
    workers = timeline.summary()
    for worker, summary in workers.items():
        print(f"  {worker}: last run ended at {summary['last_run_ended']} s; "
              + ", ".join(f"{a or 'idle'} {s} s" for a, s in summary["seconds"].items()), flush=True)
    return {"flags": flags, "exit": result.returncode, "wall_seconds": round(wall, 1), "timings": timings,
            "workers": workers}


def compare(work: Path) -> dict:
    """Whether the two parts' CSV rows agree apart from the timing columns, and by how much they differ."""
    from benchlib import compare_csvs

    return compare_csvs(*(work / part / "results" / "multi_gpu" for part in ("one", "two")))


def report(results: dict, labels: dict) -> str:
    lines = ["| configuration | wall time (s) | exit |", "|---|---|---|"]
    for part in ("one", "two"):
        if part in results["parts"]:
            r = results["parts"][part]
            lines.append(f"| {labels[part][0]} (`{' '.join(r['flags'])}`) | {r['wall_seconds']} | {r['exit']} |")
    if "ratio" in results:
        lines.append(f"\nratio (2 / 1): {results['ratio']:.3f} (target: 0.6 or less)")
    if "rows_agree" in results:
        lines.append(f"CSV rows agree apart from timing columns: {'yes' if results['rows_agree'] else 'no'}")
        for csv, columns in results["differences"].items():
            lines.append(f"  {csv}: " + ", ".join(f"{c} (max |diff| {v})" for c, v in columns.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench_multi_gpu"))
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run (snapshots at half)")
    parser.add_argument("--part", choices=("one", "two", "both"), default="both")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU workers: checks the script")
    parser.add_argument("--execution", metavar="KEY=VALUE", action="append", default=[],
                        help="passed on to run_experiment.py in both parts, e.g. deterministic=true")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    labels = TINY_PARTS if args.tiny else PARTS
    protocol = write_protocol(work, args.tiny, args.steps if not args.tiny else min(args.steps, 4))
    out = work / "bench_multi_gpu.json"
    results = json.loads(out.read_text()) if out.is_file() and args.part != "both" else {"parts": {}}
    for part in ("one", "two") if args.part == "both" else (args.part,):
        label, flags = labels[part]
        flags = [*flags, *(f for item in args.execution for f in ("--execution", item))]
        print(f"== {label}: run_experiment.py {protocol.name} {' '.join(flags)}", flush=True)
        results["parts"][part] = run_part(work, protocol, part, flags)
    parts = results["parts"]
    if {"one", "two"} <= set(parts) and all(parts[p]["exit"] == 0 for p in ("one", "two")):
        results["ratio"] = parts["two"]["wall_seconds"] / parts["one"]["wall_seconds"]
        results.update(compare(work))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, labels))
    print(f"written: {out}")
    return 0 if all(p["exit"] == 0 for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
