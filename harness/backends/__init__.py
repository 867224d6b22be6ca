"""Model backends: where a base text-to-image model comes from, and the registry of them.

`model.id` names a registered backend (`tiny`, `toyworld`) or is a hub id / local diffusers folder, served by the
`hub` backend. A backend resolves and checks a `ModelSpec` when the protocol is loaded (no torch), may check the
rest of the protocol against what its model can do, and loads the components when a run needs them. Adding a
backend is one module with a `ModelBackend` subclass and one `MODEL_BACKENDS.register` line.

The protocol loader calls this module, so it imports nothing of the protocol's: `model` below is a config ModelSpec
and `protocol` a config Protocol, written as Any.

What this module does not hold: the components' type, schedulers and pipelines (models.py), or any backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.registry import Registry

if TYPE_CHECKING:
    import torch

    from harness.models import Components

HUB = "hub"


class ModelUnavailableError(RuntimeError):
    """The model's files could not be loaded (no network, no such repo or revision, an incomplete folder)."""


@dataclass
class Resolved:
    """A model spec after its backend checked it: the canonical spec, problems (field, message) and notes."""

    model: Any  # ModelSpec
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ModelBackend:
    """One source of base models. Subclasses override `load` and whatever else differs."""

    # The model's weights are random: its numbers check the pipeline and say nothing about quality.
    random_weights: bool = False
    # What the numbers are about when they are not about photographs (the toy world); None otherwise.
    scope_note: str | None = None
    # A short remark for the dry run's model line.
    plan_note: str = ""

    def resolve(self, model: Any, protocol_dir: Path) -> Resolved:
        """The canonical spec (id, revision) and what is wrong with it; no download, no torch."""
        return Resolved(model)

    def check_protocol(self, protocol: Any) -> list[tuple[tuple, str]]:
        """Problems of the rest of the protocol with this model, as (key path, message)."""
        return []

    def identifier_problem(self, model: Any, identifier: str) -> str | None:
        """Why `identifier` cannot bind a subject for this model's tokenizer (a word it already knows well), with a
        rare token to use instead; None when it is rare, or when the tokenizer is not known before loading."""
        return None

    def load(self, model: Any, dtype: torch.dtype | None) -> Components:
        raise NotImplementedError


MODEL_BACKENDS: Registry[ModelBackend] = Registry("model backend", lazy={
    HUB: "harness.backends.hub:BACKEND",
    "tiny": "harness.backends.tiny:BACKEND",
    "toyworld": "harness.toyworld.backend:BACKEND",
})


def backend_name(model_id: str) -> str:
    """The backend serving `model_id`: a registered name is its own backend, anything else is the hub's."""
    return model_id if model_id != HUB and model_id in MODEL_BACKENDS else HUB


def backend_of(model: Any) -> ModelBackend:
    return MODEL_BACKENDS.get(backend_name(model.id))


def load_components(model: Any, dtype: torch.dtype | None = None) -> Components:
    """The model's UNet, VAE, text encoder, tokenizer and scheduler config, from its backend.

    `dtype` None keeps each backend's own default (the hub model's `model.dtype`; float32 for the small offline
    models, since half precision on a CPU is slow or unsupported). transformers' per-file "Loading weights" bars are
    turned off: a study loads its model once per run, and the bars would bury the progress lines.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return backend_of(model).load(model, dtype)
