"""Throughput of image generation and scoring on full-size, randomly initialised models, offline.

- Sampling, through the harness's own functions, for each recipe (harness/inference.py): evaluation images
  (harness.sampling.generate: DPM-Solver++ 25 steps, guidance 7.5, 512 px, fp16) and class images
  (harness.class_images.generate_images: PNDM 50 steps, guidance 7.5), images/s after a first batch that is timed
  apart (compilation included), for the batch the harness picks and any others asked for. A recipe is `eager`,
  `compiled`, or `compiled` with flags changed: `+graphs` (CUDA graphs), `-fuse` (no fused QKV), `-cl` (no
  channels_last), `-vae` (VAE decoder not compiled), e.g. `compiled-fuse-cl`.
- Breakdown of one batch: denoising loop, VAE decode, PNG encoding (one thread), per recipe.
- Embedding: OpenCLIP ViT-B-32 (QuickGELU) and timm ViT-S/16, the architectures of the CLIP and DINO backbones,
  through harness.embedders (decode + pinned preprocessing + forward) and for the forward pass alone.
- LPIPS (`div_lpips`, `div_lpips_class`): the lpips package's AlexNet and VGG16 networks with random trunks,
  through harness.perceptual's distance matrix as the scorer runs it (one group of 4 seeds of a prompt at a time:
  4 images, 6 pairs), images/s at 512 px.

Each measurement runs in its own process under a time limit. Random weights: honest for time and memory only.

    python benchmarks/bench_eval.py --recipes eager,compiled --out $OUT     # GPU
    python benchmarks/bench_eval.py --tiny                                  # CPU check (aot_eager backend)
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    GIB,
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
FLAGS = {"fuse": "fuse_qkv", "cl": "channels_last", "vae": "compile_vae"}
TARGETS = {"eval": 6.0, "class": 4.5}  # H100, images/s (issue 14)
SETTINGS = {"eval": ("dpmsolver++", 25), "class": ("pndm", 50)}


def recipe_of(name: str, backend: str):
    """The Recipe a name spells ("eager", "compiled", "compiled-fuse+graphs"...)."""
    from harness.inference import COMPILED, EAGER, RECIPES

    if name == EAGER:
        return RECIPES[EAGER]
    flags = "fuse|cl|vae|graphs|autotune|tuned"
    if not name.startswith(COMPILED) or not re.fullmatch(rf"([+-]({flags}))*", name[len(COMPILED):]):
        raise SystemExit(f"unknown recipe {name!r}: eager, compiled, or compiled with +/- {flags.replace('|', ', ')}.")
    recipe = replace(RECIPES[COMPILED], backend=backend)
    for sign, flag in re.findall(rf"([+-])({flags})", name[len(COMPILED):]):
        if flag == "graphs":
            recipe = replace(recipe, mode="reduce-overhead" if sign == "+" else None)
        elif flag == "autotune":
            recipe = replace(recipe, mode="max-autotune-no-cudagraphs" if sign == "+" else None)
        elif flag == "tuned" and sign == "+":
            _tune_inductor()
        else:
            recipe = replace(recipe, **{FLAGS[flag]: sign == "+"})
    return recipe


def _tune_inductor() -> None:
    """Inductor settings diffusers' inference guide suggests for UNets (1x1 convolutions as matrix products,
    coordinate-descent tuning of the generated kernels, no epilogue fusion), for this worker process."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.coordinate_descent_check_all_directions = True
    inductor.epilogue_fusion = False


def _use_recipe(name: str, backend: str) -> bool:
    """Makes `name` the recipe `compile: true` renders with (in this worker process); True when it compiles."""
    from harness import inference

    recipe = recipe_of(name, backend)
    if recipe.compile:
        inference.RECIPES[inference.COMPILED] = recipe
    return recipe.compile


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.device(device).type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------------------------------------
# Sampling


def render_eval(components, folder: Path, count: int, batch: int, opts: dict[str, Any], compiled: bool) -> None:
    from harness.sampling import SampleRequest, SamplerSettings, generate

    sampler, steps = SETTINGS["eval"]
    settings = SamplerSettings(sampler, 2 if opts["tiny"] else steps, 7.5, opts["resolution"])
    requests = [SampleRequest(f"a photo of a dog, view {i % 7}", "class", i % 7, i) for i in range(count)]
    generate(components, requests, folder, settings, opts["device"], "fp16", {}, batch_size=batch, compile=compiled)


