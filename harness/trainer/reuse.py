"""The base model's components for training, reused across the runs of one process.

Training changes the model in place, so every run needs the published weights again. Loading new modules for each
run would throw away what was compiled for the last one (compiled code and CUDA graphs belong to the module and the
addresses of its tensors). `training_components(model)` therefore loads the model once (float32, as published),
keeps a CPU copy of every weight, and for each later run of the same model copies those weights back into the same
tensors (`load_state_dict` copies in place): same modules, same addresses, the compiled UNet stays warm.

A run that changed the modules' structure (a method's adapters or new tokens left behind, a cast that was not
undone) cannot be restored in place; the model is then loaded afresh, and compiles again if it trains compiled.
One model is kept at a time: asking for another model drops the first.

What this module does not hold: loading a model (harness/backends) or compiling it (compiled.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from harness.backends import load_components
from harness.config import ModelSpec
from harness.methods.dreambooth import disable_gradient_checkpointing
from harness.models import Components

MODULES = ("unet", "vae", "text_encoder")
StateDict = dict[str, torch.Tensor]


@dataclass
class _Kept:
    model: ModelSpec
    components: Components
    base: dict[str, StateDict]  # module name -> its published weights, on the CPU
    vocabulary: int  # the tokenizer's size as loaded


_kept: _Kept | None = None


def training_components(model: ModelSpec) -> Components:
    """The model's components with its published float32 weights: the modules of the previous call for the same
    model, restored in place, or freshly loaded ones."""
    global _kept
    if _kept is not None and _kept.model == model and restorable(_kept):
        restore(_kept)
        return replace(_kept.components, scheduler_config=dict(_kept.components.scheduler_config))
    _kept = None  # free the old copy before loading the next
    components = load_components(model, dtype=torch.float32)
    base = {name: {k: v.detach().to("cpu", copy=True) for k, v in getattr(components, name).state_dict().items()}
            for name in MODULES}
    _kept = _Kept(model, components, base, len(components.tokenizer))
    return replace(components, scheduler_config=dict(components.scheduler_config))


def forget() -> None:
    """Drops the kept components (and their CPU copy)."""
    global _kept
    _kept = None


def restorable(kept: _Kept) -> bool:
    """True when every module still has the structure, shapes and dtypes it was loaded with."""
    if len(kept.components.tokenizer) != kept.vocabulary:
        return False
    return all(_same_layout(getattr(kept.components, name).state_dict(), kept.base[name]) for name in MODULES)


def _same_layout(state: StateDict, base: StateDict) -> bool:
    return state.keys() == base.keys() and all(
        state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in base.items())


def restore(kept: _Kept) -> None:
    """The published weights copied back into the same tensors, and the modules as loading leaves them."""
    for name in MODULES:
        module = getattr(kept.components, name)
        module.load_state_dict(kept.base[name])
        _as_loaded(module)
    if hasattr(kept.components.unet, "_harness_trained_for"):
        del kept.components.unet._harness_trained_for


def _as_loaded(module: Any) -> None:
    """Undoes what training may have left (a run that failed never reached the method's release)."""
    if getattr(module, "is_gradient_checkpointing", False):
        disable_gradient_checkpointing(module)
    for param in module.parameters():
        param.grad = None
    module.requires_grad_(True).eval()
