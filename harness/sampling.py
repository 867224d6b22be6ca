"""Evaluation image generation: the same prompts and seeds for every snapshot and for the base model.

`eval_requests` lists what to generate for a subject (subject prompts x seeds, class prompts x seeds);
`generate` renders the missing ones in batches and writes each as a PNG with a JSON sidecar (prompt, seed, run key,
step, sampler, batch size, recipe, the PNG's size). Every image has its own generator, so an image never depends on
the batch it was rendered in, and a sampling pass killed half way resumes image by image; a damaged image is
rendered again. `eval.compile` picks the recipe of a new folder (harness/inference.py: eager, or the compiled fast
path); PNGs are encoded in threads while the GPU renders the next batch.

What this module does not hold: scoring (evaluator.py) or training. torch and diffusers are imported by the functions
that render, so listing requests and checking what is on disk stays light.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import EvalSpec, ModelSpec, SubjectSpec
from harness.progress import bar
from harness.prompts import class_prompts, subject_prompts
from harness.store import PNG_COMPRESS_LEVEL, atomic_path, atomic_write_json, image_is_whole, read_json, text_digest
from harness.timings import count

if TYPE_CHECKING:
    import torch

    from harness.inference import Recipe
    from harness.models import Components

SAMPLES_VERSION = 1
SAVE_THREADS = 4


@dataclass(frozen=True)
class SampleRequest:
    """One image to generate."""

    prompt: str
    prompt_kind: str  # "subject" or "class"
    prompt_index: int
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.prompt_kind}-{self.prompt_index:02d}-seed{self.seed}"


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str
    steps: int
    guidance_scale: float
    resolution: int


def sampler_settings(spec: EvalSpec, resolution: int) -> SamplerSettings:
    return SamplerSettings(spec.sampler, spec.steps, spec.guidance_scale, resolution)


def eval_requests(subject: SubjectSpec, spec: EvalSpec) -> list[SampleRequest]:
    """Subject prompts x seeds, then class prompts x seeds, in a fixed order."""
    requests = []
    for kind, prompts in (("subject", subject_prompts(subject, spec)), ("class", class_prompts(subject, spec))):
        for i, prompt in enumerate(prompts):
            requests.extend(SampleRequest(prompt, kind, i, seed) for seed in spec.seeds)
    return requests


def samples_key(subject: SubjectSpec, spec: EvalSpec, settings: SamplerSettings) -> str:
    """Identifies a set of evaluation images: changing prompts, seeds or the sampler gives a new folder."""
    identity = {
        "version": SAMPLES_VERSION,
        "requests": [asdict(r) for r in eval_requests(subject, spec)],
        "settings": asdict(settings),
    }
    return text_digest(json.dumps(identity, sort_keys=True), 12)


def base_samples_key(model: ModelSpec, subject: SubjectSpec, spec: EvalSpec, settings: SamplerSettings) -> str:
    model_id = json.dumps([model.id, model.revision, model.dtype])
    return text_digest(model_id + samples_key(subject, spec, settings), 12)


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def is_rendered(out_dir: Path, request: SampleRequest) -> bool:
    """An image counts once it is whole (store.image_is_whole); a damaged one is removed and rendered again,
    pixel for pixel."""
    png = out_dir / f"{request.stem}.png"
    return image_is_whole(png, sidecar(png))


def missing(out_dir: Path, requests: Sequence[SampleRequest]) -> list[SampleRequest]:
    return [r for r in requests if not is_rendered(out_dir, r)]


def read_samples(out_dir: Path, requests: Sequence[SampleRequest]) -> list[dict[str, Any]]:
    """The sidecars of rendered images, each with its image path."""
    records = []
    for r in requests:
        png = out_dir / f"{r.stem}.png"
        records.append({**read_json(sidecar(png)), "path": str(png.resolve())})
    return records


MAX_BATCH = 32


def default_batch_size(device: torch.device, resolution: int) -> int:
    """A batch that fits comfortably: large on big GPUs, small elsewhere (guidance doubles the UNet batch)."""
    import torch

    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, resolution)


def batch_for_memory(free_bytes: float, resolution: int) -> int:
    """The default sampling batch with `free_bytes` of GPU memory free: 60% of it for images, at most MAX_BATCH."""
    per_image = 0.6e9 * (resolution / 512) ** 2  # measured order of magnitude for SD1.5 at fp16 with guidance
    return int(max(1, min(MAX_BATCH, (free_bytes * 0.6) // per_image)))


def generate(
    components: Components,
    requests: Sequence[SampleRequest],
    out_dir: Path,
    settings: SamplerSettings,
    device: torch.device | str,
    dtype_name: str,
    meta: dict[str, Any],
    batch_size: int | None = None,
    unet: torch.nn.Module | None = None,
    progress: str = "sampling",
    compile: str | bool = "auto",
) -> int:
    """Renders the requests not yet on disk; returns how many were generated. `unet` overrides the model's UNet.

    Requests are rendered in aligned batches of their positions ([k*batch, (k+1)*batch)), and a folder keeps the
    batch size and the recipe its first images were rendered with, so an image re-rendered after a kill or a repair
    is the same, pixel for pixel, as in an uninterrupted pass. The compiled recipe pads the last batch to the full
    size (copies of its last request, dropped) so that its shapes never change.
    """
    import torch

    from harness.inference import choose_recipe
    from harness.models import torch_dtype

    device = torch.device(device)
    todo = missing(out_dir, requests)
    if not todo:
        return 0
    dtype = torch_dtype(dtype_name) if device.type == "cuda" else torch.float32
    recorded = read_recorded(out_dir)
    batch = batch_size or recorded.get("batch_size") or default_batch_size(device, settings.resolution)
    recipe, _ = choose_recipe(recorded.get("render"), compile, device, len(todo), "sampling.eval",
                              (batch, settings.resolution))
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(todo)
    starts = sorted({requests.index(r) // batch * batch for r in todo})
    shape = (batch, settings.resolution)
    with sampling_pipeline(components, unet, settings.sampler, device, dtype, recipe, shape) as (pipe, recipe), \
            torch.inference_mode(), ThreadPoolExecutor(SAVE_THREADS) as writers:
        images_bar = bar(total=len(todo), desc=progress)
        saving: list[Future] = []
        for start in starts:
            chunk = list(requests[start:start + batch])
            padded = chunk + [chunk[-1]] * (batch - len(chunk)) if recipe.compile else chunk
            images = _render(pipe, padded, settings, device)[: len(chunk)]
            _wait(saving, images_bar)  # the previous batch: at most two batches of images wait in memory
            sidecar_meta = {**meta, "batch_size": batch, "render": recipe.name}
            saving = [writers.submit(_save, out_dir, request, image, settings, sidecar_meta)
                      for request, image in zip(chunk, images, strict=True) if request in wanted]
        _wait(saving, images_bar)
        images_bar.close()
    count(len(todo), "images")
    return len(todo)


def sampling_pipeline(components: Components, unet: torch.nn.Module | None, sampler: str, device: torch.device,
                      dtype: torch.dtype, recipe: Recipe, shape: tuple[int, int]) -> contextlib.AbstractContextManager:
    """(pipeline, recipe used) for the duration, its modules in place (harness/inference.py)."""
    import torch

    from harness.inference import recipe_pipeline
    from harness.models import make_pipeline, placed

    @contextlib.contextmanager
    def eager_pipeline():
        pipe = make_pipeline(components, sampler)
        if unet is not None:
            pipe.unet = unet
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        # A UNet handed over by the trainer is already in place; the model's own UNet travels with the frozen parts.
        # Modules are moved, never cast (autocast sets the precision): a cast there and back would round weights that
        # are still training (a trained text encoder, a trained token embedding, adapters).
        modules = [components.vae, components.text_encoder] + ([components.unet] if unet is None else [])
        with placed(modules, device), autocast:
            yield pipe

    return recipe_pipeline(components, unet or components.unet, sampler, device, dtype, recipe, shape,
                           eager_pipeline)


def _wait(futures: list[Future], images_bar: Any) -> None:
    for future in futures:
        future.result()  # re-raises a failed write
    images_bar.update(len(futures))


def read_recorded(out_dir: Path) -> dict[str, Any]:
    """What the folder's images were rendered with (batch_size, render), from their sidecars; {} for a new folder."""
    for path in sorted(Path(out_dir).glob("*.json")) if Path(out_dir).is_dir() else []:
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        batch = record.get("batch_size") if isinstance(record, dict) else None
        if isinstance(batch, int) and batch > 0:
            return {"batch_size": batch, "render": record.get("render", "eager")}
    return {}


