"""A scaled prior ablation end to end on the GPU, so that a whole study's speed is one command.

Full-size SD 1.5 architecture with random weights, saved as a local diffusers folder (nothing is downloaded); the
protocol is prior_ablation.yaml scaled down: prior weight {0, 0.5, 1} with 16 class images, snapshots at 100 and 200
steps, 4 subject and 2 class prompts x 2 seeds per snapshot, the tiny metric backbones (the real ones need the hub),
512 px, `compile` as asked for every phase. Runs the harness's runner in this process and prints its table: the
time of every phase with its work and rate (images/s, s/step), then each run's seconds per step and warm-up, and
writes them all to study.json.

    python benchmarks/bench_study.py --compile auto --out $OUT     # what a user gets by default (~5 min, H100)
    python benchmarks/bench_study.py --out $OUT                    # compile: true: more than 10 min on an H100,
                                                                   # the training UNet compiles once per batch shape
                                                                   # (with and without class images)
    python benchmarks/bench_study.py --tiny                        # CPU check: the tiny model at 32 px
Random weights: the timings are real, the images and metrics mean nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import REPO, build_sd15_components, out_dir, provenance, write_json

PROTOCOL = """
name: bench_study
model: {model}
subjects:
  - {{name: dog, instance_dir: {subject}, class_noun: dog}}
train:
  resolution: {resolution}
  learning_rate: {learning_rate}
  mixed_precision: {precision}
  gradient_checkpointing: {checkpointing}
  memory_mode: {memory_mode}
  compile: {compile}
class_images: {{sampler: pndm, steps: {class_steps}, compile: {compile}}}
eval:
  backbones: tiny
  steps: {eval_steps}
  seeds: [0, 1]
  max_subject_prompts: 4
  class_prompts: ["a {{class}}", "a {{class}} on the beach"]
  compile: {compile}
output: {{runs_dir: {work}/runs, cache_dir: {work}/cache, results_dir: {work}/results, reports_dir: {work}/reports}}
grid:
  prior_loss_weight: [0.0, 0.5, 1.0]
  steps: [{steps}]
  num_class_images: [16]
"""


def save_random_sd15(folder: Path) -> None:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if (folder / "model_index.json").is_file():
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = build_sd15_components(device, torch.float16)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=DDPMScheduler.from_config(c.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


SETTINGS = {  # what differs between the full-size study and the CPU check
    "full": {"resolution": 512, "learning_rate": 5.0e-6, "precision": "bf16", "checkpointing": "true",
             "class_steps": 50, "eval_steps": 25},
    "tiny": {"model": "{id: tiny}", "resolution": 32, "learning_rate": 1.0e-4, "precision": '"no"',
             "checkpointing": "false", "class_steps": 2, "eval_steps": 2},
}


def protocol_text(work: Path, tiny: bool, memory_mode: str, compile_: str, steps: str) -> str:
    settings = dict(SETTINGS["tiny" if tiny else "full"])
    settings.setdefault("model", f"{{id: {work / 'sd15-random'}, dtype: fp16}}")
    return PROTOCOL.format(subject=REPO / "examples" / "subjects" / "dog", work=work, memory_mode=memory_mode,
                           compile=compile_, steps=steps, **settings)


def run_study(protocol_path: Path) -> tuple[int, Any, float]:
    """Runs the protocol with the harness's runner; (exit status, the study's Timings, wall seconds)."""
    import harness.runner as runner
    from harness.config import load_protocol
    from harness.timings import Timings

    printed: list[Timings] = []
    table = Timings.table

    def keep_and_print(self: Timings) -> str:  # the runner prints the study's timings once, at the end
        printed.append(self)
        return table(self)

    Timings.table = keep_and_print
    try:
        began = time.perf_counter()
        status = runner.run_protocol(load_protocol(protocol_path))
        wall = time.perf_counter() - began
    finally:
        Timings.table = table
    if not printed:
        raise RuntimeError("the runner printed no timings table: bench_study.run_study no longer finds them")
    return status, printed[-1], wall


def runs_summary(work: Path) -> list[dict[str, Any]]:
    from harness.records import read_train

    rows = []
    for folder in sorted((work / "runs").iterdir()):
        if (folder / "train.json").is_file():
            record = read_train(folder)
            rows.append({"run_key": record.run_key, "steps": record.final_step,
                         "seconds_per_step": record.seconds_per_step, "compiled": record.compiled,
                         "warmup_seconds": record.warmup_seconds, "wall_seconds": record.wall_seconds,
                         "peak_memory_gib": None if record.peak_memory_bytes is None
                         else record.peak_memory_bytes / 1024**3})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_study"))
    parser.add_argument("--out", type=Path, default=None, help="folder for study.json (default: $OUT)")
    parser.add_argument("--compile", default="true", choices=("auto", "true", "false"))
    parser.add_argument("--memory-mode", default="fast", choices=("fast", "low_memory"))
    parser.add_argument("--steps", default="100, 200", help="snapshot steps (the grid's steps axis)")
    parser.add_argument("--keep", action="store_true", help="keep earlier runs and caches (measure a resume)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model at 32 px (a CPU check)")
    args = parser.parse_args(argv)
    from run_experiment import quiet_libraries

    quiet_libraries()
    work = args.workdir.resolve()
    if not args.keep:
        for name in ("runs", "cache", "results", "reports"):
            shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not args.tiny:
        began = time.perf_counter()
        save_random_sd15(work / "sd15-random")
        print(f"random SD 1.5 ready in {time.perf_counter() - began:.0f} s", flush=True)
    protocol = work / "bench_study.yaml"
    protocol.write_text(protocol_text(work, args.tiny, args.memory_mode, args.compile, args.steps))
    status, timings, wall = run_study(protocol)
    runs = runs_summary(work)
    for run in runs:
        print(f"run {run['run_key']}: {run['steps']} steps, {run['seconds_per_step'] or 0:.3f} s/step, "
              f"compiled {run['compiled'] or 'no'}, warm-up {run['warmup_seconds'] or 0:.0f} s", flush=True)
    command = "python benchmarks/bench_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(out_dir(args.out) / "study.json", {
        "provenance": provenance(command), "exit_status": status, "wall_seconds": wall,
        "phases": {name: {"seconds": seconds, "work": timings.work.get(name, {}), "rate": timings.rate(name)}
                   for name, seconds in timings.seconds.items()},
        "runs": runs, "compile": args.compile, "memory_mode": args.memory_mode,
    })
    print(f"study: exit {status}, {wall:.0f} s; written to {out_dir(args.out) / 'study.json'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
