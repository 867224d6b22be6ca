"""Metric backbone sets (`eval.backbones`): which networks compute the features the metrics read.

A set maps backbone roles to builders: `clip` (image and text embeddings), `dino` (image embeddings) and any role a
metric declares (metrics.FEATURE_ROLES). The scorer builds only the roles its metrics need. `real` is OpenCLIP
ViT-B-32/openai with timm's DINO ViT-S/16, `tiny` random offline twins, `toyworld` the toy world's pretrained
encoders. Adding a set is one `BackboneSet` in its own module and one `BACKBONES.register` line.

This module imports no torch: the protocol loader validates `eval.backbones` through it.

What this module does not hold: the embedders and their cache (embedders.py), the metric math (metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.registry import Registry


class BackboneUnavailableError(RuntimeError):
    """The weights of a real evaluation backbone could not be loaded (usually: no network and no cached copy)."""


@dataclass(frozen=True)
class BackboneSet:
    """Builders of one set's backbones by role: builder(device=..., batch_size=...) -> an Embedder."""

    builders: Mapping[str, Callable[..., Any]]
    random_weights: bool = False  # the numbers check the pipeline and say nothing about images
    scope_note: str | None = None  # what the numbers are about when not about photographs
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def load(self, roles: Iterable[str], device: Any = "cpu", batch_size: int = 32) -> dict[str, Any]:
        """The embedders of `roles`, built in the order given; a role this set lacks is a clear error."""
        missing = [r for r in roles if r not in self.builders]
        if missing:
            raise BackboneUnavailableError(f"this backbone set has no {', '.join(missing)} backbone; it provides "
                                           f"{', '.join(self.builders)}. Choose metrics it can compute.")
        return {role: self.builders[role](device=device, batch_size=batch_size) for role in dict.fromkeys(roles)}


BACKBONES: Registry[BackboneSet] = Registry("backbone set", lazy={
    "real": "harness.embedders:REAL_BACKBONES",
    "tiny": "harness.embedders:TINY_BACKBONES",
    "toyworld": "harness.toyworld.models:TOY_BACKBONES",
})