def render_class(components, folder: Path, count: int, batch: int, opts: dict[str, Any], compiled: bool) -> None:
    from harness.class_images import PoolSpec, generate_images
    from harness.config import ClassImageSpec, ModelSpec

    sampler, steps = SETTINGS["class"]
    spec = ClassImageSpec(sampler=sampler, steps=2 if opts["tiny"] else steps, guidance_scale=7.5, compile=compiled)
    pool = PoolSpec(model=ModelSpec(id="bench"), prompt="a photo of a dog", resolution=opts["resolution"],
                    sampler=spec)
    generate_images(pool, list(range(count)), folder, components, opts["device"], batch)


RENDER = {"eval": render_eval, "class": render_class}


def measure_sampling(opts: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from harness.sampling import default_batch_size

    device = torch.device(opts["device"])
    compiled = _use_recipe(opts["recipe"], opts["backend"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    components = build_components(opts["tiny"], opts["device"], dtype)
    picked = default_batch_size(device, opts["resolution"])
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in opts["kinds"]:
            for batch in sorted({picked, *opts["batches"]}):
                _reset_peak(device)
                synchronize(device)
                began = time.perf_counter()
                RENDER[kind](components, Path(tmp) / f"{kind}-{batch}-first", batch, batch, opts, compiled)
                synchronize(device)
                first = time.perf_counter() - began
                count = batch * opts["rounds"][kind]
                began = time.perf_counter()
                RENDER[kind](components, Path(tmp) / f"{kind}-{batch}-timed", count, batch, opts, compiled)
                synchronize(device)
                rate = count / (time.perf_counter() - began)
                print(f"{kind} batch {batch}: first batch {first:.1f} s, then {rate:.2f} images/s", flush=True)
                records.append({
                    "kind": "sampling", "what": kind, "recipe": opts["recipe"], "batch": batch,
                    "harness_pick": batch == picked, "images": count, "images_per_second": rate,
                    "first_batch_seconds": first, "compile_seconds": max(0.0, first - batch / rate) if compiled
                    else None, "steps": 2 if opts["tiny"] else SETTINGS[kind][1], "sampler": SETTINGS[kind][0],
                    "resolution": opts["resolution"], "peak_allocated_gib": _peak_gib(device)})
    return records


def measure_breakdown(opts: dict[str, Any]) -> list[dict[str, Any]]:
    """One evaluation batch split into its parts: the denoising loop, the VAE decode, the PNG encoding."""
    import torch

    from harness.inference import RECIPES
    from harness.sampling import sampling_pipeline, to_pil
    from harness.store import PNG_COMPRESS_LEVEL

    device = torch.device(opts["device"])
    _use_recipe(opts["recipe"], opts["backend"])
    recipe = RECIPES["compiled"] if opts["recipe"] != "eager" else RECIPES["eager"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    components = build_components(opts["tiny"], opts["device"], dtype)
    batch, resolution = opts["batch"], opts["resolution"]
    steps = 2 if opts["tiny"] else SETTINGS["eval"][1]
    timings: dict[str, list[float]] = {"denoise": [], "decode": [], "png": []}
    with sampling_pipeline(components, None, "dpmsolver++", device, dtype, recipe, (batch, resolution)) as (
            pipe, used), torch.inference_mode():
        for _ in range(opts["repeats"] + 1):  # the first round warms up (and compiles)
            generators = [torch.Generator().manual_seed(i) for i in range(batch)]
            side = resolution // pipe.vae_scale_factor
            latents = torch.stack([torch.randn((4, side, side), generator=g) for g in generators]).to(device, dtype)
            synchronize(device)
            began = time.perf_counter()
            denoised = pipe(prompt=["a photo of a dog"] * batch, height=resolution, width=resolution,
                            num_inference_steps=steps, guidance_scale=7.5, latents=latents, generator=generators,
                            output_type="latent").images
            synchronize(device)
            timings["denoise"].append(time.perf_counter() - began)
            began = time.perf_counter()
            decoded = pipe.vae.decode(denoised / pipe.vae.config.scaling_factor, return_dict=False)[0]
            synchronize(device)
            timings["decode"].append(time.perf_counter() - began)
            began = time.perf_counter()
            for image in to_pil(pipe.image_processor.postprocess(decoded, output_type="pt")):
                image.save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            timings["png"].append(time.perf_counter() - began)
        profiled = profile_steps(lambda: pipe(prompt=["a photo of a dog"] * batch, height=resolution,
                                              width=resolution, num_inference_steps=steps, guidance_scale=7.5,
                                              latents=latents, generator=generators, output_type="latent"),
                                 1, device) if opts.get("profile") else {}
    parts = {part: sum(values[1:]) / opts["repeats"] for part, values in timings.items()}
    return [{**profiled, "kind": "breakdown", "recipe": opts["recipe"], "recipe_used": used.name, "batch": batch,
             "first_round_seconds": sum(v[0] for v in timings.values()), **{f"{k}_seconds": v for k, v in
                                                                             parts.items()},
             "images_per_second_without_png": batch / (parts["denoise"] + parts["decode"])}]


# --------------------------------------------------------------------------------------------------------------
# Embedding


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


def measure_embedding(opts: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from harness.embedders import make_embedders

    device, n, batch_size = opts["device"], opts["images"], opts["batch"]
    embedders = make_embedders("tiny", device, batch_size) if opts["tiny"] else full_size_embedders(device, batch_size)
    images = random_images(n, 512)
    rows = []
    for name, embedder in embedders.items():
        embedder.embed_images(images[:batch_size])  # warm-up
        synchronize(device)
        started = time.perf_counter()
        embedder.embed_images(images)
        synchronize(device)
        end_to_end = n / (time.perf_counter() - started)
        pixels = torch.stack([embedder.transform(im) for im in images[:batch_size]]).to(device)
        with torch.inference_mode():
            embedder._forward_images(pixels)
            synchronize(device)
            started = time.perf_counter()
            repeats = max(1, n // batch_size)
            for _ in range(repeats):
                embedder._forward_images(pixels)
            synchronize(device)
        forward_only = repeats * batch_size / (time.perf_counter() - started)
        rows.append({"kind": "embedding", "what": name, "batch": batch_size, "images_per_second": end_to_end,
                     "forward_only_images_per_second": forward_only})
    both = 1.0 / sum(1.0 / r["images_per_second"] for r in rows)
    rows.append({"kind": "scoring", "what": "one image through every backbone", "images_per_second": both})
    return rows


def measure_lpips(opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Images/s of LPIPS over groups of `seeds` images, as the scorer computes them (no cache)."""
    from harness.perceptual import tiny_lpips

    device, groups, seeds = opts["device"], opts["groups"], opts["seeds"]
    size = 64 if opts["tiny"] else 512
    images = random_images(groups * seeds, size)
    rows = []
    for net in ("alex",) if opts["tiny"] else ("alex", "vgg"):
        network = tiny_lpips(device=device, net=net)  # the package's full-size network, random trunk
        _reset_peak(device)
        network.distance_matrix(images[:seeds])  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for g in range(groups):
            network.distance_matrix(images[g * seeds:(g + 1) * seeds])
        synchronize(device)
        rows.append({"kind": "lpips", "what": f"LPIPS {net}, groups of {seeds} seeds ({seeds * (seeds - 1) // 2} "
                     f"pairs), {size} px", "batch": seeds, "images_per_second": groups * seeds /
                     (time.perf_counter() - started), "peak_allocated_gib": _peak_gib(device)})
    return rows


MEASUREMENTS = {"sampling": measure_sampling, "breakdown": measure_breakdown, "embedding": measure_embedding,
                "lpips": measure_lpips}


def run_worker(payload: str) -> None:
    opts = json.loads(payload)
    emit(MEASUREMENTS[opts["measure"]](opts))


# --------------------------------------------------------------------------------------------------------------
# Jobs and the table


def sampling_job(device: str, tiny: bool, recipe: str, kinds: list[str], batches: list[int], backend: str,
                 rounds: dict[str, int] | None = None) -> dict[str, Any]:
    return {"measure": "sampling", "device": device, "tiny": tiny, "resolution": 32 if tiny else 512,
            "recipe": recipe, "kinds": kinds, "batches": batches, "backend": backend,
            "rounds": rounds or ({"eval": 1, "class": 1} if tiny else {"eval": 3, "class": 2})}


def breakdown_job(device: str, tiny: bool, recipe: str, batch: int, backend: str,
                  profile: bool = False) -> dict[str, Any]:
    return {"measure": "breakdown", "device": device, "tiny": tiny, "resolution": 32 if tiny else 512,
            "recipe": recipe, "batch": batch, "backend": backend, "repeats": 1 if tiny else 2, "profile": profile}


def embedding_job(device: str, tiny: bool) -> dict[str, Any]:
    return {"measure": "embedding", "device": device, "tiny": tiny, "images": 8 if tiny else 512,
            "batch": 4 if tiny else 64}


def lpips_job(device: str, tiny: bool) -> dict[str, Any]:
    return {"measure": "lpips", "device": device, "tiny": tiny, "groups": 2 if tiny else 25, "seeds": 4}


HEADER = ["measure", "setting", "images/s", "first batch s", "compile s", "peak alloc GiB", "target (H100)", "met"]


def table_rows(records: list[dict[str, Any]], tiny: bool) -> list[list[str]]:
    rows = []
    for r in records:
        if "error" in r:
            rows.append([str(r.get("kind")), str(r.get("recipe", "")), "", "", "", "", "", r["error"]])
        elif r["kind"] == "sampling":
            target = TARGETS[r["what"]]
            met = "-" if tiny or not r["harness_pick"] else ("yes" if r["images_per_second"] >= target else "NO")
            setting = f"{r['what']} {r['sampler']} {r['steps']} steps, {r['recipe']}, batch {r['batch']}"
            rows.append(["sampling", setting + (" (harness)" if r["harness_pick"] else ""),
                         f"{r['images_per_second']:.2f}", f"{r['first_batch_seconds']:.1f}",
                         "" if r["compile_seconds"] is None else f"{r['compile_seconds']:.0f}",
                         "" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.1f}",
                         f">= {target}" if r["harness_pick"] else "", met])
        elif r["kind"] == "breakdown":
            setting = (f"batch {r['batch']}, {r['recipe_used']}: denoise {r['denoise_seconds']:.2f} s, decode "
                       f"{r['decode_seconds']:.2f} s, PNG {r['png_seconds']:.2f} s")
            rows.append(["breakdown", setting, f"{r['images_per_second_without_png']:.2f} (no PNG)",
                         f"{r['first_round_seconds']:.1f}", "", "", "", "-"])
        else:
            forward = r.get("forward_only_images_per_second")
            setting = r["what"] + (f", batch {r['batch']}, forward alone {forward:.0f}/s" if forward else "")
            rows.append([r["kind"], setting, f"{r['images_per_second']:.1f}", "", "", "", "", "-"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a check)")
    parser.add_argument("--recipes", default="eager,compiled", help="sampling recipes, comma-separated")
    parser.add_argument("--kinds", default="eval,class", help="eval, class or both")
    parser.add_argument("--batches", default="", help="batch sizes besides the harness's pick, comma-separated")
    parser.add_argument("--breakdown", action="store_true", help="also split one batch into its parts")
    parser.add_argument("--profile", action="store_true",
                        help="with --breakdown: profile one denoising pass (kernel time, launches, heaviest kernels)")
    parser.add_argument("--no-embedding", action="store_true", help="skip the embedding and LPIPS measurements")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor; --tiny: aot_eager)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--timeout", type=float, default=420, help="seconds one measurement may take")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_eval.md/.json (default: $OUT)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def jobs_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    kinds = args.kinds.split(",")
    if set(kinds) - set(RENDER):
        raise SystemExit(f"--kinds: choose from {', '.join(RENDER)}.")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    jobs = []
    for recipe in args.recipes.split(","):
        recipe_of(recipe, backend)  # refuses unknown names before anything runs
        jobs.append(sampling_job(device, args.tiny, recipe, kinds, batches, backend))
        if args.breakdown:
            jobs.append(breakdown_job(device, args.tiny, recipe, 2 if args.tiny else 32, backend, args.profile))
    if not args.no_embedding:
        jobs.append(embedding_job(device, args.tiny))
        jobs.append(lpips_job(device, args.tiny))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return 0
    began = time.perf_counter()
    folder = out_dir(args.out)
    command = "python benchmarks/bench_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    records: list[dict[str, Any]] = []
    for job in jobs_of(args):
        label = f"{job['measure']} {job.get('recipe', '')}".strip()
        print(f"--- {label}", flush=True)
        records += run_job(SCRIPT, job, args.timeout, label)
        write_json(folder / "bench_eval.json", {"provenance": provenance(command), "records": records})
    env = provenance(command)
    title = (f"bench_eval: {'tiny models (CPU check)' if args.tiny else 'SD 1.5 architecture'}, random weights; "
             f"{env['gpu'] or 'no GPU'}; torch {env['torch']}; commit {env['commit']}; "
             f"{time.perf_counter() - began:.0f} s")
    rows = table_rows(records, args.tiny)
    print(title)
    print(plain_table(HEADER, rows))
    (folder / "bench_eval.md").write_text(f"{title}\n\n{markdown_table(HEADER, rows)}\n", encoding="utf-8")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
