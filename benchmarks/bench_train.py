"""Speed and memory of training every method on an SD 1.5-sized model, eager and compiled, offline.

The model is the full-size Stable Diffusion 1.5 architecture (UNet ~860M parameters) built from configs with random
weights: nothing is downloaded; honest for time and memory only. Training goes through harness.trainer's own session
(start_session / advance, losses read once at the end as the loop reads them) with each method's own preparation
(harness/methods), so the numbers are the harness's.

For each method, memory mode, gradient-checkpointing setting and compile variant, in its own process: seconds per step
after warm-up (the timed steps end with a device synchronisation), the warm-up time (compilation and CUDA-graph
capture included) and the compile time it implies, peak GPU memory (torch.cuda.max_memory_allocated, and the process
total that nvidia-smi reports, sampled during the timed steps), the trainable parameters and the size on disk of the
method's export (written after the timed steps). 512 px, batch 1 + 1 class image, bf16 autocast, 8-bit AdamW, each
method's default settings (LoRA rank 4 on the UNet; Custom Diffusion's cross-attention key/value and one token).
Class-image generation is measured by bench_eval.py.

Variants: `eager`; `on` (what `train.compile: true` runs for the mode: harness/trainer/compiled.py ON); or a scope
and CUDA graphs spelled out: `full`, `full+graphs`, `regional`, `regional+graphs`, `blocks` (transformer and
ResNet blocks), `blocks+graphs`; `regional-outer` and `blocks-outer` compile the blocks without their checkpoint
(torch's eager checkpoint around each compiled call, as before checkpoints moved inside).

    python benchmarks/bench_train.py --variants eager,on --out $OUT        # GPU
    python benchmarks/bench_train.py --modes fast --checkpointing off --variants eager,on,full,regional+graphs
    python benchmarks/bench_train.py --methods lora,custom_diffusion --modes fast --variants eager,on
    python benchmarks/bench_train.py --tiny                                 # CPU check (aot_eager backend)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    GIB,
    MemorySampler,
    build_components,
    emit,
    markdown_table,
    out_dir,
    plain_table,
    profile_steps,
    provenance,
    run_job,
    synchronize,
    write_json,
)

SCRIPT = Path(__file__).resolve()
METHOD_NAMES = ("dreambooth", "lora", "custom_diffusion")
VARIANTS = ("eager", "on", "full", "full+graphs", "regional", "regional+graphs", "blocks", "blocks+graphs",
            "regional-outer", "blocks-outer")
TARGETS = {  # H100, seconds per step (issue 14)
    ("fast", True): 0.15, ("fast", False): 0.13, ("low_memory", True): 0.30, ("low_memory", False): 0.30,
}


def compile_variant(name: str, mode: str, backend: str):
    """The TrainingCompile of a variant name, None for eager."""
    from harness.trainer.compiled import ON, TrainingCompile

    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}.")
    if name == "eager":
        return None
    if name == "on":
        variant = ON[mode]
    else:
        name, outer = name.removesuffix("-outer"), name.endswith("-outer")
        scope, _, graphs = name.partition("+")
        variant = TrainingCompile(scope, cuda_graphs=graphs == "graphs", inner_checkpoints=not outer)
    return replace(variant, backend=backend)


def synthetic_training_data(components, resolution: int, instance_prompt: str = "a sks dog", encoded: bool = False):
    """Cached-latent and embedding stand-ins of the right shapes (what caches.py would hold); no instance embedding
    when the method encodes the instance prompt in each step."""
    import torch

    from harness.caches import LatentBank, TrainingData

    side = resolution // components.vae_scale_factor
    hidden = components.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)

    def bank(n: int) -> LatentBank:
        return LatentBank(mean=torch.randn(n, 4, side, side, generator=g),
                          std=0.05 * torch.rand(n, 4, side, side, generator=g))

    tokens = components.tokenizer.model_max_length
    instance = None if encoded else torch.randn(1, tokens, hidden, generator=g)
    return TrainingData(instance_latents=bank(4), instance_embedding=instance, instance_prompt=instance_prompt,
                        class_latents=bank(8), class_embedding=torch.randn(1, tokens, hidden, generator=g),
                        class_prompt="a dog")


def measure_training(opts: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from harness.config import TrainSpec
    from harness.methods import METHODS
    from harness.trainer import Speedups, advance, default_speedups, read_losses, start_session

    device = torch.device(opts["device"])
    if opts.get("bucket_elements"):
        from harness.trainer import optimizers

        optimizers.BUCKET_ELEMENTS = opts["bucket_elements"]
    components = build_components(opts["tiny"], opts["device"], torch.float32)
    spec = TrainSpec(method=opts["method"], steps=10_000, resolution=opts["resolution"], batch_size=1,
                     prior_loss_weight=1.0,
                     mixed_precision="bf16" if device.type == "cuda" else "no", optimizer="adamw8bit",
                     gradient_checkpointing=opts["gradient_checkpointing"], memory_mode=opts["mode"],
                     learning_rate=5e-6)
    method_cls = METHODS.get(opts["method"])
    settings, subject = method_cls.bind_subject(method_cls.settings_type(), _bench_subject())
    method = method_cls(settings, spec)
    variant = compile_variant(opts["variant"], opts["mode"], opts["backend"])
    base = default_speedups(device)
    speedups = Speedups(channels_last=base.channels_last, cudnn_benchmark=base.cudnn_benchmark, compile=variant)
    data = synthetic_training_data(components, opts["resolution"], subject.instance_text,
                                   encoded=method.encodes_in_step("instance"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    session = start_session(method, components, data, device, speedups)
    warm = read_losses([advance(session) for _ in range(opts["warmup_steps"])])
    synchronize(device)
    warmup_seconds = time.perf_counter() - began
    print(f"warm-up: {opts['warmup_steps']} steps in {warmup_seconds:.1f} s", flush=True)
    sampler = MemorySampler(device.index or 0) if device.type == "cuda" else None
    if sampler:
        sampler.start()
    synchronize(device)
    began = time.perf_counter()
    timed = read_losses([advance(session) for _ in range(opts["timed_steps"])])  # one read, as the loop does
    synchronize(device)
    seconds = (time.perf_counter() - began) / opts["timed_steps"]
    if sampler:
        sampler.stop()
    stock = _time_with_stock_bitsandbytes(session, opts["timed_steps"], device) if opts.get("stock_bnb_too") else None
    if not all(math.isfinite(x.instance) for x in warm + timed):
        raise RuntimeError("non-finite training loss")
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    memory = sampler.summary() if sampler else {"nvidia_smi_gib": None, "device_used_gib": None}
    profiled = (profile_steps(lambda: advance(session).instance.sum(), opts["profile"], device)
                if opts.get("profile") else {})
    return [{
        "kind": "training", "method": opts["method"], "mode": opts["mode"], "variant": opts["variant"],
        "bucket_elements": _bucket_elements() if opts["mode"] == "low_memory" else None,
        "compiled": None if session.compiled is None else session.compiled.describe(),  # as the method fitted it
        "gradient_checkpointing": spec.gradient_checkpointing, "seconds_per_step": seconds,
        "seconds_per_step_stock_bnb": stock,
        "warmup_steps": opts["warmup_steps"], "warmup_seconds": warmup_seconds,
        "compile_seconds": max(0.0, warmup_seconds - opts["warmup_steps"] * seconds) if variant else None,
        "timed_steps": opts["timed_steps"], "optimizer": session.optimizer_label, "resolution": opts["resolution"],
        "trainable_params": session.trainable_params, "export_bytes": _export_bytes(session),
        "peak_allocated_gib": peak, **memory, **profiled,
    }]


def _time_with_stock_bitsandbytes(session, steps: int, device) -> float:
    """Seconds per step for `steps` more steps with bitsandbytes' own update_step instead of the direct kernel
    calls (optimizers.direct_update): the same session, so the same compiled code and host."""
    from harness.trainer import advance, read_losses
    from harness.trainer.optimizers import adamw8bit_class

    adamw8bit_class().direct_calls = False
    synchronize(device)
    began = time.perf_counter()
    read_losses([advance(session) for _ in range(steps)])
    synchronize(device)
    return (time.perf_counter() - began) / steps


def _bucket_elements() -> int:
    from harness.trainer import optimizers

    return optimizers.BUCKET_ELEMENTS


def _bench_subject():
    from harness.config import SubjectSpec

    return SubjectSpec(name="dog", instance_dir=Path("."), class_noun="dog")


def _export_bytes(session) -> int:
    """The method's export written as a real run writes it (after training ends), measured on disk."""
    from harness.trainer.loop import disk_bytes, finish_session

    finish_session(session)
    with tempfile.TemporaryDirectory() as folder:
        return disk_bytes(session.method.export(session.components, Path(folder)))


