"""Randomness of training as a pure function of (seed, step): the data order, latent samples, noise and timesteps.

The images a step uses come from per-epoch permutations seeded by the run's seed; the latent samples, noise,
offset noise and timesteps of step s come from a generator seeded by (seed, s), and torch's global generators are
seeded by (seed, s) before the step for what a model draws itself (LoRA's dropout). All of it is drawn on the CPU,
so a run started again from step 0 replays exactly the same data and noise, and a resumed run continues exactly
where its checkpoint left it.

What this module does not hold: the loss or the model (loop.py).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from harness.caches import TrainingData
from harness.config import TrainSpec


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose of one run (e.g. ("noise", 12)), independent of every other purpose."""
    text = "/".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def stream_indices(n: int, batch_size: int, seed: int, stream: str, step: int) -> list[int]:
    """The indices step `step` takes: positions step*b..step*b+b-1 of a stream of per-epoch permutations of n."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(_epoch_order(n, seed, stream, epoch)[offset])
    return out


@functools.lru_cache(maxsize=64)
def _epoch_order(n: int, seed: int, stream: str, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derive_seed(seed, stream, "epoch", epoch))
    return tuple(torch.randperm(n, generator=generator).tolist())


def seed_global_rng(seed: int, step: int) -> None:
    """Seeds torch's global generators for step `step`: what a model draws on its own (LoRA dropout) is then a pure
    function of (seed, step) too, and the same after a resume."""
    torch.manual_seed(derive_seed(seed, "global", step))


@dataclass(frozen=True)
class StepInputs:
    latents: torch.Tensor  # scaled latents: instance samples first, then class samples
    noise: torch.Tensor
    timesteps: torch.Tensor
    num_instance: int


def draw_step_inputs(
    data: TrainingData, spec: TrainSpec, step: int, latent_scale: float, num_timesteps: int, device: torch.device
) -> StepInputs:
    """Everything random about step `step`, drawn on the CPU in a fixed order. Class latents only with a prior."""
    generator = torch.Generator().manual_seed(derive_seed(spec.seed, "noise", step))
    instance = stream_indices(len(data.instance_latents), spec.batch_size, spec.seed, "instance", step)
    parts = [data.instance_latents.sample(instance, generator)]
    if spec.uses_prior:
        chosen = stream_indices(len(data.class_latents), spec.batch_size, spec.seed, "class", step)
        parts.append(data.class_latents.sample(chosen, generator))
    latents = torch.cat(parts) * latent_scale
    noise = torch.randn(latents.shape, generator=generator)
    if spec.offset_noise > 0:
        noise = noise + spec.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
    return StepInputs(latents=to_device(latents, device), noise=to_device(noise, device),
                      timesteps=to_device(timesteps, device), num_instance=len(instance))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without waiting for the GPU: a copy from pageable memory would first wait for all the
    work queued before it, a copy from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
