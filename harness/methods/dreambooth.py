"""DreamBooth (Ruiz et al., CVPR 2023): every UNet weight trains, and optionally the text encoder.

With the text encoder frozen, the prompts' embeddings come from the cache and the encoder stays on the CPU; with
`train_text_encoder: true` both prompts run through it in every step and its weights train too (the diffusers
example's `--train_text_encoder`). The export is a full diffusers pipeline (`StableDiffusionPipeline
.from_pretrained(folder)` loads it), written in fp16 safetensors.

What this module does not hold: the loop, the optimizers or the loss (harness/trainer, harness/losses).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config.schema import TrainSpec
from harness.methods import Method

if TYPE_CHECKING:
    import torch

    from harness.models import Components

PIPELINE_DIR = "pipeline"


@dataclass(frozen=True)
class DreamBoothSettings:
    train_text_encoder: bool = False


class UNetAndOptionalTextEncoder:
    """The modules of a method that trains (in full or through adapters) the UNet and, with its setting
    `train_text_encoder`, the text encoder; both prompts then run through the encoder in every step."""

    settings: Any

    def trained_modules(self, components: Components) -> list[torch.nn.Module]:
        return [components.unet, *([components.text_encoder] if self.settings.train_text_encoder else [])]

    def frozen_modules(self, components: Components) -> list[torch.nn.Module]:
        return [components.vae, *([] if self.settings.train_text_encoder else [components.text_encoder])]

    def encodes_in_step(self, prompt_kind: str) -> bool:
        return self.settings.train_text_encoder


class DreamBooth(UNetAndOptionalTextEncoder, Method):
    name = "dreambooth"
    settings_type = DreamBoothSettings
    legacy_identity = frozenset({"train_text_encoder"})

    @classmethod
    def check(cls, settings: DreamBoothSettings, train: TrainSpec) -> list[tuple[str, str]]:
        if settings.train_text_encoder and train.memory_mode == "low_memory":
            return [("train_text_encoder", "memory_mode low_memory does not support train_text_encoder: true; use "
                                           "memory_mode: fast or leave the text encoder frozen.")]
        return []

    def prepare(self, components: Components, device: torch.device) -> list[torch.nn.Parameter]:
        components.vae.requires_grad_(False).eval()
        if not self.settings.train_text_encoder:
            components.text_encoder.requires_grad_(False).eval()
        params = []
        for module in self.trained_modules(components):
            float32_on(module, device).requires_grad_(True).train()
            if self.train.gradient_checkpointing:
                enable_gradient_checkpointing(module)
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def state_dict(self, components: Components) -> dict[str, Any]:
        return {"modules": [m.state_dict() for m in self.trained_modules(components)]}

    def load_state_dict(self, components: Components, state: dict[str, Any]) -> None:
        for module, weights in zip(self.trained_modules(components), state["modules"], strict=True):
            module.load_state_dict(weights)

    def release(self, components: Components) -> None:
        super().release(components)
        if self.train.gradient_checkpointing:
            for module in self.trained_modules(components):
                disable_gradient_checkpointing(module)

    def export(self, components: Components, folder: Path) -> Path:
        return save_pipeline(components, folder / PIPELINE_DIR)

    def export_elements(self, components: Components, trainable: int) -> int:
        # The export is the whole pipeline, not only what trained.
        return sum(p.numel() for m in (components.unet, components.vae, components.text_encoder)
                   for p in m.parameters())

    def memory_settings(self) -> list[tuple[bool, str]]:
        return [(self.settings.train_text_encoder, "train_text_encoder: false")]


# --------------------------------------------------------------------------------------------------------------
# Helpers other methods share


def float32_on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module in float32 on `device` (master weights for mixed precision)."""
    import torch

    # Cast only when needed: diffusers warns on every dtype cast of a model.
    if next(module.parameters()).dtype != torch.float32:
        module.to(dtype=torch.float32)
    return module.to(device)


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    # diffusers and transformers spell it differently.
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    else:
        module.gradient_checkpointing_enable()


def disable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "disable_gradient_checkpointing"):
        module.disable_gradient_checkpointing()
    else:
        module.gradient_checkpointing_disable()


def frozen_dtype(train: TrainSpec, device: torch.device) -> torch.dtype:
    """The dtype frozen weights are kept in while a method trains beside them: on a GPU the autocast dtype (what the
    forward pass computes in anyway), else float32 (a CPU samples snapshots without autocast)."""
    import torch

    if torch.device(device).type != "cuda":
        return torch.float32
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train.mixed_precision]


def keep_frozen_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The module's frozen weights in `dtype` (the autocast dtype: what the forward pass uses anyway), the trained
    ones in float32. Only the dtype of frozen weights changes, never their values beyond that rounding."""
    import torch

    for param in module.parameters():
        wanted = torch.float32 if param.requires_grad else dtype
        if param.dtype != wanted:
            param.data = param.data.to(wanted)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A fresh staging folder beside `target` to write into; on success it replaces `target` at once, so a reader
    never sees a half-written export."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_pipeline(components: Components, target: Path) -> Path:
    """The model as a diffusers pipeline (fp16 safetensors) in `target`, replaced atomically."""
    from harness.models import make_pipeline

    with staged_folder(target) as staging, half_precision(components.unet, components.vae, components.text_encoder):
        make_pipeline(components, "pndm").save_pretrained(str(staging), safe_serialization=True)
    return target


@contextlib.contextmanager
def half_precision(*modules: torch.nn.Module) -> Iterator[None]:
    import torch

    dtypes = [next(m.parameters()).dtype for m in modules]
    for module in modules:
        module.to(torch.float16)
    try:
        yield
    finally:
        for module, dtype in zip(modules, dtypes, strict=True):
            module.to(dtype)
