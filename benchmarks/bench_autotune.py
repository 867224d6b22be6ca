"""What cuDNN's autotuning costs and saves in training: the first step and the steady steps of each batch shape.

Builds the full-size Stable Diffusion 1.5 UNet with random weights (nothing downloaded) and trains DreamBooth
(`fast`, checkpointing, bf16, 8-bit AdamW, 512 px) in one process: with class images (batch 1 + 1), without (batch
1), then with again; for each, the time of the session's start, of its first step, of steps 2-3 and per step over 20
more. `on` lets cuDNN time its algorithms (torch.backends.cudnn.benchmark), `off` does not; run each in its own
process (the setting and cuDNN's timings are process-wide), e.g. on two GPUs at once:

    CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_autotune.py on &
    CUDA_VISIBLE_DEVICES=1 python benchmarks/bench_autotune.py off; wait
    python benchmarks/bench_autotune.py off --tiny --steps 2              # CPU check of the script

harness/fastpath.py (AUTOTUNE_PAYBACK_STEPS) holds what these figures decide. Random weights: timings only.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("autotune", choices=("on", "off"))
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 32 px on the CPU (a check)")
    parser.add_argument("--steps", type=int, default=20, help="steady steps timed per shape")
    args = parser.parse_args()

    import torch
    from bench_train import _bench_subject, build_components, synthetic_training_data

    from harness.config import TrainSpec
    from harness.methods import METHODS
    from harness.trainer import Speedups, advance, read_losses, start_session

    device = torch.device("cpu" if args.tiny else "cuda")
    resolution = 32 if args.tiny else 512

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    components = build_components(args.tiny, device.type, torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"cuDNN autotuning {args.autotune}; {name}; torch {torch.__version__}", flush=True)
    for prior in (1.0, 0.0, 1.0):
        spec = TrainSpec(method="dreambooth", steps=10_000, resolution=resolution, batch_size=1,
                         prior_loss_weight=prior, mixed_precision="no" if args.tiny else "bf16",
                         optimizer="adamw8bit", gradient_checkpointing=True, memory_mode="fast", learning_rate=5e-6)
        cls = METHODS.get("dreambooth")
        settings, subject = cls.bind_subject(cls.settings_type(), _bench_subject())
        data = synthetic_training_data(components, resolution, subject.instance_text, encoded=False)
        sync()
        marks = [time.perf_counter()]
        session = start_session(cls(settings, spec), components, data, device,
                                Speedups(cudnn_benchmark=args.autotune == "on"))
        sync()
        marks.append(time.perf_counter())
        for count in (1, 2, args.steps):
            read_losses([advance(session) for _ in range(count)])
            sync()
            marks.append(time.perf_counter())
        start, first, next_two, steady = (b - a for a, b in itertools.pairwise(marks))
        print(f"batch {'1 + 1' if prior else '1'}: session {start:.2f} s, first step {first:.2f} s, "
              f"steps 2-3 {next_two:.2f} s, then {steady / args.steps:.3f} s/step", flush=True)
        del session
    return 0


if __name__ == "__main__":
    sys.exit(main())
