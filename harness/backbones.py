"""Metric backbone sets (`eval.backbones`): which networks compute the features the metrics read.

A set maps backbone roles to builders: `clip` (image and text embeddings), `dino` (image embeddings), `lpips` (a
perceptual distance between images) and any role a metric declares (metrics.FEATURE_ROLES). The scorer builds only
the roles its metrics need. `real` is OpenCLIP ViT-B-32/openai, timm's DINO ViT-S/16 and LPIPS (AlexNet, or VGG
with `eval.lpips_net: vgg`), `tiny` random offline twins, `toyworld` the toy world's pretrained networks. Adding a
set is one `BackboneSet` in its own module and one `BACKBONES.register` line.

Also here, since every set's builders share them: the message of a backbone whose weights cannot be loaded
(`offline_message`), the weights label of random backbones (`TINY_SOURCE`) and building a module with random
weights fixed by a seed (`seeded`).

This module imports no torch at import time: the protocol loader validates `eval.backbones` through it.

What this module does not hold: the embedders and their cache (embedders.py), the LPIPS network (perceptual.py),
the metric math (metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.registry import Registry

if TYPE_CHECKING:
    import torch

TINY_SOURCE = "random (tiny, pipeline check only)"
LPIPS_NETS = ("alex", "vgg")


class BackboneUnavailableError(RuntimeError):
    """The weights of a real evaluation backbone could not be loaded (usually: no network and no cached copy)."""


def offline_message(backbone: str, library: str, cause: BaseException, source: str = "the Hugging Face hub") -> str:
    """Why a backbone's weights could not be loaded, and the ways out (network once, a copied cache, `tiny`)."""
    return (f"cannot load the evaluation backbone {backbone}: its weights could not be downloaded or found in the "
            f"{library} cache ({type(cause).__name__}: {str(cause)[:300]}). The weights download once from "
            f"{source} and are then cached by {library}; run once with network access (or copy the cache "
            "folder to this machine). To check the pipeline offline instead, set `eval.backbones: tiny` in the "
            "protocol (random weights: pipeline check only, the numbers mean nothing).")


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Builds a module with random weights fixed by `seed`, leaving the global torch RNG as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class BackboneSet:
    """Builders of one set's backbones by role: builder(device=..., batch_size=..., **options) -> a backbone.

    `lpips_nets` are the values of `eval.lpips_net` the set's `lpips` role honours (the protocol loader refuses
    the others); a set whose perceptual network is its own honours only the default. `lpips_min_side` is the
    smallest image side each of them takes (by net), so the loader refuses smaller evaluation images up front.
    """

    builders: Mapping[str, Callable[..., Any]]
    random_weights: bool = False  # the numbers check the pipeline and say nothing about images
    scope_note: str | None = None  # what the numbers are about when not about photographs
    description: str = ""
    lpips_nets: tuple[str, ...] = LPIPS_NETS
    lpips_min_side: Mapping[str, int] = field(default_factory=dict)

    def load(self, roles: Iterable[str], device: Any = "cpu", batch_size: int = 32,
             options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The backbones of `roles`, built in the order given; `options` are extra builder arguments by role
        ({"lpips": {"net": "vgg"}}). A role this set lacks is a clear error."""
        missing = [r for r in roles if r not in self.builders]
        if missing:
            raise BackboneUnavailableError(f"this backbone set has no {', '.join(missing)} backbone; it provides "
                                           f"{', '.join(self.builders)}. Choose metrics it can compute.")
        options = options or {}
        return {role: self.builders[role](device=device, batch_size=batch_size, **options.get(role, {}))
                for role in dict.fromkeys(roles)}


BACKBONES: Registry[BackboneSet] = Registry("backbone set", lazy={
    "real": "harness.embedders:REAL_BACKBONES",
    "tiny": "harness.embedders:TINY_BACKBONES",
    "toyworld": "harness.toyworld.models:TOY_BACKBONES",
})
