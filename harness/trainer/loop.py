"""The shared training loop: any method, prior preservation, snapshots handed to sampling in memory.

`train(run, folder, components, data, on_snapshot, device, pending_snapshots)` trains the run's method on
`components` in place from cached latent distributions and text embeddings (caches.TrainingData). One step takes a
batch of instance latents with the instance prompt and, when the prior weight is above 0, as many class latents
with the class prompt (the diffusers example's counting); the loss is losses.prior_preservation_loss. The method
(harness/methods) decides which parameters train and which prompts run through the text encoder in the step.

Decisions worth knowing:
- Randomness is a pure function of (seed, step) (randomness.py), so a run replays and resumes exactly.
- Snapshots: the caller says which snapshot steps still need sampling (`pending_snapshots`; None means all of the
  run's `snapshot_steps`), typically from the markers its own callback writes. Only those fire. A run whose `train`
  marker exists and with nothing pending does nothing. The callback gets the in-memory UNet in eval mode, under
  torch.no_grad() and, on CUDA with mixed precision, under autocast (so an fp32 UNet samples with fp16/bf16 VAE and
  text encoder); the frozen modules go back to the CPU after it returns.
- Weights are float32 (master weights) under bf16/fp16 autocast; fp16 also uses a GradScaler.
- The fast path (compiled.py): `train.compile` decides whether the UNet trains compiled. Nothing in a step waits
  for the GPU: inputs travel through pinned memory, the losses stay on the device and are read in batches (every
  LOSS_READ_EVERY steps, at snapshots, checkpoints and the end), so the CPU queues the next step, optimizer update
  included, while the GPU computes. train.json records the same losses as reading them every step would.
- `train` takes ownership of `components`: they are trained in place (pass freshly loaded components per run).
  With `save: final` the method exports its result (fp16: a diffusers pipeline for DreamBooth, a LoRA file, Custom
  Diffusion's attention weights and token); train.json records its size on disk, or what it would take unsaved.

Nothing here generates class images, encodes images or prompts for the caches, or scores anything.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from harness.caches import TrainingData
from harness.config import TrainSpec
from harness.devices import deterministic_kernels, set_cudnn_autotuning
from harness.fastpath import autotune_training, eager, study_work
from harness.grid import RunSpec
from harness.losses import LossParts, diffusion_target, min_snr_weights, prior_preservation_loss, signal_to_noise
from harness.methods import Method, method_class
from harness.models import Components, make_scheduler
from harness.records import CHECKPOINT_FILE, TRAIN_STAGE, TrainRecord, read_train, write_train
from harness.store import RunFolder
from harness.timings import count
from harness.trainer.checkpoints import load_checkpoint, restore_checkpoint, save_checkpoint, usable_checkpoint
from harness.trainer.compiled import (
    TrainingCompile,
    compile_unet,
    compiled_with,
    decide_training,
    fitted_variant,
    note_shape,
    route_checkpoints,
    training_shape,
)
from harness.trainer.optimizers import MEMORY_MODES, choose_optimizer
from harness.trainer.randomness import StepInputs, draw_step_inputs, seed_global_rng
from harness.trainer.session import PendingLoss, StepClock, TrainingSession, read_losses

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # steps left out of the seconds-per-step figure (allocator and kernel warm-up)
COMPILED_WARMUP_STEPS = 3  # compiled: compilation, then CUDA graphs run once to warm up and once to record
LOSS_READ_EVERY = 100  # steps between two reads of the losses (each waits for the GPU to catch up)

SnapshotCallback = Callable[[int, torch.nn.Module, Components], None]
# After each step, for progress: (the step reached, the step training runs to, the latest instance loss read back,
# which lags by up to LOSS_READ_EVERY steps since losses stay on the device until then; None before the first read)
StepCallback = Callable[[int, int, float | None], None]


class TrainingOutOfMemoryError(RuntimeError):
    """Training ran out of GPU memory; the message names the settings that would lower it."""


@dataclass(frozen=True)
class Speedups:
    """Performance options that do not change what is trained (beyond floating-point rounding).

    benchmarks/bench_train.py toggles them; `default_speedups` holds what measured fastest there, and `train`
    adds the compilation `train.compile` asks for. channels_last fights bitsandbytes, whose update makes every
    parameter contiguous again each step.
    """

    channels_last: bool = False
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms (a process-wide setting)
    compile: TrainingCompile | None = None  # the UNet compiled for training (compiled.py); None: eager


def default_speedups(device: torch.device | str) -> Speedups:
    """What measured fastest per step on an H100 (bench_train.py): cuDNN autotuning (about 13% a step); no
    channels_last (slower). A run decides compilation and autotuning for itself (`run_speedups`): autotuning costs
    seconds for each new batch shape, which a short study never wins back."""
    return Speedups(cudnn_benchmark=torch.device(device).type == "cuda")


# --------------------------------------------------------------------------------------------------------------
# A training session: models prepared, optimizer built, one step at a time


def autocast_dtype(spec: TrainSpec) -> torch.dtype | None:
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.mixed_precision]


def autocast(spec: TrainSpec, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(spec)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def make_method(run: RunSpec) -> Method:
    return method_class(run.train.method)(run.method, run.train)


SpeedupChoice = Callable[[list[torch.nn.Parameter]], Speedups]  # the speedups for the parameters that train


def start_session(method: Method, components: Components, data: TrainingData, device: torch.device | str,
                  speedups: Speedups | SpeedupChoice | None = None) -> TrainingSession:
    """Prepares the models for training on `device` and builds the optimizer of the spec's memory mode.
    `speedups` may be a function of the trainable parameters, called once the method has prepared them."""
    spec = method.train
    device = torch.device(device)
    problems = method.check(method.settings, spec)
    if problems:
        raise ValueError(" ".join(f"{method.name}.{key}: {message}" for key, message in problems))
    params = method.prepare(components, device)
    speedups = speedups(params) if callable(speedups) else speedups or default_speedups(device)
    speedups = replace(speedups, compile=fitted_variant(speedups.compile, spec.memory_mode, params))
    apply_speedups(components.unet, device, speedups)
    if speedups.compile is not None:
        note_shape(components.unet, training_shape(spec, method))
    offload_frozen(method, components)
    factory, label = choose_optimizer(spec.optimizer, device)
    scaler = torch.amp.GradScaler(device.type) if spec.mixed_precision == "fp16" else None
    updater = MEMORY_MODES[spec.memory_mode](params, spec, factory, scaler)
    session = TrainingSession(spec=spec, method=method, components=components, data=data, device=device,
                              updater=updater, optimizer_label=label,
                              noise_scheduler=make_scheduler(components.scheduler_config, "ddpm"), scaler=scaler,
                              trainable_params=sum(p.numel() for p in params), compiled=speedups.compile,
                              eager_unet=speedups.compile is None and compiled_with(components.unet) is not None,
                              math_attention=device.type == "cuda" and deterministic_kernels())
    for kind, prompt, cached in _prompts(data, spec):
        if method.encodes_in_step(kind):
            session.tokens[kind] = _token_ids(components, prompt, device)
        elif cached is None:
            raise ValueError(f"the training data has no cached embedding of the {kind} prompt {prompt!r}, but method "
                             f"{method.name} does not encode it in each step; build it without encoded_in_step.")
        else:
            session.embeddings[kind] = cached.to(device)
    return session


def _prompts(data: TrainingData, spec: TrainSpec) -> list[tuple[str, str, torch.Tensor | None]]:
    prompts = [("instance", data.instance_prompt, data.instance_embedding)]
    if spec.uses_prior:
        prompts.append(("class", data.class_prompt, data.class_embedding))
    return prompts


def apply_speedups(unet: torch.nn.Module, device: torch.device, speedups: Speedups) -> None:
    if speedups.channels_last:
        unet.to(memory_format=torch.channels_last)
    if speedups.compile is not None:
        if compile_unet(unet, speedups.compile):
            log.info("UNet compiled for training (%s); the first steps compile it", speedups.compile.describe())
        route_checkpoints(unet, speedups.compile)  # every session: the method's prepare() reset the function
    if device.type == "cuda":
        set_cudnn_autotuning(speedups.cudnn_benchmark)  # process-wide: each session says what it wants


def offload_frozen(method: Method, components: Components) -> None:
    """The frozen modules on the CPU: training reads their outputs from the caches."""
    for module in method.frozen_modules(components):
        module.to("cpu")


def _token_ids(components: Components, prompt: str, device: torch.device) -> torch.Tensor:
    tokenizer = components.tokenizer
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _conditioning(session: TrainingSession, num_instance: int) -> torch.Tensor:
    """Text conditioning of the batch: the instance prompt's embedding, then the class prompt's."""
    kinds = ["instance", "class"] if session.spec.uses_prior else ["instance"]
    live = [k for k in kinds if k in session.tokens]
    encoded = {}
    if live:  # one text-encoder call for every prompt that runs through it
        hidden = session.components.text_encoder(torch.cat([session.tokens[k] for k in live]))[0]
        encoded = dict(zip(live, hidden.split(1), strict=True))
    per_prompt = [encoded[k] if k in encoded else session.embeddings[k] for k in kinds]
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


def advance(session: TrainingSession) -> PendingLoss:
    """One optimizer step (one instance batch plus, with a prior, one class batch). Nothing here waits for the
    GPU: the step's losses come back still on the device (`.read()` them, or `read_losses` many at once)."""
    seed_global_rng(session.spec.seed, session.step)  # dropout, if a method has any, replays too
    inputs = draw_step_inputs(session.data, session.spec, session.step, session.components.vae.config.scaling_factor,
                              session.noise_scheduler.config.num_train_timesteps, session.device)
    lr = session.updater.lr.current
    with eager() if session.eager_unet else contextlib.nullcontext(), _attention(session.math_attention):
        if session.compiled is not None and session.compiled.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graphs may reuse their buffers
        parts = compute_loss(session, inputs)
        session.updater.apply(parts.total)
    session.step += 1
    return PendingLoss(step=session.step, instance=parts.instance.detach(),
                       prior=None if parts.prior is None else parts.prior.detach(), lr=lr)


