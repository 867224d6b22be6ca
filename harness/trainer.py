"""The shared DreamBooth trainer: full-UNet fine-tuning with prior preservation, snapshots handed to sampling.

`train(run, folder, components, data, on_snapshot, device, pending_snapshots)` trains `components.unet` in place
from cached latent distributions and text embeddings (caches.TrainingData). One step takes a batch of instance
latents with the instance prompt and, when the prior weight is above 0, as many class latents with the class
prompt (the diffusers example's counting); the loss is losses.prior_preservation_loss.

Decisions worth knowing:
- Randomness is a pure function of (seed, step): the images a step uses come from per-epoch permutations seeded by
  the run's seed, and the latent samples, noise, offset noise and timesteps of step s come from a generator seeded
  by (seed, s). All of it is drawn on the CPU, so a run started again from step 0 replays exactly the same data and
  noise, and a resumed run continues exactly where a checkpoint left it.
- Snapshots: the caller says which snapshot steps still need sampling (`pending_snapshots`; None means all of the
  run's `snapshot_steps`), typically from the markers its own callback writes. Only those fire. A run whose `train`
  marker exists and with nothing pending does nothing. The callback gets the in-memory UNet in eval mode, under
  torch.no_grad() and, on CUDA with mixed precision, under autocast (so an fp32 UNet samples with fp16/bf16 VAE and
  text encoder); the VAE and text encoder are moved back to the CPU after it returns.
- Resuming: with `checkpoint_every`, the training state (weights, optimizer(s), learning-rate schedule, loss scaler,
  RNG states, loss history, step) is written atomically to checkpoint/state.pt; a restarted run resumes from it when
  it is not past a pending snapshot, otherwise from step 0. The checkpoint is deleted once the run is done.
- Memory modes (a registry, MEMORY_MODES): `fast` keeps all gradients and clips them by their global norm;
  `low_memory` steps one optimizer per parameter inside backward (register_post_accumulate_grad_hook) and frees
  each gradient right away, so the full set of gradients never exists. Global-norm clipping is impossible there, so
  low_memory clips each parameter's gradient to max_grad_norm on its own (a looser bound than fast mode's;
  max_grad_norm: null disables clipping in both modes, and then both modes give the same update). Parameters
  under 65536 elements (about 2 MB of gradients for SD 1.5) share one optimizer stepped after backward.
- Optimizers (a registry, OPTIMIZERS): `adamw8bit` is bitsandbytes' AdamW8bit; if the installed bitsandbytes
  cannot run it on the device (probed once on a small tensor), torch's AdamW is used and one warning says so.
  The result records the optimizer actually used.
- Weights are float32 (master weights) under bf16/fp16 autocast; fp16 also uses a GradScaler.
- `train` takes ownership of `components`: the UNet is trained in place (pass freshly loaded components per run).
  With `save: final` the pipeline is written in fp16, which leaves the in-memory weights rounded to fp16.

Nothing here generates class images, encodes images or prompts for the caches, or scores anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.optimization import get_scheduler

from harness.caches import TrainingData
from harness.config import TrainSpec
from harness.grid import RunSpec
from harness.losses import LossParts, diffusion_target, min_snr_weights, prior_preservation_loss, signal_to_noise
from harness.models import Components, make_pipeline, make_scheduler
from harness.store import RunFolder, atomic_path, atomic_write_json, read_json

log = logging.getLogger(__name__)

TRAIN_STAGE = "train"
RESULT_FILE = "train.json"
CHECKPOINT_FILE = "checkpoint/state.pt"
PIPELINE_DIR = "pipeline"
WARMUP_STEPS = 2  # steps left out of the seconds-per-step figure (allocator and kernel warm-up)
HOOKED_MIN_ELEMENTS = 65536  # low_memory: smaller parameters step together after backward
BNB_PROBE_SIZE = 4096  # bitsandbytes keeps 32-bit state below this many elements; probe the 8-bit path

SnapshotCallback = Callable[[int, torch.nn.Module, Components], None]


class TrainingOutOfMemoryError(RuntimeError):
    """Training ran out of GPU memory; the message names the settings that would lower it."""


@dataclass(frozen=True)
class Speedups:
    """Performance options that do not change what is trained (beyond floating-point rounding).

    benchmarks/bench_train.py toggles them; `default_speedups` holds what measured fastest there.
    channels_last fights bitsandbytes, whose update makes every parameter contiguous again each step.
    """

    channels_last: bool = False
    compile_unet: bool = False  # torch.compile of the UNet (minutes of compilation); never on a CPU
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms (a process-wide setting)


def default_speedups(device: torch.device | str) -> Speedups:
    """What measured fastest on an H100 (bench_train.py): cuDNN autotuning (about 13% a step); no channels_last
    (slower); no compilation (minutes of compiling for a run of a few hundred steps)."""
    return Speedups(cudnn_benchmark=torch.device(device).type == "cuda")


@dataclass
class TrainResult:
    run_key: str
    final_step: int
    seconds_per_step: float | None  # mean after WARMUP_STEPS steps of this process; None if none was timed
    wall_seconds: float
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated; None off CUDA
    optimizer: str
    memory_mode: str
    mixed_precision: str
    resumed_from_step: int
    loss_history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "instance", "prior", "lr"}
    pipeline_dir: str | None = None
    device: str = "cpu"  # the accelerator's name ("NVIDIA H100 80GB HBM3") or "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**data)


# --------------------------------------------------------------------------------------------------------------
# Randomness: a pure function of (seed, step)


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
    return StepInputs(latents=latents.to(device), noise=noise.to(device), timesteps=timesteps.to(device),
                      num_instance=len(instance))


# --------------------------------------------------------------------------------------------------------------
# Optimizers


def _adamw8bit(params: Sequence[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    return adamw8bit_class()(params, lr=spec.learning_rate, betas=(spec.adam_beta1, spec.adam_beta2),
                             eps=spec.adam_epsilon, weight_decay=spec.adam_weight_decay)


@functools.lru_cache(maxsize=1)
def adamw8bit_class() -> type:
    """bitsandbytes' AdamW8bit without the device synchronisation its step() does after every parameter.

    That synchronisation serves paged optimizer state (asynchronous page moves); this state is not paged, and
    bitsandbytes launches its kernels on the default stream, in order with the rest of the step. Without it the CPU
    queues the whole update (and, in low_memory mode, the rest of backward) ahead of the GPU instead of waiting
    ~700 times a step. Same kernels, same update. A bitsandbytes without the expected methods gets its own step().
    """
    import bitsandbytes as bnb

    stock = bnb.optim.AdamW8bit
    if not all(hasattr(stock, name) for name in ("init_state", "update_step", "check_overrides", "to_gpu")):
        return stock

    class AdamW8bit(stock):
        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None or self.is_paged:
                return super().step(closure)
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, param in enumerate(group["params"]):
                    if param.grad is None:
                        continue
                    if not self.state[param]:
                        self.init_state(group, param, gindex, pindex)
                    self.update_step(group, param, gindex, pindex)
            return None

    return AdamW8bit


def _adamw(params: Sequence[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=spec.learning_rate, betas=(spec.adam_beta1, spec.adam_beta2),
                             eps=spec.adam_epsilon, weight_decay=spec.adam_weight_decay)


OptimizerFactory = Callable[[Sequence[torch.nn.Parameter], TrainSpec], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw8bit": _adamw8bit, "adamw": _adamw}
OPTIMIZER_LABELS = {"adamw8bit": "bitsandbytes.AdamW8bit", "adamw": "torch.optim.AdamW"}


@functools.lru_cache(maxsize=8)
def bnb_8bit_problem(device: str) -> str | None:
    """Why bitsandbytes' AdamW8bit cannot run on `device` (import or runtime error on a tiny probe), or None."""
    try:
        param = torch.nn.Parameter(torch.zeros(BNB_PROBE_SIZE, device=device))
        optimizer = _adamw8bit([param], TrainSpec())
        param.grad = torch.ones_like(param)
        optimizer.step()
        if not torch.isfinite(param).all():
            return "the probe step produced non-finite values"
    except Exception as error:  # an import error, a missing native library, an unsupported device
        return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    return None


