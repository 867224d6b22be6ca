"""Throughput of the evaluation stage on full-size, randomly initialised models, offline.

- Embedding: OpenCLIP ViT-B-32 (QuickGELU) and timm ViT-S/16, the architectures of the `clip_i`/`clip_t` and
  `dino`/`pres`/`div` backbones, with random weights; images/s through harness.embedders (decode + pinned
  preprocessing + forward, as the evaluator runs them) and for the forward pass alone.
- LPIPS (`div_lpips`, `div_lpips_class`): the lpips package's AlexNet and VGG16 networks with random trunks,
  through harness.perceptual's distance matrix as the scorer runs it (one group of 4 seeds of a prompt at a time:
  4 images, 6 pairs), images/s with decoding at 512 px.
- Sampling: the SD 1.5 architecture (random weights) through harness.sampling.generate, with the evaluation
  defaults (DPM-Solver++ 25 steps, guidance 7.5, 512 px, fp16), images/s for a few batch sizes.

Random weights are honest for time and memory only, never for image quality.

    python benchmarks/bench_eval.py --out benchmarks/results/bench_eval.md --json bench_eval.json   # GPU
    python benchmarks/bench_eval.py --tiny                                                          # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_images(n: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def full_size_embedders(device: str, batch_size: int):
    import open_clip
    import timm

    from harness.embedders import CLIP_MODEL, ClipEmbedder, DinoEmbedder, _clip_transform, pinned_dino_transform

    clip = open_clip.create_model(CLIP_MODEL, pretrained=None, force_quick_gelu=True)
    dino = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, global_pool="token")
    return {
        "clip ViT-B/32": ClipEmbedder(clip, _clip_transform(), open_clip.get_tokenizer(CLIP_MODEL), tag="bench:clip",
                                      model_id=CLIP_MODEL, source="random", preprocessing="", device=device,
                                      batch_size=batch_size),
        "dino ViT-S/16": DinoEmbedder(dino, pinned_dino_transform(), tag="bench:dino", model_id="vit_small_patch16_224",
                                      source="random", preprocessing="", device=device, batch_size=batch_size),
    }


def measure_embedding(device: str, n: int, batch_size: int, tiny: bool) -> list[dict[str, Any]]:
    import torch

    from harness.embedders import make_embedders

    embedders = make_embedders("tiny", device, batch_size) if tiny else full_size_embedders(device, batch_size)
    images = random_images(n, 512)
    rows = []
    for name, embedder in embedders.items():
        embedder.embed_images(images[:batch_size])  # warm-up
        _sync(device)
        started = time.perf_counter()
        embedder.embed_images(images)
        _sync(device)
        end_to_end = n / (time.perf_counter() - started)
        pixels = torch.stack([embedder.transform(im) for im in images[:batch_size]]).to(device)
        with torch.inference_mode():
            embedder._forward_images(pixels)
            _sync(device)
            started = time.perf_counter()
            repeats = max(1, n // batch_size)
            for _ in range(repeats):
                embedder._forward_images(pixels)
            _sync(device)
        forward_only = repeats * batch_size / (time.perf_counter() - started)
        rows.append({"what": f"embedding {name}", "batch": batch_size, "images_per_second": end_to_end,
                     "forward_only_images_per_second": forward_only})
    return rows


def measure_lpips(device: str, groups: int, seeds: int, tiny: bool) -> list[dict[str, Any]]:
    """Images/s of LPIPS over groups of `seeds` images, as the scorer computes them (no cache)."""
    from harness.perceptual import tiny_lpips

    size = 64 if tiny else 512
    images = random_images(groups * seeds, size)
    rows = []
    for net in ("alex",) if tiny else ("alex", "vgg"):
        network = tiny_lpips(device=device, net=net)  # the package's full-size network, random trunk
        _reset_peak(device)
        network.distance_matrix(images[:seeds])  # warm-up
        _sync(device)
        started = time.perf_counter()
        for g in range(groups):
            network.distance_matrix(images[g * seeds:(g + 1) * seeds])
        _sync(device)
        seconds = time.perf_counter() - started
        peak = _peak_gib(device)
        rows.append({"what": f"LPIPS {net}, groups of {seeds} seeds ({seeds * (seeds - 1) // 2} pairs), {size} px",
                     "batch": seeds, "images_per_second": groups * seeds / seconds, "peak_gib": peak})
    return rows


def _reset_peak(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1024**3 if torch.device(device).type == "cuda" else None


def measure_sampling(device: str, batches: list[int], images: int, tiny: bool) -> list[dict[str, Any]]:
    import torch
    from bench_train import build_components

    from harness.config import EvalSpec, SubjectSpec
    from harness.sampling import SampleRequest, generate, sampler_settings

    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    components = build_components(tiny, device, dtype)
    spec = EvalSpec(steps=2 if tiny else 25)
    settings = sampler_settings(spec, 32 if tiny else 512)
    subject = SubjectSpec(name="bench", instance_dir=Path("."), class_noun="dog")
    rows = []
    for batch in batches:
        with tempfile.TemporaryDirectory() as tmp:
            warm = [SampleRequest(subject.class_text, "class", 0, s) for s in range(batch)]
            generate(components, warm, Path(tmp) / "warm", settings, device, "fp16", {}, batch_size=batch)
            count = max(batch, images // batch * batch)
            requests = [SampleRequest(subject.class_text, "class", 0, s) for s in range(count)]
            _sync(device)
            started = time.perf_counter()
            generate(components, requests, Path(tmp) / "timed", settings, device, "fp16", {}, batch_size=batch)
            _sync(device)
            seconds = time.perf_counter() - started
        peak = _peak_gib(device)
        rows.append({"what": f"sampling {settings.sampler} {settings.steps} steps, guidance {settings.guidance_scale},"
                             f" {settings.resolution} px", "batch": batch, "images_per_second": count / seconds,
                     "peak_gib": peak})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| measurement | batch | images/s | forward only, images/s | peak allocated GiB |",
             "|---|---|---|---|---|"]
    for r in rows:
        fwd = r.get("forward_only_images_per_second")
        peak = r.get("peak_gib")
        lines.append(f"| {r['what']} | {r['batch']} | {r['images_per_second']:.1f} | "
                     f"{'' if fwd is None else f'{fwd:.0f}'} | {'' if peak is None else f'{peak:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a CPU check of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--embed-images", type=int, default=512)
    parser.add_argument("--embed-batch", type=int, default=64)
    parser.add_argument("--sampling-batches", default="4,8,16")
    parser.add_argument("--sampling-images", type=int, default=32)
    parser.add_argument("--lpips-groups", type=int, default=25, help="prompts of 4 seeds scored with LPIPS")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements (JSON) here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.embed_images, args.embed_batch, args.sampling_batches, args.sampling_images = 8, 4, "2", 2
        args.lpips_groups = 2
    rows = measure_embedding(args.device, args.embed_images, args.embed_batch, args.tiny)
    rows += measure_lpips(args.device, args.lpips_groups, 4, args.tiny)
    rows += measure_sampling(args.device, [int(b) for b in args.sampling_batches.split(",")], args.sampling_images,
                             args.tiny)
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    text = f"device: {device}; torch {torch.__version__}; random weights (speed only)\n\n{table(rows)}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
