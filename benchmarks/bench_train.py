"""Speed and memory of class-image generation and of training every method on SD 1.5-sized models, offline.

The models are full-size Stable Diffusion 1.5 architectures (UNet ~860M parameters, the SD VAE, a CLIP ViT-L/14
text encoder) built from configs with random weights: nothing is downloaded. That is honest for time and memory
only, never for image quality. Training goes through harness.trainer's own session (start_session / advance) with
each method's own preparation (harness/methods), and generation through harness.class_images.generate_images, so
the numbers are the harness's.

Each measurement runs in its own process so that one's memory never inflates another's. Prints one table:
class images per second (50 PNDM steps, guidance 7.5, 512 px) for the batch the harness picks and a few others,
then, for each method and memory mode, training seconds per step after warm-up, peak GPU memory
(torch.cuda.max_memory_allocated, and the process total that nvidia-smi reports, sampled in a thread during the
timed steps), the trainable parameters and the size on disk of the method's export (saved after the timed steps),
at 512 px, batch 1 + 1 class image, bf16 autocast, 8-bit AdamW, gradient checkpointing, each method's default
settings (LoRA rank 4 on the UNet; Custom Diffusion's cross-attention key/value and one token).

    python benchmarks/bench_train.py --out reports/bench_train.md     # GPU; writes the table and a .json beside it
    python benchmarks/bench_train.py --no-generation --methods lora,custom_diffusion --modes fast
    python benchmarks/bench_train.py --tiny                           # CPU check with the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1024**3
METHOD_NAMES = ("dreambooth", "lora", "custom_diffusion")
MEMORY_MODES = ("fast", "low_memory")
TARGETS = {  # H100, the settings above; (method, memory mode) -> target
    ("dreambooth", "fast"): {"seconds_per_step": 0.25, "nvidia_smi_gib": 11.7},
    ("dreambooth", "low_memory"): {"seconds_per_step": 0.50, "nvidia_smi_gib": 7.5},
    ("lora", "fast"): {"seconds_per_step": 0.15, "nvidia_smi_gib": 5.0},
    ("custom_diffusion", "fast"): {"seconds_per_step": 0.15, "nvidia_smi_gib": 6.0},
}
GENERATION_TARGET = {"images_per_second": 4.0}
SMI_QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
SPEEDUP_FLAGS = ("channels_last", "compile", "cudnn_benchmark")


# --------------------------------------------------------------------------------------------------------------
# Full-size SD 1.5 architecture with random weights


def sd15_unet_config() -> dict[str, Any]:
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def sd_vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def clip_vit_l_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_sd15_components(device: str, dtype):
    """SD 1.5-architecture components with random weights; the UNet is created directly on `device`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from harness.backends.tiny import build_clip_tokenizer
    from harness.models import Components, sd15_scheduler_config

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd15_unet_config())
    vae = AutoencoderKL(**sd_vae_config())
    text_encoder = CLIPTextModel(clip_vit_l_text_config(tokenizer))
    for module in (unet, vae, text_encoder):
        if dtype != torch.float32:
            module.to(dtype=dtype)
        module.eval()
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler_config=sd15_scheduler_config(), identity="bench-random-sd15")


def build_components(tiny: bool, device: str, dtype):
    from harness.backends.tiny import build_tiny_components

    if not tiny:
        return build_sd15_components(device, dtype)
    components = build_tiny_components()
    for module in (components.unet, components.vae, components.text_encoder):
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return components


# --------------------------------------------------------------------------------------------------------------
# Memory as nvidia-smi sees it