def recorded_batch(out_dir: Path) -> int | None:
    """The batch size the folder's images were rendered with, from their sidecars (None for a new folder)."""
    return read_recorded(out_dir).get("batch_size")


def _render(pipe, chunk: Sequence[SampleRequest], settings: SamplerSettings, device: torch.device) -> list:
    return render(pipe, [r.prompt for r in chunk], [r.seed for r in chunk], settings.resolution, settings.steps,
                  settings.guidance_scale, device)


def render(pipe, prompts: Sequence[str], seeds: Sequence[int], resolution: int, steps: int, guidance_scale: float,
           device: torch.device, negative_prompt: str = "") -> list:
    """One image per (prompt, seed). Latents and sampler noise come from each image's own CPU generator, so an
    image is the same on every device and in every batch (up to float rounding of batched kernels)."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    side = resolution // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, side, side)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
    images = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        height=resolution,
        width=resolution,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=latents.to(device=device, dtype=pipe.unet.dtype),
        generator=generators,
        output_type="pt",
    ).images
    return to_pil(images)


def to_pil(images: torch.Tensor) -> list:
    """PIL images from a batch in [0, 1] (diffusers' "pt" output), rounded on the device exactly as diffusers'
    "pil" output rounds on the host (float32 x 255, round half to even, uint8): the same pixels, with a quarter of
    the bytes to copy and none of the float arithmetic left to the thread that drives the GPU."""
    import torch
    from PIL import Image

    pixels = images.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p.squeeze(-1)) for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def _save(out_dir: Path, request: SampleRequest, image, settings: SamplerSettings, meta: dict[str, Any]) -> None:
    png = out_dir / f"{request.stem}.png"
    with atomic_path(png) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    record = {**asdict(request), **{f"sampler_{k}": v for k, v in asdict(settings).items()}, **meta,
              "bytes": png.stat().st_size}
    atomic_write_json(sidecar(png), record)
