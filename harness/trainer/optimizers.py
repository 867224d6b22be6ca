"""Optimizers and memory modes: how a loss becomes a parameter update.

- Optimizers (OPTIMIZERS): `adamw8bit` is bitsandbytes' AdamW8bit, stepping each tensor with one direct call of
  bitsandbytes' kernel (`direct_update`: the same kernel and arguments, without its per-call bookkeeping); if the
  installed bitsandbytes cannot run it on the device (probed once on a small tensor), torch's AdamW is used and one
  warning says so.
- Memory modes (MEMORY_MODES): `fast` keeps all gradients and clips them by their global norm; `low_memory` steps
  parameters inside backward (register_post_accumulate_grad_hook), a bucket of consecutive parameters at a time,
  and frees their gradients right away, so the full set of gradients never exists. Global-norm clipping is
  impossible there, so low_memory clips each parameter's gradient to max_grad_norm on its own (a looser bound than
  fast mode's; max_grad_norm: null disables clipping in both modes, and then both modes give the same update).
  Parameters under HOOKED_MIN_ELEMENTS elements (about 2 MB of gradients for SD 1.5) share one optimizer stepped
  after backward.
- The learning-rate schedule is diffusers' `get_scheduler`, driving any number of optimizers.

What this module does not hold: which parameters train (harness/methods) or the loop (loop.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from diffusers.optimization import get_scheduler

from harness.config import TrainSpec

log = logging.getLogger(__name__)

HOOKED_MIN_ELEMENTS = 65536  # low_memory: smaller parameters step together after backward
BUCKET_ELEMENTS = 1 << 24  # low_memory: the most elements a bucket of hooked parameters holds (64 MB of gradients)
BNB_PROBE_SIZE = 4096  # bitsandbytes keeps 32-bit state below this many elements; probe the 8-bit path


def _adamw8bit(params: Sequence[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    return adamw8bit_class()(params, lr=spec.learning_rate, betas=(spec.adam_beta1, spec.adam_beta2),
                             eps=spec.adam_epsilon, weight_decay=spec.adam_weight_decay)


@functools.lru_cache(maxsize=1)
def adamw8bit_class() -> type:
    """bitsandbytes' AdamW8bit without the device synchronisation its step() does after every parameter.

    That synchronisation serves paged optimizer state (asynchronous page moves); this state is not paged, and
    bitsandbytes launches its kernels on the default stream, in order with the rest of the step. Without it the CPU
    queues the whole update (and, in low_memory mode, the rest of backward) ahead of the GPU instead of waiting
    ~700 times a step. Same kernels, same update. A bitsandbytes without the expected methods gets its own step(),
    one without the expected kernels its own update_step().
    """
    import bitsandbytes as bnb

    stock = bnb.optim.AdamW8bit
    if not all(hasattr(stock, name) for name in ("init_state", "update_step", "check_overrides", "to_gpu")):
        return stock

    ops = getattr(torch.ops, "bitsandbytes", None)
    direct = all(hasattr(ops, name) for name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit"))

    class AdamW8bit(stock):
        direct_calls = direct  # update_step calls bitsandbytes' kernels directly (see direct_update)

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
                    if not (self.direct_calls and direct_update(self, group, param)):
                        self.update_step(group, param, gindex, pindex)
            return None

    return AdamW8bit


def direct_update(optimizer: Any, group: dict[str, Any], param: torch.nn.Parameter) -> bool:
    """bitsandbytes' update_step for the plain case, calling the same kernel with the same arguments, without the
    per-call work around it (a config dict, a device check, the parameter and gradient made contiguous again). In
    low_memory mode, ~700 such calls a step are the host's work that sets the pace. False, with nothing done,
    where the plain case does not hold (per-parameter overrides, update-norm clipping, a non-contiguous tensor):
    the caller then runs bitsandbytes' own update_step."""
    grad = param.grad
    if (optimizer.args.max_unorm > 0.0 or optimizer.mng.pid2config or optimizer.mng.index2config
            or not param.is_contiguous() or not grad.is_contiguous()):
        return False
    state = optimizer.state[param]
    state["step"] += 1
    beta1, beta2, *rest = group["betas"]
    beta3, alpha = (rest[0] if rest else 0.0), group.get("alpha", 0.0)
    ops = torch.ops.bitsandbytes
    if state["state1"].dtype == torch.uint8:
        ops.optimizer_update_8bit_blockwise(
            optimizer.optimizer_name, grad, param, state["state1"], state["state2"], beta1, beta2, beta3, alpha,
            group["eps"], state["step"], group["lr"], state["qmap1"], state["qmap2"], state["absmax1"],
            state["absmax2"], group["weight_decay"], 1.0, optimizer.args.skip_zeros)
    else:
        ops.optimizer_update_32bit(
            optimizer.optimizer_name, grad, param, state["state1"], state["state2"], None, 0.0, 0.0, beta1, beta2,
            beta3, alpha, group["eps"], group["weight_decay"], state["step"], group["lr"], 1.0,
            optimizer.args.skip_zeros)
    return True


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
# Memory modes


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


