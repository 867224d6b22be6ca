"""The training fast path: the UNet compiled for training with torch.compile, and the rule that turns it on.

A profile of SD 1.5 training on an H100 (batch 1+1, bf16, AdamW8bit, checkpointing) showed 0.131 s of GPU work a
step but ~7,100 kernel launches taking 0.27-0.37 s of CPU: the host, not the GPU, set the pace. A compiled UNet
fuses the elementwise work between the large kernels and, with CUDA graphs (mode "reduce-overhead"), replays the
forward and backward kernels with a handful of launches.

Variants (`TrainingCompile`): `full` compiles the whole UNet as one graph (forward and backward); `regional`
compiles only its repeated transformer blocks, each on its own as diffusers' compile_repeated_blocks does (one
compilation serves every block of the same shapes, so it compiles in a fraction of the time); `blocks` compiles its
ResNet blocks too, one compilation per shape of block (about 15 in SD 1.5). What `on` means per memory mode (ON):
- fast: full, with CUDA graphs;
- low_memory: blocks, without CUDA graphs. A whole-model backward returns every gradient at the end of the graph,
  which would undo low_memory's stepping and freeing each parameter as its gradient completes; per-block regions
  hand their gradients to the hooks block by block. On one H100 host, `blocks` took 0.306 s a step against
  `regional`'s 0.342, at the same peak memory (5.64 GiB), for 104 s of compilation against 90. Both with CUDA
  graphs failed on that GPU (torch 2.11's cudagraph trees: "graph recording observed an input tensor deallocate
  during graph recording that did not occur during replay").
  Where low_memory hooks no parameter (every trainable tensor is small, as a LoRA's are: they step together after
  backward), there is nothing to hand over, and it compiles as fast does (`fitted_variant`): a LoRA took 0.330 s a
  step by blocks and 0.052 with the whole graph, at the same peak memory (3.22 GiB).

With gradient checkpointing, diffusers checkpoints each ResNet and transformer block from its parent block
(`_gradient_checkpointing_func`). For blocks compiled on their own, the checkpoint goes inside the compiled code
(`inner_checkpoints`, `route_checkpoints`): each block is then one compiled call forward and one backward, which
recomputes the block's activations in the same compiled graph, instead of a compiled call under torch's eager
checkpoint (pack and unpack hooks for every saved tensor, a second forward call, a third for backward). On one H100
host, low_memory took 0.200 s a step this way against 0.224 with the checkpoints outside, at the same peak memory
(5.65 GiB), for 161 s of compilation against 111. Inductor's layout optimization stays off for these graphs: it
would save channels_last copies of the convolution weights for backward, a copy of every ResNet weight held from
forward to backward.
benchmarks/bench_train.py measures every variant; ON holds the choice.

The UNet is compiled in place (nn.Module.compile, on the whole UNet or on each block) and stays compiled, so the
next run that reuses it (reuse.py) finds it warm. Whatever else calls it (eager sampling of a snapshot, a run with
compile off) runs it under fastpath.eager(), which never compiles a second graph.

What this module does not hold: the decision rule itself (harness/fastpath.py) or the loop (loop.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from harness.config import TrainSpec
from harness.devices import deterministic_kernels
from harness.fastpath import Decision, compiler_problem, decide, study_work
from harness.methods import Method
from harness.throughput import payback_for, training_key
from harness.trainer.optimizers import is_hooked

log = logging.getLogger(__name__)

ATTRIBUTE = "_harness_compiled"  # the TrainingCompile a UNet is compiled with (absent: not compiled)
SHAPES = "_harness_compiled_shapes"  # the training shapes (training_shape) it was compiled for so far
REPEATED_BLOCKS = ("BasicTransformerBlock",)  # UNet2DConditionModel's repeated blocks (diffusers' _repeated_blocks)
SCOPE_BLOCKS = {"regional": REPEATED_BLOCKS, "blocks": (*REPEATED_BLOCKS, "ResnetBlock2D")}  # classes compiled alone
SCOPE_NAMES = {"full": "full UNet", "regional": "regional UNet", "blocks": "UNet's transformer and ResNet blocks"}
BLOCK_SHAPES = 64  # compilations one block's code may hold (torch's default, 8, is fewer than SD 1.5's ResNet shapes)


@dataclass(frozen=True)
class TrainingCompile:
    """How the UNet is compiled for training."""

    scope: Literal["full", "regional", "blocks"] = "full"
    cuda_graphs: bool = True  # torch.compile mode "reduce-overhead"; without: mode "default"
    backend: str = "inductor"  # tests use "aot_eager": the same tracing, no code generation
    inner_checkpoints: bool = True  # blocks compiled with their checkpoint inside (route_checkpoints)

    @property
    def mode(self) -> str | None:
        # Modes are an inductor notion; another backend takes none.
        if self.backend != "inductor":
            return None
        return "reduce-overhead" if self.cuda_graphs else "default"

    def describe(self) -> str:
        graphs = "CUDA graphs" if self.cuda_graphs else "no CUDA graphs"
        backend = "" if self.backend == "inductor" else f", backend {self.backend}"
        outer = "" if self.checkpoints_inside or self.scope == "full" else ", checkpointed outside"
        return f"{SCOPE_NAMES[self.scope]}, {graphs}{backend}{outer}"

    @property
    def checkpoints_inside(self) -> bool:
        """Whether checkpointed blocks run their checkpoint inside the compiled code: not with CUDA graphs (blocks
        with CUDA graphs failed to record in torch 2.11, and this was measured without them), and not for the whole
        UNet, whose graph traces its checkpoints anyway."""
        return self.inner_checkpoints and self.scope != "full" and not self.cuda_graphs


ON = {"fast": TrainingCompile("full", cuda_graphs=True), "low_memory": TrainingCompile("blocks", cuda_graphs=False)}


def fitted_variant(variant: TrainingCompile | None, memory_mode: str,
                   trainable: Sequence[torch.nn.Parameter]) -> TrainingCompile | None:
    """`variant` for these trainable parameters: low_memory's `on` becomes fast's whole-UNet graph when low_memory
    hooks none of them (see the module's docstring). Any other variant, asked for by name, stays as it is."""
    if variant is None or memory_mode != "low_memory" or replace(variant, backend="inductor") != ON["low_memory"]:
        return variant
    if any(is_hooked(p) for p in trainable):
        return variant
    return replace(ON["fast"], backend=variant.backend)


def compiled_with(unet: torch.nn.Module) -> TrainingCompile | None:
    return getattr(unet, ATTRIBUTE, None)


def training_shape(spec: TrainSpec, method: Method) -> tuple:
    """What makes the compiled UNet compile again: the batch, the resolution, checkpointing, precision, the method
    and its settings. Runs of one shape share one compilation."""
    return (spec.batch_size * (2 if spec.uses_prior else 1), spec.resolution, spec.gradient_checkpointing,
            spec.mixed_precision, method.name, method.describe())


def is_warm(unet: torch.nn.Module, variant: TrainingCompile, shape: tuple) -> bool:
    """True when `unet` is compiled with `variant` and already ran `shape`: nothing left to compile."""
    return compiled_with(unet) == variant and shape in getattr(unet, SHAPES, set())


def note_shape(unet: torch.nn.Module, shape: tuple) -> None:
    setattr(unet, SHAPES, getattr(unet, SHAPES, set()) | {shape})


def compile_unet(unet: torch.nn.Module, variant: TrainingCompile) -> bool:
    """Compiles `unet` in place for training with `variant`; False when it already was (nothing to do)."""
    current = compiled_with(unet)
    if current == variant:
        return False
    if current is not None:
        uncompile(unet)
    options = {"backend": variant.backend, "dynamic": False}
    if variant.mode:
        options["mode"] = variant.mode
    if variant.scope == "full":
        unet.compile(**options)
    else:
        allow_block_shapes(BLOCK_SHAPES)
        compile_blocks(unet, SCOPE_BLOCKS[variant.scope], options)
    setattr(unet, ATTRIBUTE, variant)
    return True


def compile_blocks(model: torch.nn.Module, class_names: tuple[str, ...], options: dict) -> None:
    """Compiles every submodule of these classes in place, each on its own (what diffusers' compile_repeated_blocks
    does for the classes a model declares); one compilation serves every block of the same shapes."""
    blocks = [m for m in model.modules() if type(m).__name__ in class_names]
    if not blocks:
        raise ValueError(f"no {' or '.join(class_names)} in {type(model).__name__}: nothing to compile by blocks")
    for block in blocks:
        block.compile(**options)


def route_checkpoints(unet: torch.nn.Module, variant: TrainingCompile) -> None:
    """Where the UNet checkpoints its blocks (diffusers' gradient_checkpointing_func), the blocks `variant`
    compiles run their checkpoint inside compiled code (see the module's docstring). Called for every training
    session: a method's prepare() sets diffusers' default function again."""
    if not variant.checkpoints_inside or not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules()):
        return
    inner = checkpointed_block(variant.backend)
    unet.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(_checkpoint_block, inner, SCOPE_BLOCKS[variant.scope]))