def _attention(math: bool) -> contextlib.AbstractContextManager:
    """With `math` (execution.deterministic on a GPU), attention trains with the plain matrix-product kernel: the
    fused kernels' backward passes add up their gradients with atomic operations, in no fixed order (more memory
    for the attention scores, the same numbers every time)."""
    if not math:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def finish_session(session: TrainingSession) -> None:
    """Drops the optimizer state and hooks; the trained modules are left in eval mode without gradients."""
    session.updater.close()
    session.method.release(session.components)


def hand_snapshot(session: TrainingSession, on_snapshot: SnapshotCallback) -> None:
    """Gives the in-memory model to `on_snapshot` (eval mode, no grad), then resumes training mode."""
    for module in session.trained_modules:
        module.eval()
    with torch.no_grad(), _snapshot_autocast(session):
        on_snapshot(session.step, session.components.unet, session.components)
    for module in session.trained_modules:
        module.train()
    offload_frozen(session.method, session.components)


def _snapshot_autocast(session: TrainingSession) -> contextlib.AbstractContextManager:
    if session.device.type != "cuda":
        return contextlib.nullcontext()
    return autocast(session.spec, session.device)


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
    on_step: StepCallback | None = None,
) -> TrainRecord:
    """Trains `run` to its last step, handing the model to `on_snapshot` at every pending snapshot step (and each
    step's loss to `on_step`).

    Writes train.json and then the `train` marker into `folder`. Returns the stored record without doing anything
    when the run is done and no snapshot is pending. Raises TrainingOutOfMemoryError when the GPU runs out.
    """
    pending = _check_pending(run, pending_snapshots)
    done = folder.is_done(TRAIN_STAGE)
    if done and not pending:
        return read_train(folder.path)
    end_step = max(pending) if done else run.train.steps
    device = torch.device(device)
    _claim(components, run)
    method = make_method(run)
    try:
        result = _train_until(run, method, folder, components, data, on_snapshot, device, pending, end_step,
                              speedups, on_step)
    except torch.cuda.OutOfMemoryError as error:
        # Leave the except block before raising, so the frames holding the GPU tensors are freed.
        message = out_of_memory_message(run.train, method, run.run_key, str(error))
    else:
        return read_train(folder.path) if done else result
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
                         f"{run.run_key}, training changes the model in place.")
    components.unet._harness_trained_for = run.run_key