class MemorySampler(threading.Thread):
    """Samples this process's GPU memory (nvidia-smi) and the device's used memory every `period` seconds."""

    def __init__(self, device_index: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.device_index, self.period = device_index, period
        self.peak_smi_mib: float | None = None
        self.smi_source = "unavailable"
        self.peak_device_used: int | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        import torch

        while not self._stop_event.is_set():
            self._sample_smi()
            free, total = torch.cuda.mem_get_info(self.device_index)
            self.peak_device_used = max(self.peak_device_used or 0, total - free)
            self._stop_event.wait(self.period)

    def _sample_smi(self) -> None:
        try:
            out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return
        rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
        rows = [(int(pid), float(mib)) for pid, mib in rows if mib.strip().replace(".", "").isdigit()]
        mine = [mib for pid, mib in rows if pid == os.getpid()]
        if mine:
            self.smi_source = "pid"
        elif len(rows) == 1:  # inside a container the pid namespace differs; a lone process is this one
            mine, self.smi_source = [rows[0][1]], "only process"
        if mine:
            self.peak_smi_mib = max(self.peak_smi_mib or 0.0, mine[0])

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --------------------------------------------------------------------------------------------------------------
# Measurements (each in its own process)


def measure_generation(opts: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from harness.class_images import PoolSpec, generate_images
    from harness.config import ClassImageSpec, ModelSpec
    from harness.sampling import default_batch_size

    device = torch.device(opts["device"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    components = build_components(opts["tiny"], opts["device"], dtype)
    flags = _flags(opts["speedups"])
    if device.type == "cuda":
        _apply_generation_speedups(components.unet, flags)
    resolution, steps = opts["resolution"], opts["generation_steps"]
    pool = PoolSpec(model=ModelSpec(id="bench"), prompt="a photo of a dog", resolution=resolution,
                    sampler=ClassImageSpec(sampler="pndm", steps=steps, guidance_scale=7.5))
    picked = default_batch_size(device, resolution)
    batches = sorted({picked, *opts["generation_batches"]})
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            generate_images(pool, list(range(batch)), Path(tmp), components, device, batch)  # warm-up
            count = batch * opts["generation_rounds"]
            _synchronize(device)
            began = time.perf_counter()
            generate_images(pool, list(range(count)), Path(tmp), components, device, batch)
            _synchronize(device)
            seconds = time.perf_counter() - began
            records.append({"kind": "generation", "batch": batch, "harness_pick": batch == picked,
                            "speedups": "+".join(sorted(flags)) or "none",
                            "images": count, "images_per_second": count / seconds, "steps": steps,
                            "resolution": resolution})
    return records


def measure_training(opts: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from harness.config import TrainSpec
    from harness.methods import METHODS
    from harness.trainer import Speedups, advance, default_speedups, start_session

    device = torch.device(opts["device"])
    components = build_components(opts["tiny"], opts["device"], torch.float32)
    spec = TrainSpec(method=opts["method"], steps=10_000, resolution=opts["resolution"], batch_size=1,
                     prior_loss_weight=1.0, mixed_precision="bf16" if device.type == "cuda" else "no",
                     optimizer="adamw8bit", gradient_checkpointing=opts["gradient_checkpointing"],
                     memory_mode=opts["mode"], learning_rate=5e-6)
    method_cls = METHODS.get(opts["method"])
    settings, subject = method_cls.bind_subject(method_cls.settings_type(), _bench_subject())
    method = method_cls(settings, spec)
    speedups = _speedups(opts["speedups"], default_speedups(device), Speedups)
    data = synthetic_training_data(components, opts["resolution"], subject.instance_text,
                                   encoded=method.encodes_in_step("instance"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    session = start_session(method, components, data, device, speedups)
    for _ in range(opts["warmup_steps"]):
        advance(session)
    sampler = MemorySampler(device.index or 0) if device.type == "cuda" else None
    if sampler:
        sampler.start()
    _synchronize(device)
    began = time.perf_counter()
    for _ in range(opts["timed_steps"]):
        advance(session)
    _synchronize(device)
    seconds = (time.perf_counter() - began) / opts["timed_steps"]
    if sampler:
        sampler.stop()
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return [{
        "kind": "training", "method": opts["method"], "mode": opts["mode"], "speedups": asdict(speedups),
        "seconds_per_step": seconds, "gradient_checkpointing": spec.gradient_checkpointing,
        "optimizer": session.optimizer_label, "resolution": opts["resolution"],
        "trainable_params": session.trainable_params, "export_bytes": _export_bytes(session),
        "peak_allocated_gib": peak,
        "nvidia_smi_gib": sampler.peak_smi_mib / 1024 if sampler and sampler.peak_smi_mib else None,
        "nvidia_smi_source": sampler.smi_source if sampler else "unavailable",
        "device_used_gib": sampler.peak_device_used / GIB if sampler and sampler.peak_device_used else None,
        "warmup_steps": opts["warmup_steps"], "timed_steps": opts["timed_steps"],
    }]


def _bench_subject():
    from harness.config import SubjectSpec

    return SubjectSpec(name="dog", instance_dir=Path("."), class_noun="dog")


def _export_bytes(session) -> int:
    """The method's export written as a real run writes it (after training ends), measured on disk."""
    from harness.trainer.loop import disk_bytes, finish_session

    finish_session(session)
    with tempfile.TemporaryDirectory() as folder:
        return disk_bytes(session.method.export(session.components, Path(folder)))


def _flags(name: str) -> set[str]:
    return set(name.split("+")) - {"none", "default"}


def _apply_generation_speedups(unet, flags: set[str]) -> None:
    import torch

    if "channels_last" in flags:
        unet.to(memory_format=torch.channels_last)
    if "cudnn_benchmark" in flags:
        torch.backends.cudnn.benchmark = True
    if "compile" in flags:
        unet.compile()


def _speedups(name: str, default, speedups_cls):
    """A variant name ("default", "none" or flags joined by '+', e.g. "compile+cudnn_benchmark") as Speedups."""
    if name == "default":
        return default
    flags = _flags(name)
    return speedups_cls(channels_last="channels_last" in flags, compile_unet="compile" in flags,
                        cudnn_benchmark="cudnn_benchmark" in flags)


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


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


MEASUREMENTS = {"generation": measure_generation, "training": measure_training}


def run_worker(payload: str) -> None:
    opts = json.loads(payload)
    records = MEASUREMENTS[opts["measure"]](opts)
    print("BENCH_RECORDS " + json.dumps(records), flush=True)


def run_in_subprocess(opts: dict[str, Any]) -> list[dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(opts)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RECORDS ")]
    if done.returncode != 0 or not lines:
        what = opts["measure"] + (f" {opts.get('method')} {opts.get('mode')}" if opts["measure"] == "training" else "")
        return [{"kind": opts["measure"], "method": opts.get("method"), "mode": opts.get("mode"),
                 "error": f"{what} failed (exit {done.returncode}); see its output above"}]
    return json.loads(lines[-1][len("BENCH_RECORDS "):])


# --------------------------------------------------------------------------------------------------------------
# The table


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def _size(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def table_rows(records: list[dict[str, Any]], tiny: bool) -> list[list[str]]:
    rows = []
    for r in records:
        if "error" in r:
            what = " ".join(str(x) for x in (r["kind"], r.get("method"), r.get("mode")) if x)
            rows.append([what, "", "", "", "", "", "", "", "", r["error"]])
        elif r["kind"] == "generation":
            target = GENERATION_TARGET["images_per_second"]
            ok = None if tiny or not r["harness_pick"] else r["images_per_second"] >= target
            setting = f"batch {r['batch']}" + (" (harness)" if r["harness_pick"] else "")
            setting += "" if r["speedups"] == "none" else f", {r['speedups']}"
            rows.append(["class images", setting, f"{r['images_per_second']:.2f} img/s", "", "", "", "", "",
                         f">= {target} img/s" if r["harness_pick"] else "", _verdict(ok)])
        else:
            target = TARGETS.get((r["method"], r["mode"]))
            memory = r["nvidia_smi_gib"] if r["nvidia_smi_gib"] is not None else r["device_used_gib"]
            ok = None if tiny or memory is None or target is None else (
                r["seconds_per_step"] <= target["seconds_per_step"] and memory <= target["nvidia_smi_gib"])
            flags = "+".join(k for k, v in r["speedups"].items() if v) or "none"
            flags += "" if r["gradient_checkpointing"] else ", no grad. checkpointing"
            rows.append([f"train {r['method']} {r['mode']}", flags, f"{r['seconds_per_step']:.3f} s/step",
                         _fmt(r["peak_allocated_gib"]), _fmt(r["nvidia_smi_gib"]), _fmt(r["device_used_gib"]),
                         f"{r['trainable_params'] / 1e6:.3g} M", _size(r.get("export_bytes")),
                         f"<= {target['seconds_per_step']} s, <= {target['nvidia_smi_gib']} GiB" if target else "",
                         _verdict(ok)])
    return rows


HEADER = ["measure", "setting", "speed", "peak alloc GiB", "nvidia-smi GiB", "device used GiB", "trainable",
          "export", "target (H100)", "met"]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plain_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    out = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    import diffusers
    import torch

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


# --------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model at 32 px, 2 steps (a CPU check)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and images (a rough number, fast)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="fine-tuning methods to train, comma-separated")
    parser.add_argument("--modes", default="fast,low_memory", help="memory modes to train, comma-separated")
    parser.add_argument("--speedups", default="default",
                        help="training speedup variants, comma-separated: default, none, or flags joined by '+' "
                             f"from {', '.join(SPEEDUP_FLAGS)} (e.g. default,compile+cudnn_benchmark)")
    parser.add_argument("--generation-batches", default="1,8",
                        help="class-image batch sizes to time besides the harness's pick; empty for none")
    parser.add_argument("--generation-speedups", default="none",
                        help="class-image variants, comma-separated: none or flags joined by '+' from "
                             f"{', '.join(SPEEDUP_FLAGS)}; extra batch sizes are timed for the first only")
    parser.add_argument("--no-generation", action="store_true", help="skip the class-image measurement")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                        help="train with gradient checkpointing (the targets assume on)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table as markdown to FILE and the records as JSON beside it")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = {"device": device, "tiny": args.tiny, "resolution": 32 if args.tiny else 512,
            "gradient_checkpointing": args.gradient_checkpointing == "on"}
    if args.tiny:
        steps = {"warmup_steps": 1, "timed_steps": 1, "generation_steps": 2, "generation_rounds": 1}
    elif args.quick:
        steps = {"warmup_steps": 3, "timed_steps": 5, "generation_steps": 50, "generation_rounds": 1}
    else:
        steps = {"warmup_steps": 10, "timed_steps": 30, "generation_steps": 50, "generation_rounds": 2}
    jobs = []
    batches = [int(b) for b in args.generation_batches.split(",") if b.strip()]
    for i, variant in enumerate([] if args.no_generation else args.generation_speedups.split(",")):
        _check_variant("--generation-speedups", variant)
        extra = [] if args.tiny or i > 0 else batches
        jobs.append({**base, **steps, "measure": "generation", "generation_batches": extra, "speedups": variant})
    methods, modes = args.methods.split(","), args.modes.split(",")
    for name, allowed, option in ((methods, METHOD_NAMES, "--methods"), (modes, MEMORY_MODES, "--modes")):
        unknown = sorted(set(name) - set(allowed))
        if unknown:
            raise SystemExit(f"{option}: unknown {unknown}; choose from {', '.join(allowed)}.")
    for variant in args.speedups.split(","):
        _check_variant("--speedups", variant)
        for method in methods:
            for mode in modes:
                jobs.append({**base, **steps, "measure": "training", "method": method, "mode": mode,
                             "speedups": variant})
    return jobs


def _check_variant(option: str, variant: str) -> None:
    unknown = set(variant.split("+")) - {"default", "none", *SPEEDUP_FLAGS}
    if unknown:
        raise SystemExit(f"{option}: unknown {sorted(unknown)} in {variant!r}; use default, none or flags "
                         f"joined by '+' from {', '.join(SPEEDUP_FLAGS)}.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return 0
    began = time.perf_counter()
    records = []
    for job in plan(args):
        print(f"--- {job['measure']} {job.get('method', '')} {job.get('mode', '')} {job.get('speedups', '')}",
              file=sys.stderr, flush=True)
        records += run_in_subprocess(job)
    rows = table_rows(records, args.tiny)
    env = environment()
    model = "tiny model (CPU check; not comparable to targets)" if args.tiny else "SD 1.5 architecture"
    title = (f"bench_train: {model}, random weights; {env.get('gpu', 'no GPU')}; torch {env['torch']}, "
             f"diffusers {env['diffusers']}, bitsandbytes {env['bitsandbytes']}; {time.perf_counter() - began:.0f} s")
    print(title)
    print(plain_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{title}\n\n{markdown_table(rows)}\n", encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "records": records}, indent=2) + "\n",
                                                 encoding="utf-8")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