def _checkpoint_block(inner: Callable, class_names: tuple[str, ...], block: torch.nn.Module, *args):
    """diffusers' gradient_checkpointing_func: `inner` for a block compiled on its own, else torch's checkpoint."""
    if type(block).__name__ in class_names and getattr(block, "_compiled_call_impl", None) is not None:
        return inner(block, *args)
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)  # diffusers' default


@functools.cache
def checkpointed_block(backend: str) -> Callable:
    """One compiled function for every block: `block` run under a checkpoint. Its compilations (one per shape of
    block) stay with the function, for every later run of the process."""
    options: dict = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        options["options"] = {"layout_optimization": False}
    return torch.compile(_run_checkpointed, **options)


def _run_checkpointed(block: torch.nn.Module, *args):
    # _call_impl, not __call__: the call must not go back through the block's own compiled callable.
    return torch.utils.checkpoint.checkpoint(block._call_impl, *args, use_reentrant=False)


def allow_block_shapes(count: int) -> None:
    """Lets one block's code hold `count` compilations (one per shape) before torch falls back to eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), count))


def uncompile(unet: torch.nn.Module) -> None:
    """Undoes compile_unet: every submodule called eagerly again (nn.Module.compile keeps its compiled callable in
    `_compiled_call_impl`; torch has no public inverse)."""
    for module in unet.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    for name in (ATTRIBUTE, SHAPES):
        if hasattr(unet, name):
            delattr(unet, name)


def decide_training(spec: TrainSpec, method: Method, unet: torch.nn.Module, device: torch.device, steps: int,
                    trainable: Sequence[torch.nn.Parameter]) -> tuple[Decision, TrainingCompile | None]:
    """Whether this run trains compiled, and with which variant: `train.compile` resolved for `steps` steps to go
    (or the study's steps, when the runner announced them; harness/fastpath.py). `trainable`: the parameters the
    prepared method trains, which fit the variant (`fitted_variant`)."""
    variant = fitted_variant(ON[spec.memory_mode], spec.memory_mode, trainable)
    warm = is_warm(unet, variant, training_shape(spec, method))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    payback = payback_for("training", training_key(spec.method, spec.memory_mode, spec.gradient_checkpointing), gpu)
    unsupported = method.compile_problem or compiler_problem(device.type)
    decision = decide(spec.compile, device.type, max(steps, study_work().training_steps), payback, "steps",
                      warm=warm, unsupported=unsupported,
                      deterministic=deterministic_kernels())
    return decision, variant if decision.compile else None