def _train_until(
    run: RunSpec,
    method: Method,
    folder: RunFolder,
    components: Components,
    data: TrainingData,
    on_snapshot: SnapshotCallback,
    device: torch.device,
    pending: frozenset[int],
    end_step: int,
    speedups: Speedups | None,
    on_step: StepCallback | None = None,
) -> TrainRecord:
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    session = start_session(method, components, data, device,
                            speedups or functools.partial(run_speedups, run, method, components.unet, device, end_step))
    history: list[dict[str, Any]] = []
    state = load_checkpoint(folder, device)
    if usable_checkpoint(state, pending, end_step):
        history = restore_checkpoint(session, state)
    del state
    resumed_from = session.step
    progress = _Progress(session, history, COMPILED_WARMUP_STEPS if session.compiled else WARMUP_STEPS)
    if session.step in pending:
        with progress.paused():
            hand_snapshot(session, on_snapshot)
    while session.step < end_step:
        progress.add(advance(session))
        if on_step is not None:
            on_step(session.step, end_step, history[-1]["instance"] if history else None)
        if _checkpoint_due(run.train, session.step):
            with progress.paused():
                save_checkpoint(session, folder, history)
        if session.step in pending:
            with progress.paused():
                hand_snapshot(session, on_snapshot)
    progress.read()
    count(session.step - resumed_from, "steps")
    finish_session(session)
    clock = progress.clock
    if session.compiled is not None and clock.warmup_seconds is not None:
        log.info("run %s: the first %d steps took %.1f s, compiling the UNet (%s) included", run.run_key,
                 clock.warm_at - resumed_from, clock.warmup_seconds, session.compiled.describe())
    result = TrainRecord(
        run_key=run.run_key, final_step=session.step,
        seconds_per_step=clock.seconds_per_step(session.step - resumed_from), wall_seconds=0.0,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        optimizer=session.optimizer_label, memory_mode=run.train.memory_mode,
        mixed_precision=run.train.mixed_precision, resumed_from_step=resumed_from, loss_history=history,
        trainable_params=session.trainable_params,
        artifact_bytes=2 * method.export_elements(components, session.trainable_params),
        compiled=None if session.compiled is None else session.compiled.describe(),
        warmup_seconds=clock.warmup_seconds,
    )
    if folder.is_done(TRAIN_STAGE):
        return result  # a replay for snapshots sampled again: the stored result stays
    if run.train.save == "final":
        result.pipeline_dir = str(method.export(components, folder.path))
        result.artifact_bytes = disk_bytes(Path(result.pipeline_dir))
    result.wall_seconds = time.perf_counter() - started
    write_train(folder.path, result)
    folder.mark_done(TRAIN_STAGE, {"final_step": result.final_step})
    shutil.rmtree(folder.file(CHECKPOINT_FILE).parent, ignore_errors=True)
    return result


