"""Pretraining every toy-world model from scratch: `python -m harness.toyworld.pretrain --device cuda`.

Four stages, each seeded on its own so that running them together or one at a time gives the same weights:

  vae    AutoencoderKL on open-world renders (MSE + a small KL term); sets the latent scaling factor. Like SD's VAE
         it is a generic image codec: trained on the base world only, it cannot encode the subject's colours
  unet   UNet2DConditionModel and CLIPTextModel together on (latent, caption) pairs of the base world, SD 1.x's
         noise schedule, epsilon prediction, 10% empty captions for classifier-free guidance, EMA weights kept
  clip   the toy CLIP on (image, caption) pairs of the open world, symmetric contrastive loss
  dino   the toy DINO-role ViT: two renders of the same object (other setting, place, size, shade) are positives,
         every other object in the batch a negative; no captions

The outputs are written in half precision (they are small and the harness computes in float32 on a CPU) together
with `manifest.json`: the sha256 of every file, the vocabulary, this configuration, the command, the versions
and device, and each stage's time and final loss.

Determinism: the data, the initialisation and the order of every stage follow from the seed alone. On a CPU a
rerun gives bit-identical files (the tests check it). On a GPU, cuDNN's autotuning and atomic additions make reruns
differ in the last digits (two runs of the unet stage ended at losses 0.285659 and 0.285640); `--exact-kernels`
asks PyTorch for deterministic kernels, at a large cost in speed, and a few operations (upsampling's backward
pass) have none, so even then bit-identity across runs is not promised.

What this module does not hold: the architectures and loading (models.py), rendering (world.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.store import file_digest
from harness.toyworld import models as tm
from harness.toyworld.world import Scene, render_array, restage, sample_caption, sample_scene

STAGES = ("vae", "unet", "clip", "dino")
_STAGE_STREAM = {name: i + 1 for i, name in enumerate(STAGES)}
_T2I_SCENES_STREAM = 0
_VAE_SCENES_STREAM = len(STAGES) + 1


@dataclass(frozen=True)
class StageSpec:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 200
    weight_decay: float = 0.01
    bf16: bool = True  # autocast on a GPU; off where launching the extra cast kernels costs more than it saves


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    vae_images: int = 60_000  # open-world renders for the VAE
    t2i_images: int = 60_000  # base-world renders with captions for the text-to-image model
    clip_images: int = 60_000  # open-world renders with captions
    dino_objects: int = 30_000  # open-world objects, two renders each
    vae: StageSpec = StageSpec(steps=2000, batch_size=128, learning_rate=1e-3)
    # Large batches: at this size a step's time is mostly kernel launches, whatever the batch.
    unet: StageSpec = StageSpec(steps=3000, batch_size=1024, learning_rate=6e-4, warmup_steps=300, bf16=False)
    clip: StageSpec = StageSpec(steps=2500, batch_size=512, learning_rate=5e-4, weight_decay=0.1)
    dino: StageSpec = StageSpec(steps=2500, batch_size=512, learning_rate=5e-4, weight_decay=0.1)
    vae_kl_weight: float = 1e-6
    caption_keep: float = 0.6  # probability that a caption names each attribute
    caption_bare: float = 0.1  # probability that a caption is only "a <noun>"
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    ema_decay: float = 0.998
    dino_temperature: float = 0.1
    grad_clip: float = 1.0
    workers: int = field(default=0, compare=False)  # render processes; 0: one per CPU core


SCALES: dict[str, PretrainConfig] = {
    "full": PretrainConfig(),
    # Seconds on a CPU: checks the code and its determinism, the weights are useless.
    "ci": PretrainConfig(vae_images=64, t2i_images=64, clip_images=64, dino_objects=32,
                         vae=StageSpec(2, 8, 1e-3, 1), unet=StageSpec(2, 8, 4e-4, 1),
                         clip=StageSpec(2, 16, 5e-4, 1), dino=StageSpec(2, 16, 5e-4, 1)),
}


# --------------------------------------------------------------------------------------------------------------
# Data


def _render_one(scene: Scene) -> np.ndarray:
    return render_array(scene)


def render_all(scenes: Sequence[Scene], workers: int) -> np.ndarray:
    """(N, 64, 64, 3) uint8 renders; in worker processes when there are many."""
    if workers <= 1 or len(scenes) < 2000:
        return np.stack([render_array(s) for s in scenes])
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return np.stack(pool.map(_render_one, scenes, chunksize=256))


def stage_rng(config: PretrainConfig, stage: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STAGE_STREAM[stage]])


def t2i_scenes(config: PretrainConfig) -> list[Scene]:
    """The base-world scenes that the text-to-image model trains on."""
    rng = np.random.default_rng([config.seed, _T2I_SCENES_STREAM])
    return [sample_scene(rng, "base") for _ in range(config.t2i_images)]


def t2i_images(config: PretrainConfig) -> np.ndarray:
    return render_all(t2i_scenes(config), config.workers)


def vae_images(config: PretrainConfig) -> np.ndarray:
    """Open-world renders: the codec sees every look, as SD's VAE sees far more than any one concept."""
    rng = np.random.default_rng([config.seed, _VAE_SCENES_STREAM])
    return render_all([sample_scene(rng, "open") for _ in range(config.vae_images)], config.workers)


