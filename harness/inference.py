"""The sampling fast path: compiled half-precision copies of the UNet and the VAE, kept for the whole process.

Two recipes render images, and every image's sidecar records which (`render`), so that a folder is finished with
the recipe it began with and an image rendered again after a kill equals the first, pixel for pixel:
- `eager`: the model as it is, under fp16 autocast: the path of every earlier harness version (a sidecar without
  `render` is eager);
- `compiled`: the images come from copies of the model, made once per process and model shape: the UNet in fp16
  with fused QKV projections, channels_last and torch.compile with static shapes, the VAE in fp16 with its decoder
  compiled. The weights are copied into them before each use (a few milliseconds), the callers pad the last batch
  to the full batch size so shapes never change, and cuDNN autotunes its convolutions.

Why copies rather than compiling the model in place. For snapshots the model is the training UNet: float32 master
weights, compiled for training, with gradient-checkpointing flags and an optimizer holding its tensors. Compiling it
for inference too would recompile it at every snapshot or bind the two graphs together; fusing its projections
would change the parameters the optimizer and the checkpoints know. The fp16 copy costs 1.7 GB on the GPU while
sampling (it is released in between, so training memory does not grow), one cast of the weights per snapshot, and
nothing in time; in exchange one compiled UNet serves class images, base-model images and every snapshot of every
run, the graph never casts float32 weights, and the training UNet is left alone. Under fp16 autocast the copy's
matrix products see the same fp16 weights autocast would have made; only the norms' parameters are rounded.

A model whose weights do not fit the plain architecture (a method's adapters or processors) is rendered eager.

What this module does not hold: which images to render and where they go (sampling.py, class_images.py), or when
`compile: auto` compiles (harness/fastpath.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from harness.devices import deterministic_kernels, set_cudnn_autotuning
from harness.fastpath import Decision, compiler_problem, decide, eager, study_work
from harness.models import Components, make_pipeline, placed
from harness.throughput import payback_for

log = logging.getLogger(__name__)

EAGER, COMPILED = "eager", "compiled"


@dataclass(frozen=True)
class Recipe:
    """How images are rendered. A recipe's name is recorded with every image; change a recipe's flags and its name
    must change too, or a folder would be finished with other rounding than it began with."""

    name: str
    compile: bool
    fuse_qkv: bool = False
    channels_last: bool = False
    compile_vae: bool = False
    mode: str | None = None  # torch.compile mode; None: the default (no CUDA graphs, no persistent memory pool)
    backend: str = "inductor"  # tests use "aot_eager": the same tracing, no code generation


RECIPES = {
    EAGER: Recipe(EAGER, compile=False),
    COMPILED: Recipe(COMPILED, compile=True, fuse_qkv=True, channels_last=True, compile_vae=True),
}


def choose_recipe(recorded: str | None, setting: str | bool, device: torch.device, images: int, figure: str,
                  shape: tuple[int, int]) -> tuple[Recipe, str]:
    """The recipe of a folder: the one its images were rendered with (unless `compile` is false: the way out of a
    compiled path that fails), else what `compile` (`setting`) resolves to for `images` images (`figure`:
    "sampling.eval" or "sampling.class", the table's key; `shape`: batch and resolution). Returns it and why."""
    problem = compiler_problem(device.type)
    if recorded is not None and recorded not in RECIPES:
        log.warning("this folder's images were rendered %s, a recipe this version does not know; rendering the "
                    "rest eager: they may differ from an uninterrupted pass in the last bits.", recorded)
        return RECIPES[EAGER], f"unknown recipe {recorded!r}"
    if recorded is not None:
        recipe = RECIPES[recorded]
        if recipe.compile and setting is False:
            log.warning("this folder's images were rendered compiled, but compile is false: rendering the rest "
                        "eager; they may differ from an uninterrupted pass in the last bits.")
            return RECIPES[EAGER], "compile: false"
        if recipe.compile and problem:
            log.warning("this folder's images were rendered %s, which cannot run here (%s); rendering the rest "
                        "eager: they may differ from an uninterrupted pass in the last bits.", recorded, problem)
            return RECIPES[EAGER], problem
        return recipe, f"the folder's images were rendered {recorded}"
    decision = decide_sampling(setting, device, images, figure, shape, problem)
    recipe = RECIPES[COMPILED if decision.compile else EAGER]
    if (figure, recipe.name) not in _announced:
        _announced.add((figure, recipe.name))
        log.info("%s: rendering %s (%s)", figure, recipe.name, decision.reason)
    return recipe, decision.reason


_announced: set[tuple[str, str]] = set()  # (figure, recipe) decisions already logged


def decide_sampling(setting: str | bool, device: torch.device, images: int, figure: str, shape: tuple[int, int],
                    problem: str | None = None) -> Decision:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    warm = any(shape in models.shapes for models in _kept.values())
    return decide(setting, device.type, max(images, study_work().images), payback_for("sampling", figure, gpu),
                  "images", warm=warm, unsupported=problem, deterministic=deterministic_kernels())


# --------------------------------------------------------------------------------------------------------------
# The kept copies


@dataclass
class InferenceModels:
    """The compiled copies for one model shape, dtype and device; their tensors live only while in use."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    recipe: Recipe
    device: torch.device
    shapes: set[tuple[int, int]] = field(default_factory=set)  # (batch, resolution) compiled so far


_kept: dict[str, InferenceModels] = {}


def forget() -> None:
    """Drops the kept copies (and with them their compiled code)."""
    _kept.clear()


@contextlib.contextmanager
def compiled_components(components: Components, source_unet: torch.nn.Module, device: torch.device,
                        dtype: torch.dtype, recipe: Recipe, shape: tuple[int, int]) -> Iterator[Components | None]:
    """Components whose UNet and VAE are the recipe's copies, holding the weights of `source_unet` and of
    `components.vae`, with the text encoder placed on `device`; None when the weights do not fit (render eager)."""
    models = _models_for(source_unet, components.vae, device, dtype, recipe)
    if not fits(source_unet.state_dict(), models.unet) or not fits(components.vae.state_dict(), models.vae):
        yield None
        return
    if device.type == "cuda":
        set_cudnn_autotuning(True)  # static shapes: the timed algorithms serve every batch
    _materialise(models, source_unet, components.vae)
    try:
        # The text encoder moves without a cast (autocast computes in half precision): casting float32 weights
        # there and back would round a text encoder that trains.
        with placed([components.text_encoder], device):
            yield replace(components, unet=models.unet, vae=models.vae)
        models.shapes.add(shape)
    finally:
        _release(models)


def _models_for(source_unet: torch.nn.Module, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                recipe: Recipe) -> InferenceModels:
    key = json.dumps([type(source_unet).__name__, _config(source_unet), type(vae).__name__, _config(vae),
                      str(dtype), str(device), recipe.name, recipe.backend], sort_keys=True, default=str)
    if key not in _kept:
        _kept[key] = InferenceModels(unet=_unet_copy(source_unet, dtype, recipe), vae=_vae_copy(vae, dtype, recipe),
                                     recipe=recipe, device=device)
    return _kept[key]


def _config(module: torch.nn.Module) -> dict[str, Any]:
    return dict(getattr(module, "config", {}))


def _empty_like(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A module of the same class and config as `module` in `dtype`, on the meta device: no memory, no weights
    initialised; `_materialise` gives it both."""
    with torch.device("meta"):
        copy = type(module).from_config(module.config)
    return copy.to(dtype=dtype).eval().requires_grad_(False)


def _unet_copy(source: torch.nn.Module, dtype: torch.dtype, recipe: Recipe) -> torch.nn.Module:
    unet = _empty_like(source, dtype)
    if recipe.fuse_qkv:
        unet.fuse_qkv_projections()
    if recipe.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.compile(**_compile_options(recipe))
    return unet


def _vae_copy(source: torch.nn.Module, dtype: torch.dtype, recipe: Recipe) -> torch.nn.Module:
    vae = _empty_like(source, dtype)
    if recipe.channels_last:
        vae.to(memory_format=torch.channels_last)
    if recipe.compile_vae:
        vae.decoder.compile(**_compile_options(recipe))
    return vae


def _compile_options(recipe: Recipe) -> dict[str, Any]:
    options: dict[str, Any] = {"backend": recipe.backend, "dynamic": False}
    if recipe.mode and recipe.backend == "inductor":
        options["mode"] = recipe.mode
    return options


def is_fused_key(key: str) -> bool:
    """Whether a state-dict key belongs to a fused projection (to_qkv, to_kv): the copy has them, the source not."""
    return ".to_qkv." in key or ".to_kv." in key


def fits(source_state: dict[str, torch.Tensor], copy: torch.nn.Module) -> bool:
    """True when the source's weights are exactly the copy's unfused parameters, shape for shape."""
    target = {k: v for k, v in copy.state_dict().items() if not is_fused_key(k)}
    return source_state.keys() == target.keys() and all(source_state[k].shape == v.shape for k, v in target.items())


@torch.no_grad()
def _materialise(models: InferenceModels, source_unet: torch.nn.Module, vae: torch.nn.Module) -> None:
    """Allocates the copies on their device and copies the weights in (cast to the copies' dtype)."""
    for copy, source in ((models.unet, source_unet), (models.vae, vae)):
        copy.to_empty(device=models.device)
        copy.load_state_dict(source.state_dict(), strict=False)  # `fits` checked the keys; fused ones follow
        buffers = dict(source.named_buffers())  # non-persistent buffers are not in the state dict
        for name, buffer in copy.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    refresh_fused_projections(models.unet)


@torch.no_grad()
def refresh_fused_projections(unet: torch.nn.Module) -> None:
    """The fused QKV (self-attention) and KV (cross-attention) weights made from the separate projections again."""
    for module in unet.modules():
        groups = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}
        for fused, parts in groups.items():
            target = getattr(module, fused, None)
            if target is None:
                continue
            target.weight.copy_(torch.cat([getattr(module, p).weight for p in parts]))
            if target.bias is not None:
                target.bias.copy_(torch.cat([getattr(module, p).bias for p in parts]))


def _release(models: InferenceModels) -> None:
    """The copies' memory is freed (their structure and compiled code stay)."""
    models.unet.to("meta")
    models.vae.to("meta")


@contextlib.contextmanager
def recipe_pipeline(components: Components, source_unet: torch.nn.Module, sampler: str, device: torch.device,
                    dtype: torch.dtype, recipe: Recipe, shape: tuple[int, int],
                    eager_pipeline: Callable[[], contextlib.AbstractContextManager]) -> Iterator[tuple[Any, Recipe]]:
    """Yields (pipeline, recipe used) for rendering with `recipe`: the compiled copies under autocast, or the
    caller's own eager pipeline (`eager_pipeline()`, a context manager yielding it), which also serves when the
    copies cannot take the model's weights. Eager rendering runs a UNet compiled for training as a plain module."""
    if recipe.compile:
        with compiled_components(components, source_unet, device, dtype, recipe, shape) as fast:
            if fast is not None:
                half = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
                with half:
                    yield make_pipeline(fast, sampler), recipe
                return
        log.info("the model's weights do not fit the plain architecture; rendering eager")
        recipe = RECIPES[EAGER]
    with eager_pipeline() as pipe, eager():
        yield pipe, recipe