def is_hooked(param: torch.nn.Parameter) -> bool:
    """Whether low_memory steps this parameter inside backward (else with the small ones, after backward)."""
    return param.numel() >= HOOKED_MIN_ELEMENTS


class LowMemoryUpdater:
    """Parameters stepped inside backward as soon as their gradients are complete, bucket by bucket.

    Each gradient is freed right after its step, so the whole set never exists at once. The hooked parameters are
    cut into buckets of consecutive parameters (BUCKET_ELEMENTS elements at most, 64 MB of float32 gradients; a
    larger parameter is a bucket of its own), each with one optimizer: when the last gradient of a bucket completes,
    the bucket is clipped and stepped with one call and its gradients freed. Backward reaches a module's parameters
    together, so a bucket waits briefly, and a step launches a few calls per bucket instead of several per
    parameter: on an H100 the per-parameter calls, not the GPU, set the pace of this mode. The update is the one a
    per-parameter optimizer makes (AdamW is elementwise and clipping is per parameter), bit for bit.
    Parameters under HOOKED_MIN_ELEMENTS (norms, biases: about 2 MB of gradients for SD 1.5, but 400 of its 686
    tensors) share one optimizer stepped after backward. Checkpoints hold one optimizer state per hooked parameter,
    whatever the buckets.
    """

    def __init__(self, params: list[torch.nn.Parameter], spec: TrainSpec, factory: OptimizerFactory,
                 scaler: torch.amp.GradScaler | None):
        self.spec, self.scaler = spec, scaler
        hooked = [p for p in params if is_hooked(p)]
        self.small = [p for p in params if not is_hooked(p)]
        self.buckets = buckets_of(hooked, BUCKET_ELEMENTS)
        self.optimizers = [factory(bucket, spec) for bucket in self.buckets]
        self.small_optimizer = factory(self.small, spec) if self.small else None
        self.lr = LearningRate(spec, [*self.optimizers, *filter(None, [self.small_optimizer])])
        self.waiting = [len(bucket) for bucket in self.buckets]  # gradients each bucket still waits for
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._arrived, index))
                      for index, bucket in enumerate(self.buckets) for p in bucket]

    def _arrived(self, index: int, param: torch.nn.Parameter) -> None:
        self.waiting[index] -= 1
        if self.waiting[index] == 0:
            self._step_bucket(index)

    def _step_bucket(self, index: int) -> None:
        bucket = self.buckets[index]
        self._step(self.optimizers[index], bucket)
        for param in bucket:
            param.grad = None
        self.waiting[index] = len(bucket)

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
        for index, bucket in enumerate(self.buckets):
            if self.waiting[index] != len(bucket):  # a parameter without a gradient this step (unused)
                self._step_bucket(index)
        if self.small_optimizer:
            self._step(self.small_optimizer, self.small)
            self.small_optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        self.lr.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [one for optimizer in self.optimizers for one in split_state(optimizer.state_dict())],
                "small": self.small_optimizer.state_dict() if self.small_optimizer else None,
                "lr": self.lr.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = iter(state["optimizers"])
        for optimizer, bucket in zip(self.optimizers, self.buckets, strict=True):
            optimizer.load_state_dict(merge_states([next(saved) for _ in bucket]))
        if next(saved, None) is not None:
            raise ValueError("the checkpoint holds more optimizer states than this model has large parameters")
        if self.small_optimizer:
            self.small_optimizer.load_state_dict(state["small"])
        self.lr.load_state_dict(state["lr"])

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for bucket in self.buckets:
            for param in bucket:
                param.grad = None
        if self.small_optimizer:
            self.small_optimizer.zero_grad(set_to_none=True)


def buckets_of(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters grouped up to `limit` elements a group; a parameter larger than that is alone."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for param in params:
        if not buckets or size + param.numel() > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(param)
        size += param.numel()
    return buckets


def split_state(state: dict[str, Any]) -> list[dict[str, Any]]:
    """An optimizer's state dict (one parameter group) as one state dict per parameter, in order."""
    (group,) = state["param_groups"]
    options = {k: v for k, v in group.items() if k != "params"}
    return [{"state": {0: state["state"][i]} if i in state["state"] else {},
             "param_groups": [{**options, "params": [0]}]} for i in group["params"]]


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-parameter state dicts of `split_state` as one optimizer's state dict."""
    options = {k: v for k, v in states[0]["param_groups"][0].items() if k != "params"}
    return {"state": {i: s["state"][0] for i, s in enumerate(states) if 0 in s["state"]},
            "param_groups": [{**options, "params": list(range(len(states)))}]}


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