def choose_optimizer(name: str, device: torch.device) -> tuple[OptimizerFactory, str]:
    """The optimizer factory to use and its label; AdamW8bit falls back to torch AdamW where it cannot run."""
    if name == "adamw8bit":
        problem = bnb_8bit_problem(str(device))
        if problem is not None:
            log.warning("bitsandbytes AdamW8bit cannot run on %s (%s); training with torch.optim.AdamW instead "
                        "(same update rule, 32-bit optimizer state: about 4 more GB for SD 1.5).", device, problem)
            return OPTIMIZERS["adamw"], f"{OPTIMIZER_LABELS['adamw']} (fallback from adamw8bit)"
    return OPTIMIZERS[name], OPTIMIZER_LABELS[name]


class LearningRate:
    """diffusers' schedule (get_scheduler) driving the learning rate of any number of optimizers."""

    def __init__(self, spec: TrainSpec, optimizers: Sequence[torch.optim.Optimizer]):
        # The schedule runs on a parameter-less stand-in so one schedule serves one optimizer or thousands.
        self._stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.learning_rate)
        self.schedule = get_scheduler(spec.lr_schedule, self._stand_in, num_warmup_steps=spec.lr_warmup_steps,
                                      num_training_steps=spec.steps)
        self.optimizers = list(optimizers)
        self._apply()

    @property
    def current(self) -> float:
        return self._stand_in.param_groups[0]["lr"]

    def step(self) -> None:
        self._stand_in.step()  # no gradients: a no-op that keeps torch's call-order check quiet
        self.schedule.step()
        self._apply()

    def _apply(self) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.current

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
        for group, lr in zip(self._stand_in.param_groups, self.schedule.get_last_lr(), strict=True):
            group["lr"] = lr
        self._apply()