def run_worker(payload: str) -> None:
    emit(measure_training(json.loads(payload)))


# --------------------------------------------------------------------------------------------------------------
# Jobs and the table


def training_job(device: str, tiny: bool, mode: str, checkpointing: bool, variant: str, steps: dict[str, int],
                 backend: str, method: str = "dreambooth", profile: int = 0,
                 bucket_elements: int | None = None, stock_bnb_too: bool = False) -> dict[str, Any]:
    return {"measure": "training", "device": device, "tiny": tiny, "resolution": 32 if tiny else 512,
            "method": method, "mode": mode, "gradient_checkpointing": checkpointing, "variant": variant,
            "backend": backend, "profile": profile, "bucket_elements": bucket_elements,
            "stock_bnb_too": stock_bnb_too, **steps}


def step_counts(tiny: bool, quick: bool) -> dict[str, int]:
    if tiny:
        return {"warmup_steps": 3, "timed_steps": 2}
    return {"warmup_steps": 3, "timed_steps": 10 if quick else 25}


HEADER = ["method", "mode", "checkpointing", "variant", "s/step", "warm-up s", "compile s", "peak alloc GiB",
          "nvidia-smi GiB", "trainable", "export", "target (H100)", "met"]


def table_rows(records: list[dict[str, Any]], tiny: bool) -> list[list[str]]:
    rows = []
    for r in records:
        if r.get("kind") != "training":
            continue
        ckpt = "on" if r.get("gradient_checkpointing", True) else "off"
        if "error" in r:
            rows.append([str(r.get("method")), str(r.get("mode")), ckpt, str(r.get("variant")), "", "", "", "", "", "",
                         "", "", r["error"]])
            continue
        target = TARGETS[(r["mode"], r["gradient_checkpointing"])]
        met = "-" if tiny else ("yes" if r["seconds_per_step"] <= target else "NO")
        buckets = f", buckets of {r['bucket_elements']}" if r.get("bucket_elements") else ""
        rows.append([r["method"], r["mode"], ckpt, f"{r['variant']}" + (f" ({r['compiled']})" if r["compiled"] else "")
                     + buckets,
                     f"{r['seconds_per_step']:.3f}", f"{r['warmup_seconds']:.0f}", _fmt(r["compile_seconds"], 0),
                     _fmt(r["peak_allocated_gib"]), _fmt(r.get("nvidia_smi_gib")), _count(r["trainable_params"]),
                     _size(r["export_bytes"]), f"<= {target} s", met])
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model at 32 px on the CPU (a check)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (a rough number, fast)")
    parser.add_argument("--methods", default="dreambooth", help=f"comma-separated, from {', '.join(METHOD_NAMES)}")
    parser.add_argument("--modes", default="fast,low_memory", help="memory modes, comma-separated")
    parser.add_argument("--checkpointing", default="on", help="gradient checkpointing: on, off or on,off")
    parser.add_argument("--variants", default="eager,on", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor; --tiny: aot_eager)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--timeout", type=float, default=420, help="seconds one measurement may take")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timed steps, profile this many more (torch.profiler): kernel time, launches "
                             "and the operators with the most CPU time, in bench_train.json")
    parser.add_argument("--bucket-elements", type=lambda v: [int(x) if x != "default" else None for x in v.split(",")],
                        default=[None], metavar="N[,N]",
                        help="low_memory: the most elements a bucket of parameters stepped together holds "
                             "(harness/trainer/optimizers.py BUCKET_ELEMENTS; 1: one parameter a bucket; "
                             "default: the harness's)")
    parser.add_argument("--stock-bnb-too", action="store_true",
                        help="after the timed steps, time as many with bitsandbytes' own update_step instead of "
                             "the direct kernel calls (seconds_per_step_stock_bnb in bench_train.json)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_train.md/.json (default: $OUT)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def jobs_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    steps = step_counts(args.tiny, args.quick)
    jobs = []
    methods = args.methods.split(",")
    if set(methods) - set(METHOD_NAMES):
        raise SystemExit(f"--methods: choose from {', '.join(METHOD_NAMES)}.")
    for method, mode in ((m, mode) for m in methods for mode in args.modes.split(",")):
        if (mode, True) not in TARGETS:
            raise SystemExit(f"--modes: unknown memory mode {mode!r}; choose from fast, low_memory.")
        for ckpt in args.checkpointing.split(","):
            if ckpt not in ("on", "off"):
                raise SystemExit(f"--checkpointing: {ckpt!r} is neither on nor off.")
            for variant in args.variants.split(","):
                compile_variant(variant, mode, backend)  # refuses unknown names before anything runs
                for buckets in args.bucket_elements:
                    jobs.append(training_job(device, args.tiny, mode, ckpt == "on", variant, steps, backend, method,
                                             args.profile, buckets, args.stock_bnb_too))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return 0
    began = time.perf_counter()
    records = []
    folder = out_dir(args.out)
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for job in jobs_of(args):
        label = f"training {job['method']} {job['mode']} checkpointing {job['gradient_checkpointing']} {job['variant']}"
        print(f"--- {label}", flush=True)
        records += run_job(SCRIPT, job, args.timeout, label)
        write_json(folder / "bench_train.json", {"provenance": provenance(command), "records": records})
    rows = table_rows(records, args.tiny)
    env = provenance(command)
    title = (f"bench_train: {'tiny model (CPU check)' if args.tiny else 'SD 1.5 architecture'}, random weights; "
             f"{env['gpu'] or 'no GPU'}; torch {env['torch']}, diffusers {env['diffusers']}, bitsandbytes "
             f"{env['bitsandbytes']}; commit {env['commit']}; {time.perf_counter() - began:.0f} s")
    print(title)
    print(plain_table(HEADER, rows))
    (folder / "bench_train.md").write_text(f"{title}\n\n{markdown_table(HEADER, rows)}\n", encoding="utf-8")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