def disk_bytes(path: Path) -> int:
    """The size on disk of an export: a file, or every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _checkpoint_due(spec: TrainSpec, step: int) -> bool:
    return bool(spec.checkpoint_every) and step % spec.checkpoint_every == 0 and step < spec.steps


class _Progress:
    """The losses and the step clock of one training call, brought up to date at synchronisation points only."""

    def __init__(self, session: TrainingSession, history: list[dict[str, Any]], warmup_steps: int):
        self.session, self.history = session, history
        self.pending: list[PendingLoss] = []
        self.clock = StepClock(session.device, session.step, warmup_steps)

    def add(self, loss: PendingLoss) -> None:
        self.pending.append(loss)
        if self.session.step == self.clock.warm_at or self.session.step % LOSS_READ_EVERY == 0:
            self.read()

    def read(self) -> None:
        """Waits for the GPU, moves the pending losses into the history and times the steps since the last read."""
        self.history.extend(asdict(loss) for loss in read_losses(self.pending))
        self.pending.clear()
        _synchronize(self.session.device)
        self.clock.lap(self.session.step)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work that is not training (a snapshot, a checkpoint): the history is complete and the clock stopped."""
        self.read()
        paused_at = self.clock.pause()
        yield
        _synchronize(self.session.device)
        self.clock.restart(self.session.step, paused_at)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_speedups(run: RunSpec, method: Method, unet: torch.nn.Module, device: torch.device, end_step: int,
                 trainable: Sequence[torch.nn.Parameter]) -> Speedups:
    """The default speedups with the compilation `train.compile` resolves to for this run and whether cuDNN times
    its algorithms (both logged with why)."""
    decision, variant = decide_training(run.train, method, unet, device, end_step, trainable)
    autotune, why = autotune_training(device.type, max(end_step, study_work().training_steps), variant is not None,
                                      deterministic_kernels())
    log.info("run %s: training %s (%s); %s", run.run_key, "compiled" if variant else "eager", decision.reason, why)
    return replace(default_speedups(device), cudnn_benchmark=autotune, compile=variant)


def out_of_memory_message(spec: TrainSpec, method: Method, run_key: str, detail: str) -> str:
    current = (f"memory_mode={spec.memory_mode}, batch_size={spec.batch_size}, gradient_checkpointing="
               f"{str(spec.gradient_checkpointing).lower()}, mixed_precision={spec.mixed_precision}, "
               f"{method.describe()}").rstrip(", ")
    helps = [text for applies, text in (
        (spec.memory_mode != "low_memory", "memory_mode: low_memory"),
        (spec.batch_size != 1, "batch_size: 1"),
        (not spec.gradient_checkpointing, "gradient_checkpointing: true"),
        (spec.mixed_precision != "bf16", "mixed_precision: bf16"),
        *method.memory_settings(),
    ) if applies]
    advice = (f"Under train: in the protocol, set {', '.join(helps)}." if helps
              else "Every memory-saving setting is already on; use a GPU with more memory or a lower resolution.")
    return (f"run {run_key} ran out of GPU memory while training ({current}). {advice} "
            f"CUDA said: {' '.join(detail.split())[:300]}")