def to_pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------------
# One optimisation loop for every stage


def _schedule(spec: StageSpec) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimise(name: str, params: list[torch.nn.Parameter], loss_at: Callable[[int], torch.Tensor], spec: StageSpec,
             config: PretrainConfig, device: torch.device, after_step: Callable[[], None] | None = None) -> float:
    """AdamW, warmup, cosine decay to 10%; bf16 autocast on a GPU if the stage asks. Returns the last 10% mean loss."""
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec))
    use_bf16 = spec.bf16 and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    tail, start, every = [], time.time(), max(1, spec.steps // 10)
    for step in range(spec.steps):
        with autocast:
            loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step:
            after_step()
        if step >= spec.steps - max(1, spec.steps // 10):
            tail.append(loss.item())
        if (step + 1) % every == 0:
            print(f"  {name} step {step + 1}/{spec.steps}  loss {loss.item():.4f}  "
                  f"{(time.time() - start) / (step + 1):.3f} s/step", flush=True)
    return float(np.mean(tail))


def _generator(config: PretrainConfig, stage: str, device: torch.device) -> torch.Generator:
    torch.manual_seed(config.seed * 100 + _STAGE_STREAM[stage])  # module initialisation
    return torch.Generator(device).manual_seed(config.seed * 100 + _STAGE_STREAM[stage])


def _indices(generator: torch.Generator, n: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randint(n, (batch,), generator=generator, device=device)


# --------------------------------------------------------------------------------------------------------------
# Stages


def train_vae(config: PretrainConfig, out: Path, device: torch.device) -> dict[str, Any]:
    images = torch.from_numpy(vae_images(config)).to(device)
    gen = _generator(config, "vae", device)
    vae = tm.build_vae().to(device).train()

    def loss_at(step: int) -> torch.Tensor:
        x = to_pixels(images[_indices(gen, len(images), config.vae.batch_size, device)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return F.mse_loss(recon.float(), x) + config.vae_kl_weight * posterior.kl().mean()

    loss = optimise("vae", list(vae.parameters()), loss_at, config.vae, config, device)
    vae.eval()
    with torch.no_grad():
        sample = to_pixels(images[: min(len(images), 2048)])
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(256)])
    scaling = float(1.0 / latents.float().std())
    vae.register_to_config(scaling_factor=scaling)
    vae.to(torch.float16).save_pretrained(out / tm.PIPELINE_SUBDIR / "vae", safe_serialization=True)
    return {"final_loss": loss, "latent_scaling_factor": scaling}


def train_unet(config: PretrainConfig, out: Path, device: torch.device) -> dict[str, Any]:
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline

    from harness.models import sd15_scheduler_config

    vae_dir = out / tm.PIPELINE_SUBDIR / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"the unet stage needs the VAE in {vae_dir}; run the vae stage first (--stages vae,unet).")
    vae = _load_vae(vae_dir).to(device)
    rng = stage_rng(config, "unet")  # captions and caption dropout
    scenes = t2i_scenes(config)
    images = torch.from_numpy(t2i_images(config))
    mean, std = _encode(vae, images, device)
    scale = vae.config.scaling_factor
    gen = _generator(config, "unet", device)
    unet, text_encoder = tm.build_unet().to(device).train(), tm.build_text_encoder().to(device).train()
    noise_schedule = DDPMScheduler.from_config(sd15_scheduler_config())
    alphas = noise_schedule.alphas_cumprod.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]

    def loss_at(step: int) -> torch.Tensor:
        idx = _indices(gen, len(scenes), config.unet.batch_size, device)
        captions = [("" if rng.random() < config.caption_dropout else
                     sample_caption(scenes[i], rng, config.caption_keep, config.caption_bare)) for i in idx.tolist()]
        tokens = tm.tokenize(captions).to(device)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=device)) * scale
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, text_encoder(tokens)[0]).sample
        return F.mse_loss(prediction.float(), noise)

    def update_ema() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - config.ema_decay)

    loss = optimise("unet", params, loss_at, config.unet, config, device, after_step=update_ema)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tm.world_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config(sd15_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.to(torch.float16).save_pretrained(out / tm.PIPELINE_SUBDIR, safe_serialization=True)
    return {"final_loss": loss}


def _load_vae(folder: Path):
    """The VAE from its folder, built from its config so that re-saving it writes the same config.json bytes."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
    vae.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    return vae.float().eval()


def _encode(vae, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for chunk in images.split(512):
            dist = vae.encode(to_pixels(chunk.to(device))).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_clip(config: PretrainConfig, out: Path, device: torch.device) -> dict[str, Any]:
    from open_clip.loss import ClipLoss

    rng = stage_rng(config, "clip")
    scenes = [sample_scene(rng, "open") for _ in range(config.clip_images)]
    images = torch.from_numpy(render_all(scenes, config.workers)).to(device)
    gen = _generator(config, "clip", device)
    model = tm.build_clip().to(device).train()
    criterion = ClipLoss()

    def loss_at(step: int) -> torch.Tensor:
        idx = _indices(gen, len(scenes), config.clip.batch_size, device)
        captions = [sample_caption(scenes[i], rng, config.caption_keep, config.caption_bare) for i in idx.tolist()]
        image_features, text_features, logit_scale = model(to_pixels(images[idx]), tm.tokenize(captions).to(device))
        return criterion(image_features.float(), text_features.float(), logit_scale.float())

    loss = optimise("clip", list(model.parameters()), loss_at, config.clip, config, device)
    _save_half(model, out / tm.CLIP_FILE)
    return {"final_loss": loss, "logit_scale": float(model.logit_scale.detach().exp())}


def train_dino(config: PretrainConfig, out: Path, device: torch.device) -> dict[str, Any]:
    from open_clip.loss import ClipLoss

    rng = stage_rng(config, "dino")
    objects = [sample_scene(rng, "open") for _ in range(config.dino_objects)]
    views = [restage(o, rng) for o in objects] + [restage(o, rng) for o in objects]
    rendered = torch.from_numpy(render_all(views, config.workers)).to(device)
    first, second = rendered[: len(objects)], rendered[len(objects):]
    gen = _generator(config, "dino", device)
    encoder = tm.build_dino().to(device).train()
    width = encoder.num_features
    head = torch.nn.Sequential(torch.nn.Linear(width, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)).to(device)
    criterion = ClipLoss()
    inverse_temperature = torch.tensor(1.0 / config.dino_temperature, device=device)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(encoder.forward_features(pixels)[:, 0]).float(), dim=-1)

    def loss_at(step: int) -> torch.Tensor:
        idx = _indices(gen, len(objects), config.dino.batch_size, device)
        return criterion(embed(to_pixels(first[idx])), embed(to_pixels(second[idx])), inverse_temperature)

    loss = optimise("dino", [*encoder.parameters(), *head.parameters()], loss_at, config.dino, config, device)
    _save_half(encoder, out / tm.DINO_FILE)
    return {"final_loss": loss}


def _save_half(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


STAGE_FUNCTIONS: dict[str, Callable[[PretrainConfig, Path, torch.device], dict[str, Any]]] = {
    "vae": train_vae, "unet": train_unet, "clip": train_clip, "dino": train_dino,
}


# --------------------------------------------------------------------------------------------------------------
# Manifest


def weight_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name != tm.MANIFEST)


def write_manifest(out: Path, config: PretrainConfig, stage_records: dict[str, Any], command: str,
                   device: torch.device) -> dict[str, Any]:
    """manifest.json: checksums of every file plus how they were made; earlier stages' records are kept."""
    path = out / tm.MANIFEST
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    import diffusers
    import transformers

    stages = {**previous.get("stages", {}), **stage_records}
    manifest = {
        "files": {p.relative_to(out).as_posix(): file_digest(p) for p in weight_files(out)},
        "vocabulary": tm.token_list(),
        "reproduce": tm.REGENERATE,
        "config": asdict(replace(config, workers=0)),
        "stages": dict(sorted(stages.items(), key=lambda kv: STAGES.index(kv[0]))),
        "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return manifest


# --------------------------------------------------------------------------------------------------------------
# Command line


def pretrain(config: PretrainConfig, out: Path, stages: Iterable[str], device: torch.device,
             command: str = "", exact_kernels: bool = False) -> dict[str, Any]:
    """Runs the stages in order, writing their files and the manifest into `out`."""
    if exact_kernels:
        # Read when cuBLAS starts, which is at the first matrix product: early enough here.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 stages on a GPU
    if config.workers == 0:
        config = replace(config, workers=os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    for name in STAGES:
        if name not in stages:
            continue
        print(f"stage {name} on {device}", flush=True)
        start = time.time()
        record = STAGE_FUNCTIONS[name](config, out, device)
        record["seconds"] = round(time.time() - start, 1)
        record["command"] = command
        print(f"stage {name} done in {record['seconds']} s: {record}", flush=True)
        manifest = write_manifest(out, config, {name: record}, command, device)
    return manifest


def parse_steps(items: Sequence[str]) -> dict[str, int]:
    steps = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in STAGES or not value.isdigit():
            raise SystemExit(f"--steps {item!r}: write STAGE=N with STAGE one of {', '.join(STAGES)}.")
        steps[name] = int(value)
    return steps


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.toyworld.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=tm.WEIGHTS_DIR, help="output folder (default: the shipped one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--steps", action="append", default=[], metavar="STAGE=N", help="override a stage's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, help="override the number of base-world renders")
    parser.add_argument("--exact-kernels", action="store_true",
                        help="ask for deterministic GPU kernels (much slower; CPUs are always deterministic)")
    args = parser.parse_args(argv)
    _quiet_libraries()
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown stage(s) {unknown}; use a subset of {','.join(STAGES)}.")
    config = replace(SCALES[args.scale], seed=args.seed)
    if args.images:
        config = replace(config, t2i_images=args.images)
    for name, steps in parse_steps(args.steps).items():
        config = replace(config, **{name: replace(getattr(config, name), steps=steps)})
    command = "python -m harness.toyworld.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    pretrain(config, args.out, stages, torch.device(args.device), command.strip(), args.exact_kernels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