# --------------------------------------------------------------------------------------------------------------
# Memory modes: how a loss becomes a parameter update


class Updater(Protocol):
    lr: LearningRate

    def apply(self, loss: torch.Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class FastUpdater:
    """One optimizer over all parameters; gradients kept until the step, clipped by their global norm."""

    def __init__(self, params: list[torch.nn.Parameter], spec: TrainSpec, factory: OptimizerFactory,
                 scaler: torch.amp.GradScaler | None):
        self.params, self.spec, self.scaler = params, spec, scaler
        self.optimizer = factory(params, spec)
        self.lr = LearningRate(spec, [self.optimizer])

    def apply(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lr": self.lr.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class LowMemoryUpdater:
    """One optimizer per parameter, stepped inside backward as soon as that parameter's gradient is complete.

    Each gradient is freed right after its step, so the whole set never exists at once. Parameters under
    HOOKED_MIN_ELEMENTS (norms, biases: about 2 MB of gradients for SD 1.5, but 400 of its 686 tensors) share one
    optimizer stepped after backward, which saves 400 hook round trips a step. Clipping is per parameter.
    """

    def __init__(self, params: list[torch.nn.Parameter], spec: TrainSpec, factory: OptimizerFactory,
                 scaler: torch.amp.GradScaler | None):
        self.spec, self.scaler = spec, scaler
        hooked = [p for p in params if p.numel() >= HOOKED_MIN_ELEMENTS]
        self.small = [p for p in params if p.numel() < HOOKED_MIN_ELEMENTS]
        self.optimizers = [factory([p], spec) for p in hooked]
        self.small_optimizer = factory(self.small, spec) if self.small else None
        self.lr = LearningRate(spec, [*self.optimizers, *filter(None, [self.small_optimizer])])
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._step_one, opt))
                      for p, opt in zip(hooked, self.optimizers, strict=True)]

    def _step_one(self, optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> None:
        self._step(optimizer, [param])
        param.grad = None

    def _step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if self.spec.max_grad_norm is not None:
            clip_each([p.grad for p in params if p.grad is not None], self.spec.max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def apply(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.small_optimizer:
            self._step(self.small_optimizer, self.small)
            self.small_optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        self.lr.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "small": self.small_optimizer.state_dict() if self.small_optimizer else None,
                "lr": self.lr.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        if self.small_optimizer:
            self.small_optimizer.load_state_dict(state["small"])
        self.lr.load_state_dict(state["lr"])

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.small_optimizer:
            self.small_optimizer.zero_grad(set_to_none=True)


def clip_each(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scales each gradient on its own to a norm of at most `max_norm` (clip_grad_norm_'s rule, per tensor)."""
    if not grads:
        return
    scales = torch._foreach_norm(grads)
    torch._foreach_add_(scales, 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


MEMORY_MODES: dict[str, type] = {"fast": FastUpdater, "low_memory": LowMemoryUpdater}


# --------------------------------------------------------------------------------------------------------------
# A training session: models prepared, optimizer built, one step at a time


@dataclass
class StepLoss:
    step: int
    instance: float
    prior: float | None
    lr: float


@dataclass
class TrainingSession:
    """The state of training in memory. `advance` takes one optimizer step."""

    spec: TrainSpec
    components: Components
    data: TrainingData
    device: torch.device
    updater: Updater
    optimizer_label: str
    noise_scheduler: Any
    scaler: torch.amp.GradScaler | None
    embeddings: tuple[torch.Tensor, torch.Tensor | None]  # cached (instance, class), on the device
    prompt_tokens: torch.Tensor | None  # token ids of (instance, class) prompts when the text encoder trains
    step: int = 0

    @property
    def trained_modules(self) -> list[torch.nn.Module]:
        te = [self.components.text_encoder] if self.spec.train_text_encoder else []
        return [self.components.unet, *te]


def autocast_dtype(spec: TrainSpec) -> torch.dtype | None:
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.mixed_precision]


def autocast(spec: TrainSpec, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(spec)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def start_session(spec: TrainSpec, components: Components, data: TrainingData, device: torch.device | str,
                  speedups: Speedups | None = None) -> TrainingSession:
    """Prepares the models for training on `device` and builds the optimizer of the spec's memory mode."""
    device = torch.device(device)
    if spec.train_text_encoder and spec.memory_mode == "low_memory":
        raise ValueError("train.memory_mode low_memory does not support train.train_text_encoder: true; use "
                         "memory_mode: fast or leave the text encoder frozen.")
    params = _prepare_models(spec, components, device, speedups or default_speedups(device))
    factory, label = choose_optimizer(spec.optimizer, device)
    scaler = torch.amp.GradScaler(device.type) if spec.mixed_precision == "fp16" else None
    updater = MEMORY_MODES[spec.memory_mode](params, spec, factory, scaler)
    embeddings = (data.instance_embedding.to(device),
                  data.class_embedding.to(device) if spec.uses_prior else None)
    tokens = _prompt_tokens(components, data, spec, device) if spec.train_text_encoder else None
    return TrainingSession(spec=spec, components=components, data=data, device=device, updater=updater,
                           optimizer_label=label, noise_scheduler=make_scheduler(components.scheduler_config, "ddpm"),
                           scaler=scaler, embeddings=embeddings, prompt_tokens=tokens)


def _prepare_models(spec: TrainSpec, components: Components, device: torch.device,
                    speedups: Speedups) -> list[torch.nn.Parameter]:
    """Float32 trainable modules on the device, frozen ones on the CPU; returns the trainable parameters."""
    unet = _float32_on(components.unet, device)
    if speedups.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.requires_grad_(True).train()
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if speedups.compile_unet and device.type == "cuda":
        unet.compile()
    if speedups.cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    components.vae.requires_grad_(False).eval()
    modules: list[torch.nn.Module] = [unet]
    if spec.train_text_encoder:
        text_encoder = _float32_on(components.text_encoder, device)
        text_encoder.requires_grad_(True).train()
        if spec.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
        modules.append(text_encoder)
    else:
        components.text_encoder.requires_grad_(False).eval()
    offload_frozen(components, spec)
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _float32_on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # Cast only when needed: diffusers warns on every dtype cast of a model.
    if next(module.parameters()).dtype != torch.float32:
        module.to(dtype=torch.float32)
    return module.to(device)


def offload_frozen(components: Components, spec: TrainSpec) -> None:
    """The frozen VAE (and text encoder) on the CPU: training reads their outputs from the caches."""
    components.vae.to("cpu")
    if not spec.train_text_encoder:
        components.text_encoder.to("cpu")


def _prompt_tokens(components: Components, data: TrainingData, spec: TrainSpec, device: torch.device) -> torch.Tensor:
    prompts = [data.instance_prompt] + ([data.class_prompt] if spec.uses_prior else [])
    tokenizer = components.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _conditioning(session: TrainingSession, num_instance: int) -> torch.Tensor:
    """Text conditioning of the batch: the instance prompt's embedding, then the class prompt's."""
    if session.prompt_tokens is not None:
        per_prompt = session.components.text_encoder(session.prompt_tokens)[0].split(1)
    else:
        per_prompt = [e for e in session.embeddings if e is not None]
    return torch.cat([e.expand(num_instance, -1, -1) for e in per_prompt])


def compute_loss(session: TrainingSession, inputs: StepInputs) -> LossParts:
    """Forward pass of one step and its prior-preservation loss."""
    spec, scheduler = session.spec, session.noise_scheduler
    prediction_type = session.components.prediction_type
    noisy = scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    # No cast cache: each weight is used once per forward, and a cache would hold a half-precision copy of the
    # whole UNet until the forward ends (1.7 GB for SD 1.5), the peak of low_memory mode.
    with autocast(spec, session.device, cache=False):
        conditioning = _conditioning(session, inputs.num_instance)
        prediction = session.components.unet(noisy, inputs.timesteps, conditioning).sample
    target = diffusion_target(prediction_type, inputs.latents, inputs.noise, inputs.timesteps, scheduler)
    weights = None
    if spec.snr_gamma is not None:
        snr = signal_to_noise(scheduler.alphas_cumprod, inputs.timesteps[: inputs.num_instance])
        weights = min_snr_weights(snr, spec.snr_gamma, prediction_type)
    return prior_preservation_loss(prediction, target, inputs.num_instance, spec.prior_loss_weight, weights)


def advance(session: TrainingSession) -> StepLoss:
    """One optimizer step (one instance batch plus, with a prior, one class batch)."""
    inputs = draw_step_inputs(session.data, session.spec, session.step, session.components.vae.config.scaling_factor,
                              session.noise_scheduler.config.num_train_timesteps, session.device)
    lr = session.updater.lr.current
    parts = compute_loss(session, inputs)
    session.updater.apply(parts.total)
    session.step += 1
    return StepLoss(step=session.step, instance=parts.instance.item(),
                    prior=None if parts.prior is None else parts.prior.item(), lr=lr)


def finish_session(session: TrainingSession) -> None:
    """Drops the optimizer state and hooks; the trained modules are left in eval mode without gradients."""
    session.updater.close()
    for module in session.trained_modules:
        module.requires_grad_(False).eval()
    if session.spec.gradient_checkpointing:
        session.components.unet.disable_gradient_checkpointing()
        if session.spec.train_text_encoder:
            session.components.text_encoder.gradient_checkpointing_disable()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(session: TrainingSession, folder: RunFolder, history: list[dict[str, Any]]) -> None:
    state = {
        "run_key": folder.spec.run_key,
        "step": session.step,
        "modules": [m.state_dict() for m in session.trained_modules],
        "updater": session.updater.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler else None,
        "rng": rng_states(),
        "history": history,
    }
    with atomic_path(folder.file(CHECKPOINT_FILE)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(folder: RunFolder, device: torch.device) -> dict[str, Any] | None:
    path = folder.file(CHECKPOINT_FILE)
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("run_key") != folder.spec.run_key:
        raise RuntimeError(f"{path} belongs to run {state.get('run_key')!r}, not {folder.spec.run_key!r}; "
                           "delete it to train this run from step 0.")
    return state


def restore_checkpoint(session: TrainingSession, state: dict[str, Any]) -> list[dict[str, Any]]:
    for module, weights in zip(session.trained_modules, state["modules"], strict=True):
        module.load_state_dict(weights)
    session.updater.load_state_dict(state["updater"])
    if session.scaler and state["scaler"]:
        session.scaler.load_state_dict(state["scaler"])
    restore_rng_states(state["rng"])
    session.step = state["step"]
    return list(state["history"])


def usable_checkpoint(state: dict[str, Any] | None, pending: Collection[int], end_step: int) -> bool:
    """A checkpoint serves unless it is past a snapshot still to sample or past the end."""
    if state is None:
        return False
    limit = min([*pending, end_step])
    return state["step"] <= limit


# --------------------------------------------------------------------------------------------------------------
# The entry point


def train(
    run: RunSpec,
    folder: RunFolder,
    components: Components,
    data: TrainingData,
    on_snapshot: SnapshotCallback,
    device: torch.device | str,
    pending_snapshots: Collection[int] | None = None,
    speedups: Speedups | None = None,
) -> TrainResult:
    """Trains `run` to its last step, handing the model to `on_snapshot` at every pending snapshot step.

    Writes train.json and then the `train` marker into `folder`. Returns the stored result without doing anything
    when the run is done and no snapshot is pending. Raises TrainingOutOfMemoryError when the GPU runs out.
    """
    pending = _check_pending(run, pending_snapshots)
    done = folder.is_done(TRAIN_STAGE)
    if done and not pending:
        return load_result(folder)
    end_step = max(pending) if done else run.train.steps
    device = torch.device(device)
    _claim(components, run)
    try:
        result = _train_until(run, folder, components, data, on_snapshot, device, pending, end_step, speedups)
    except torch.cuda.OutOfMemoryError as error:
        # Leave the except block before raising, so the frames holding the GPU tensors are freed.
        message = out_of_memory_message(run.train, run.run_key, str(error))
    else:
        return load_result(folder) if done else result
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise TrainingOutOfMemoryError(message)


def _check_pending(run: RunSpec, pending: Collection[int] | None) -> frozenset[int]:
    if pending is None:
        return frozenset(run.snapshot_steps)
    unknown = sorted(set(pending) - set(run.snapshot_steps))
    if unknown:
        raise ValueError(f"pending snapshots {unknown} are not snapshot steps of run {run.run_key} "
                         f"({list(run.snapshot_steps)}).")
    return frozenset(pending)


def _claim(components: Components, run: RunSpec) -> None:
    """Refuses components whose UNet an earlier call already trained (its weights are no longer the base model's)."""
    owner = getattr(components.unet, "_harness_trained_for", None)
    if owner is not None:
        raise ValueError(f"these components were already trained (run {owner}); load the model again for run "
                         f"{run.run_key}, training changes the UNet in place.")
    components.unet._harness_trained_for = run.run_key


def _train_until(
    run: RunSpec,
    folder: RunFolder,
    components: Components,
    data: TrainingData,
    on_snapshot: SnapshotCallback,
    device: torch.device,
    pending: frozenset[int],
    end_step: int,
    speedups: Speedups | None,
) -> TrainResult:
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    session = start_session(run.train, components, data, device, speedups)
    history: list[dict[str, Any]] = []
    state = load_checkpoint(folder, device)
    if usable_checkpoint(state, pending, end_step):
        history = restore_checkpoint(session, state)
    del state
    resumed_from = session.step
    if session.step in pending:
        hand_snapshot(session, on_snapshot)
    durations = []
    while session.step < end_step:
        began = time.perf_counter()
        history.append(asdict(advance(session)))
        durations.append(time.perf_counter() - began)
        if _checkpoint_due(run.train, session.step):
            save_checkpoint(session, folder, history)
        if session.step in pending:
            hand_snapshot(session, on_snapshot)
    finish_session(session)
    result = TrainResult(
        run_key=run.run_key, final_step=session.step, seconds_per_step=_seconds_per_step(durations),
        wall_seconds=0.0, peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        optimizer=session.optimizer_label, memory_mode=run.train.memory_mode,
        mixed_precision=run.train.mixed_precision, resumed_from_step=resumed_from, loss_history=history,
    )
    if folder.is_done(TRAIN_STAGE):
        return result  # a replay for snapshots sampled again: the stored result stays
    if run.train.save == "final":
        result.pipeline_dir = str(save_pipeline(components, folder))
    result.wall_seconds = time.perf_counter() - started
    atomic_write_json(folder.file(RESULT_FILE), result.to_json())
    folder.mark_done(TRAIN_STAGE, {"final_step": result.final_step})
    shutil.rmtree(folder.file(CHECKPOINT_FILE).parent, ignore_errors=True)
    return result


def _checkpoint_due(spec: TrainSpec, step: int) -> bool:
    return bool(spec.checkpoint_every) and step % spec.checkpoint_every == 0 and step < spec.steps


def _seconds_per_step(durations: list[float]) -> float | None:
    timed = durations[WARMUP_STEPS:] or durations[1:] or durations
    return statistics.fmean(timed) if timed else None


def hand_snapshot(session: TrainingSession, on_snapshot: SnapshotCallback) -> None:
    """Gives the in-memory model to `on_snapshot` (eval mode, no grad), then resumes training mode."""
    unet = session.components.unet
    for module in session.trained_modules:
        module.eval()
    with torch.no_grad(), _snapshot_autocast(session):
        on_snapshot(session.step, unet, session.components)
    for module in session.trained_modules:
        module.train()
    offload_frozen(session.components, session.spec)


def _snapshot_autocast(session: TrainingSession) -> contextlib.AbstractContextManager:
    if session.device.type != "cuda":
        return contextlib.nullcontext()
    return autocast(session.spec, session.device)


def load_result(folder: RunFolder) -> TrainResult:
    return TrainResult.from_json(read_json(folder.file(RESULT_FILE)))


def out_of_memory_message(spec: TrainSpec, run_key: str, detail: str) -> str:
    current = (f"memory_mode={spec.memory_mode}, batch_size={spec.batch_size}, gradient_checkpointing="
               f"{str(spec.gradient_checkpointing).lower()}, mixed_precision={spec.mixed_precision}, "
               f"train_text_encoder={str(spec.train_text_encoder).lower()}")
    helps = [text for applies, text in (
        (spec.memory_mode != "low_memory", "memory_mode: low_memory"),
        (spec.batch_size != 1, "batch_size: 1"),
        (not spec.gradient_checkpointing, "gradient_checkpointing: true"),
        (spec.mixed_precision != "bf16", "mixed_precision: bf16"),
        (spec.train_text_encoder, "train_text_encoder: false"),
    ) if applies]
    advice = (f"Under train: in the protocol, set {', '.join(helps)}." if helps
              else "Every memory-saving setting is already on; use a GPU with more memory or a lower resolution.")
    return (f"run {run_key} ran out of GPU memory while training ({current}). {advice} "
            f"CUDA said: {' '.join(detail.split())[:300]}")


# --------------------------------------------------------------------------------------------------------------
# Saving the trained pipeline


def save_pipeline(components: Components, folder: RunFolder) -> Path:
    """The trained model as a diffusers pipeline (fp16 safetensors) in `<run>/pipeline`, replaced atomically."""
    target = folder.file(PIPELINE_DIR)
    staging = Path(tempfile.mkdtemp(dir=folder.path, prefix=".pipeline-"))
    try:
        with _half_precision(components.unet, components.vae, components.text_encoder):
            make_pipeline(components, "pndm").save_pretrained(str(staging), safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def _half_precision(*modules: torch.nn.Module) -> Iterator[None]:
    dtypes = [next(m.parameters()).dtype for m in modules]
    for module in modules:
        module.to(torch.float16)
    try:
        yield
    finally:
        for module, dtype in zip(modules, dtypes, strict=True):
            module.to(dtype)
