"""Model components and what is built from them: schedulers by name, the inference pipeline, prompt encoding.

`Components` holds the UNet, VAE, text encoder, tokenizer and scheduler config of a base model; a model backend
(harness/backends) loads them. Samplers and the inference pipeline are built here from the model's scheduler
config, so every caller uses the same names ("pndm", "dpmsolver++", ...).

What this module does not hold: where a model comes from (harness/backends), training, sampling loops, caching.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from packaging import version
from transformers import CLIPTextModel, CLIPTokenizer

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}


@dataclass
class Components:
    """The parts of a Stable Diffusion model that training and sampling use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    identity: str

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a protocol's dtype or mixed-precision name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}.") from None


@contextlib.contextmanager
def placed(modules: Sequence[torch.nn.Module], device: torch.device | str,
           dtype: torch.dtype | None = None) -> Iterator[None]:
    """The modules on `device` (and in `dtype` when given) for the duration, then back where and as they were, so
    a frozen part holds accelerator memory only while it works."""
    before = [(m, next(m.parameters()).device, next(m.parameters()).dtype) for m in modules]
    for module in modules:
        module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    try:
        yield
    finally:
        for module, where, was in before:
            module.to(device=where, dtype=was) if dtype is not None else module.to(where)


def transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of transformers' from_pretrained: renamed from `torch_dtype` to `dtype` in 4.56."""
    if version.parse(transformers.__version__) >= version.parse("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


# --------------------------------------------------------------------------------------------------------------
# Schedulers, pipelines, prompts


def sd15_scheduler_config() -> dict[str, Any]:
    """The noise schedule of Stable Diffusion 1.x (as in its scheduler/scheduler_config.json)."""
    return {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "skip_prk_steps": True,
    }


SCHEDULERS: dict[str, Callable[[dict], Any]] = {
    "ddpm": lambda config: DDPMScheduler.from_config(config),
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
}


def make_scheduler(scheduler_config: dict, name: str):
    """A fresh scheduler of kind `name` ("ddpm" for training, a sampler name otherwise) on the model's schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; valid names are {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[name](dict(scheduler_config))


def stepped_on_host(scheduler: Any) -> Any:
    """`scheduler`, with step() given each timestep as a number from a host copy of its timesteps.

    A pipeline hands step() the elements of `scheduler.timesteps`, which live on the GPU; PNDM, DDIM and DDPM use
    the value to index their CPU noise schedule and to compare it with 0, and each such read waits for the GPU to
    finish everything queued: three waits a denoising step, each leaving the GPU idle while the next step's kernels
    are launched (about 0.5 s of a 7.2 s batch of 32 class images on an H200). The number is the same value, so the
    images are the same, bit for bit. It relies on step() being called once per timestep, in order, as every
    text-to-image pipeline does; where the timestep passed can be read without waiting (a CPU run), it is checked
    against the copy, and a call beyond the copy passes the timestep through.
    """
    set_timesteps, step = scheduler.set_timesteps, scheduler.step
    host: list[float | int] = []
    position = [0]

    @functools.wraps(set_timesteps)
    def set_timesteps_and_copy(*args: Any, **kwargs: Any) -> None:
        set_timesteps(*args, **kwargs)
        host[:] = scheduler.timesteps.tolist()  # one wait per batch of images, not three per step
        position[0] = 0

    @functools.wraps(step)
    def step_with_host_timestep(model_output: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        index, position[0] = position[0], position[0] + 1
        if index >= len(host):
            return step(model_output, timestep, *args, **kwargs)
        if not (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu") and timestep != host[index]:
            raise RuntimeError(f"the sampler was stepped at timestep {timestep} where its schedule has "
                               f"{host[index]}: step() must follow scheduler.timesteps in order.")
        return step(model_output, host[index], *args, **kwargs)

    scheduler.set_timesteps, scheduler.step = set_timesteps_and_copy, step_with_host_timestep
    return scheduler


def make_pipeline(components: Components, sampler: str) -> StableDiffusionPipeline:
    """An inference pipeline over the components (shared, not copied), without a safety checker."""
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=stepped_on_host(make_scheduler(components.scheduler_config, sampler)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encode_prompts(components: Components, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The text encoder's last hidden states of the prompts: (len(prompts), max length, hidden)."""
    tokens = components.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return components.text_encoder(tokens.input_ids.to(device))[0]
