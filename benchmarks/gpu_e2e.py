"""A small protocol end to end on the GPU with a full-size Stable Diffusion 1.5 architecture, offline.

Builds SD 1.5-shaped components with random weights (nothing downloaded), saves them as a local diffusers folder,
writes a protocol that points `model.id` at it (512 px, prior weight {0, 1}, snapshots at 10 and 20 steps, 4 class
images, DPM-Solver++ 25 steps for evaluation, tiny evaluation backbones) and runs `run_experiment.py` on it twice:
the first run does the work, the second must find everything done. Prints the runner's timing table.
Random weights: the timings are real, the images and metrics mean nothing.

    python benchmarks/gpu_e2e.py --workdir /tmp/gpu_e2e
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

PROTOCOL = """
name: gpu_e2e
model: {{id: {model}, dtype: fp16}}
subjects:
  - {{name: dog, instance_dir: {subject}, class_noun: dog}}
train:
  resolution: 512
  learning_rate: 5.0e-6
  mixed_precision: bf16
  memory_mode: {memory_mode}
class_images: {{sampler: pndm, steps: 50}}
eval:
  backbones: tiny
  seeds: [0, 1]
  max_subject_prompts: 4
  class_prompts: ["a {{class}}", "a {{class}} on the beach"]
output: {{runs_dir: {work}/runs, cache_dir: {work}/cache, results_dir: {work}/results, reports_dir: {work}/reports}}
grid:
  prior_loss_weight: [0.0, 1.0]
  steps: [10, 20]
  num_class_images: [4]
"""


def save_random_sd15(folder: Path) -> None:
    import torch
    from benchlib import build_sd15_components
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if (folder / "model_index.json").is_file():
        return
    c = build_sd15_components("cpu", torch.float16)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=DDPMScheduler.from_config(c.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_e2e"))
    parser.add_argument("--memory-mode", default="fast", choices=("fast", "low_memory"))
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    save_random_sd15(work / "sd15-random")
    print(f"random SD 1.5 saved in {time.perf_counter() - started:.0f} s", flush=True)
    protocol = work / "gpu_e2e.yaml"
    protocol.write_text(PROTOCOL.format(model=work / "sd15-random", subject=REPO / "examples" / "subjects" / "dog",
                                        work=work, memory_mode=args.memory_mode))
    from run_experiment import main as run

    for attempt in ("first run", "second run (everything cached)"):
        began = time.perf_counter()
        status = run([str(protocol)])
        print(f"== {attempt}: exit {status}, {time.perf_counter() - began:.1f} s", flush=True)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
