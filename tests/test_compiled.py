"""The compiled fast paths on the tiny model (CPU): training and sampling give what the plain paths give.

Most tests compile with torch.compile's `aot_eager` backend: the same tracing as the real path (dynamo, autograd
graphs, activation checkpointing, regional compilation, compiled copies, static shapes), without code generation,
so they run in tens of seconds. `test_inductor_matches_eager_within_tolerance` compiles for real with inductor (C++
on the CPU, minutes). CUDA graphs exist only on a GPU (benchmarks/bench_train.py measures them); on a CPU the
reduce-overhead mode skips them, which is why the code that depends on them is one call (cudagraph_mark_step_begin).

Tolerances: aot_eager runs the same kernels in the same order, so losses and weights agree to float32 rounding
(1e-6); inductor fuses and reorders reductions: losses within 1e-4 relative, images within 2/255 per pixel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import fastpath, inference
from harness.backends.tiny import build_tiny_components
from harness.config import EvalSpec, ModelSpec, SubjectSpec, TrainSpec
from harness.grid import RunSpec, run_identity, run_key
from harness.methods import METHODS
from harness.sampling import eval_requests, generate, read_recorded, sampler_settings
from harness.trainer import Speedups, TrainingCompile, compiled, reuse
from harness.trainer import loop as trainer
from harness.trainer.compiled import ON, compiled_with, is_warm, training_shape
from tests.test_trainer import Recorder, make_run, open_folder, synthetic_data

pytestmark = pytest.mark.slow

FULL = TrainingCompile("full", cuda_graphs=False, backend="aot_eager")
REGIONAL = TrainingCompile("regional", cuda_graphs=False, backend="aot_eager")
BLOCKS = TrainingCompile("blocks", cuda_graphs=False, backend="aot_eager")
BLOCKS_OUTER = TrainingCompile("blocks", cuda_graphs=False, backend="aot_eager", inner_checkpoints=False)
SPEC = EvalSpec(backbones="tiny", seeds=(0, 1, 2), class_prompts=("a {class}",), sampler="dpmsolver++", steps=2,
                max_subject_prompts=1)
SUBJECT = SubjectSpec(name="dog", instance_dir=Path("."), class_noun="dog")


def graphs() -> int:
    """Graphs dynamo compiled so far in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def predictions(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's noise predictions for a fixed batch, eager (a compiled UNet is not compiled again for it)."""
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), fastpath.eager():
        return unet(latents, torch.tensor([10, 600]), text).sample


def losses(result) -> np.ndarray:
    return np.array([[e["instance"], e["prior"] if e["prior"] is not None else 0.0] for e in result.loss_history])


def train_run(tmp_path: Path, run: RunSpec, components, speedups: Speedups | None, name: str, on_snapshot=None):
    return trainer.train(run, open_folder(tmp_path / name, run), components, synthetic_data(),
                         on_snapshot or Recorder(), "cpu", speedups=speedups)


@pytest.fixture
def fresh_state():
    reuse.forget()
    inference.forget()
    yield
    reuse.forget()
    inference.forget()


def compiled_kinds(model: torch.nn.Module) -> set[str]:
    """Class names of the modules compiled in place."""
    return {type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}


# How the trained weights are compared. The whole UNet and the transformer blocks compile to the eager arithmetic,
# so the weights agree to 1e-6. Compiled ResNet blocks round GroupNorm's inputs differently, and the tiny model has
# parameters whose gradient GroupNorm cancels (a bias added just before it: its gradient is 1e-9 of noise), which
# AdamW turns into steps of about the learning rate that change almost nothing the model computes. So that variant
# compares what the trained UNet predicts, against how far training moved it.
WEIGHTS, PREDICTIONS = "weights", "predictions"


@pytest.mark.parametrize(("memory_mode", "variant", "kinds", "compare"), [
    ("fast", FULL, {"UNet2DConditionModel"}, WEIGHTS),
    ("low_memory", REGIONAL, {"BasicTransformerBlock"}, WEIGHTS),
    ("low_memory", BLOCKS, {"BasicTransformerBlock", "ResnetBlock2D"}, PREDICTIONS),
    ("low_memory", BLOCKS_OUTER, {"BasicTransformerBlock", "ResnetBlock2D"}, PREDICTIONS),
])
def test_compiled_training_matches_eager_and_the_compiled_unet_is_reused(tmp_path, fresh_state, memory_mode,
                                                                         variant, kinds, compare):
    run = make_run(tmp_path, (2, 3), memory_mode=memory_mode, gradient_checkpointing=True)
    eager_components = build_tiny_components()
    eager = train_run(tmp_path, run, eager_components, None, "eager")

    compiled_components = reuse.training_components(ModelSpec(id="tiny"))
    compiled = train_run(tmp_path, run, compiled_components, Speedups(compile=variant), "compiled")
    assert compiled_with(compiled_components.unet) == variant
    assert compiled_kinds(compiled_components.unet) == kinds
    method = trainer.make_method(run)
    assert is_warm(compiled_components.unet, variant, training_shape(run.train, method))
    no_prior = dataclasses.replace(run.train, prior_loss_weight=0.0)  # batch 1 instead of 1 + 1: another shape
    assert not is_warm(compiled_components.unet, variant, training_shape(no_prior, method))
    assert compiled.compiled == variant.describe() and eager.compiled is None
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-6, atol=1e-7)
    if compare == WEIGHTS:
        assert_close_weights(weights(compiled_components.unet), weights(eager_components.unet), atol=1e-6)
    else:
        trained, reference = predictions(compiled_components.unet), predictions(eager_components.unet)
        moved = (reference - predictions(build_tiny_components().unet)).abs().max().item()
        # 3 steps move the predictions by about 0.65; the two trainings differ by about 1e-5 of that
        assert (trained - reference).abs().max().item() <= 1e-4 * moved

    # The next run of the same model reuses the compiled UNet: no new graph, the same result as eager again.
    before = graphs()
    again_components = reuse.training_components(ModelSpec(id="tiny"))
    assert again_components.unet is compiled_components.unet
    again = train_run(tmp_path, run, again_components, Speedups(compile=variant), "again")
    assert graphs() == before
    np.testing.assert_allclose(losses(again), losses(eager), rtol=1e-6, atol=1e-7)

    # A run with compile off on the compiled UNet runs it eagerly: still no new graph.
    plain = train_run(tmp_path, run, reuse.training_components(ModelSpec(id="tiny")), None, "plain")
    assert graphs() == before and plain.compiled is None
    np.testing.assert_allclose(losses(plain), losses(eager), rtol=1e-6, atol=1e-7)


def test_auto_on_a_cpu_trains_eager_and_true_compiles(tmp_path, fresh_state, monkeypatch, caplog):
    monkeypatch.setattr(trainer, "decide_training", _decide_with(REGIONAL))
    run = make_run(tmp_path, (2,), compile=True)
    result = train_run(tmp_path, run, build_tiny_components(), None, "on")
    assert result.compiled == REGIONAL.describe()
    auto = make_run(tmp_path, (2,), seed=1)  # compile: auto
    assert train_run(tmp_path, auto, build_tiny_components(), None, "auto").compiled is None


def _decide_with(variant: TrainingCompile):
    """decide_training with `variant` (aot_eager) in place of the inductor variants."""
    from harness.trainer import compiled

    def decide(spec, method, unet, device, steps, trainable):
        decision, chosen = compiled.decide_training(spec, method, unet, device, steps, trainable)
        return decision, variant if chosen is not None else None

    return decide


def test_snapshots_of_a_compiled_training_unet_sample_without_compiling_it_again(tmp_path, fresh_state):
    run = make_run(tmp_path, (1, 2))
    settings = sampler_settings(SPEC, 32)
    requests = eval_requests(SUBJECT, SPEC)[:2]
    counts = []

    def sample(step, unet, components):
        counts.append(graphs())
        generate(components, requests, tmp_path / f"step{step}", settings, "cpu", "fp32", {}, batch_size=2,
                 unet=unet, compile=False)
        counts.append(graphs())

    train_run(tmp_path, run, build_tiny_components(), Speedups(compile=FULL), "snap", on_snapshot=sample)
    assert counts[0] == counts[1] and counts[2] == counts[3]  # eager sampling compiled nothing
    assert read_recorded(tmp_path / "step1") == {"batch_size": 2, "render": "eager"}


def method_run(name: str, **train) -> RunSpec:
    method = METHODS.get(name)
    spec = TrainSpec(method=name, steps=2, resolution=32, mixed_precision="no", num_class_images=3,
                     **{**dict(method.train_defaults), **train})
    settings, subject = method.bind_subject(method.settings_type(), SUBJECT)  # Custom Diffusion: its token
    return RunSpec(run_key=run_key(run_identity(subject, ModelSpec(id="tiny"), spec, settings, None, "0" * 64)),
                   subject=subject, model=ModelSpec(id="tiny"), train=spec, method=settings, class_images=None,
                   snapshot_steps=(2,), instance_digest="0" * 64, varied=())


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_compiled_as_it_trains_eager(tmp_path, fresh_state, name):
    method = METHODS.get(name)
    if method.compile_problem:
        pytest.skip(f"{name} trains eager: {method.compile_problem}")
    run = method_run(name)
    eager = train_run(tmp_path, run, build_tiny_components(), None, "eager")
    compiled = train_run(tmp_path, run, build_tiny_components(), Speedups(compile=FULL), "compiled")
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "scope"), [("lora", "full"), ("dreambooth", "blocks")])
def test_low_memory_compiles_the_whole_unet_when_it_steps_nothing_inside_backward(tmp_path, fresh_state, name,
                                                                                   scope):
    # The tiny UNet has one parameter large enough to be stepped inside backward; a LoRA's adapters have none.
    low_memory_on = dataclasses.replace(ON["low_memory"], backend="aot_eager")
    run = method_run(name, memory_mode="low_memory", gradient_checkpointing=True)
    eager = train_run(tmp_path, run, build_tiny_components(), None, "eager")
    components = build_tiny_components()
    compiled = train_run(tmp_path, run, components, Speedups(compile=low_memory_on), "compiled")
    assert compiled_with(components.unet).scope == scope
    assert compiled.compiled == compiled_with(components.unet).describe()
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "expected"), [("lora", ON["fast"]), ("dreambooth", ON["low_memory"])])
def test_a_run_decides_its_variant_from_the_parameters_its_method_trains(name, expected):
    from harness.trainer import compiled

    run = method_run(name, memory_mode="low_memory", gradient_checkpointing=True, compile=True)
    components = build_tiny_components()
    method = trainer.make_method(run)
    trainable = method.prepare(components, torch.device("cpu"))
    decision, variant = compiled.decide_training(run.train, method, components.unet, torch.device("cpu"), 2,
                                                 trainable)
    assert decision.compile and variant == expected


# --------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture
def aot_recipe(monkeypatch):
    recipe = dataclasses.replace(inference.RECIPES[inference.COMPILED], backend="aot_eager")
    monkeypatch.setitem(inference.RECIPES, inference.COMPILED, recipe)
    return recipe


def pixels(folder: Path, request) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{request.stem}.png"), dtype=np.int16)


def test_compiled_sampling_pads_the_last_batch_and_gives_the_eager_images(tmp_path, fresh_state, aot_recipe):
    components = build_tiny_components()
    requests = eval_requests(SUBJECT, SPEC)  # 6 images: batches of 4 and 2 (padded to 4)
    assert len(requests) == 6
    settings = sampler_settings(SPEC, 32)
    generate(components, requests, tmp_path / "eager", settings, "cpu", "fp32", {}, batch_size=4, compile=False)
    generate(components, requests, tmp_path / "fast", settings, "cpu", "fp32", {}, batch_size=4, compile=True)
    assert read_recorded(tmp_path / "fast") == {"batch_size": 4, "render": "compiled"}
    compiled_so_far = graphs()
    for request in requests:
        assert np.abs(pixels(tmp_path / "fast", request) - pixels(tmp_path / "eager", request)).max() <= 1
    # The copies hold the weights of the UNet they are given: a snapshot's, here another model's.
    other = build_tiny_components(seed=1)
    generate(components, requests[:2], tmp_path / "other-fast", settings, "cpu", "fp32", {}, batch_size=4,
             unet=other.unet, compile=True)
    assert graphs() == compiled_so_far  # the kept copies took the other weights without compiling again
    generate(components, requests[:2], tmp_path / "other-eager", settings, "cpu", "fp32", {}, batch_size=4,
             unet=other.unet, compile=False)
    for request in requests[:2]:
        a, b = pixels(tmp_path / "other-fast", request), pixels(tmp_path / "other-eager", request)
        assert np.abs(a - b).max() <= 1
        assert np.abs(a - pixels(tmp_path / "fast", request)).mean() > 5  # not the first model's image


def test_a_folder_is_finished_with_the_recipe_it_began_with(tmp_path, fresh_state, aot_recipe):
    components = build_tiny_components()
    requests = eval_requests(SUBJECT, SPEC)
    settings = sampler_settings(SPEC, 32)
    generate(components, requests[:4], tmp_path / "a", settings, "cpu", "fp32", {}, batch_size=4, compile=True)
    generate(components, requests, tmp_path / "a", settings, "cpu", "fp32", {}, batch_size=4)  # auto: eager on a CPU
    assert {read_json_render(p) for p in (tmp_path / "a").glob("*.json")} == {"compiled"}
    generate(components, requests[:4], tmp_path / "b", settings, "cpu", "fp32", {}, batch_size=4, compile=False)
    generate(components, requests, tmp_path / "b", settings, "cpu", "fp32", {}, batch_size=4, compile=True)
    assert {read_json_render(p) for p in (tmp_path / "b").glob("*.json")} == {"eager"}
    # compile: false is the way out of a compiled path: the rest of a compiled folder is rendered eager.
    generate(components, requests[:4], tmp_path / "c", settings, "cpu", "fp32", {}, batch_size=4, compile=True)
    generate(components, requests, tmp_path / "c", settings, "cpu", "fp32", {}, batch_size=4, compile=False)
    renders = {p.stem: read_json_render(p) for p in (tmp_path / "c").glob("*.json")}
    assert sorted(renders.values()) == ["compiled"] * 4 + ["eager"] * 2


def read_json_render(path: Path) -> str:
    import json

    return json.loads(path.read_text())["render"]


def test_a_unet_whose_weights_do_not_fit_renders_eager(tmp_path, fresh_state, aot_recipe):
    components = build_tiny_components()
    adapted = build_tiny_components().unet
    adapted.adapter = torch.nn.Linear(2, 2)  # what a method's adapter layers add to the state dict
    requests = eval_requests(SUBJECT, SPEC)[:2]
    generate(components, requests, tmp_path / "x", sampler_settings(SPEC, 32), "cpu", "fp32", {}, batch_size=2,
             unet=adapted, compile=True)
    assert read_recorded(tmp_path / "x") == {"batch_size": 2, "render": "eager"}


def test_class_images_render_compiled_and_record_it(tmp_path, fresh_state, aot_recipe):
    from harness.class_images import PoolSpec, ensure_pool
    from harness.config import ClassImageSpec

    pool = PoolSpec(model=ModelSpec(id="tiny"), prompt="a dog", resolution=32, sampler=ClassImageSpec(steps=2))
    components = build_tiny_components()
    eager = ensure_pool(dataclasses.replace(pool, sampler=dataclasses.replace(pool.sampler, compile=False)), 3,
                        tmp_path / "eager", components, "cpu", batch_size=2)
    fast = ensure_pool(dataclasses.replace(pool, sampler=dataclasses.replace(pool.sampler, compile=True)), 3,
                       tmp_path / "fast", components, "cpu", batch_size=2)
    for a, b in zip(eager, fast, strict=True):
        assert a.name == b.name
        assert np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)).max() <= 1
        assert read_json_render(b.with_suffix(".json")) == "compiled"


def test_checkpointed_blocks_run_their_checkpoint_inside_the_compiled_code(tmp_path, fresh_state, monkeypatch):
    """Each compiled block is one call to the compiled checkpoint per step (none through torch's eager checkpoint);
    with checkpoints outside, every block goes through the eager checkpoint instead."""
    inner_calls, eager_calls = [], []
    inner = compiled.checkpointed_block("aot_eager")
    monkeypatch.setattr(compiled, "checkpointed_block",
                        lambda backend: lambda block, *args: inner_calls.append(block) or inner(block, *args))
    eager_checkpoint = torch.utils.checkpoint.checkpoint

    def counted(fn, *args, **kw):  # a block called whole (__call__) under torch's eager checkpoint
        if getattr(fn, "__func__", None) is torch.nn.Module.__call__:
            eager_calls.append(fn)
        return eager_checkpoint(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    run = make_run(tmp_path, (2,), memory_mode="low_memory", gradient_checkpointing=True)
    train_run(tmp_path, run, reuse.training_components(ModelSpec(id="tiny")), Speedups(compile=BLOCKS), "inner")
    checkpointed = {id(block) for block in inner_calls}  # every block diffusers checkpoints (not the mid block's
    assert checkpointed and len(inner_calls) == 2 * len(checkpointed)  # first ResNet): once a step, 2 steps
    assert eager_calls == []
    inner_calls.clear()
    train_run(tmp_path, run, build_tiny_components(), Speedups(compile=BLOCKS_OUTER), "outer")
    assert inner_calls == [] and len(eager_calls) == 2 * len(checkpointed)
    assert BLOCKS.checkpoints_inside and not BLOCKS_OUTER.checkpoints_inside
    assert not dataclasses.replace(BLOCKS, cuda_graphs=True).checkpoints_inside and not FULL.checkpoints_inside


# --------------------------------------------------------------------------------------------------------------
# The real compiler


def test_a_compiled_checkpointed_block_keeps_only_its_inputs_for_backward(fresh_state):
    """Inductor, checkpoint inside: between forward and backward a block holds what torch's eager checkpoint holds,
    its inputs. (With inductor's layout optimization, which the CPU always applies to convolutions, it would also
    hold channels_last copies of its convolution weights and input.)"""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32)
    block.compile(backend="inductor", dynamic=False)  # a block compiled by compile_blocks
    x, temb = torch.randn(2, 64, 8, 8, requires_grad=True), torch.randn(2, 32)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    held = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            held.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = compiled.checkpointed_block("inductor")(block, x, temb)
    out.square().sum().backward()
    assert sorted(held) == sorted([x.untyped_storage().data_ptr(), temb.untyped_storage().data_ptr()])
    expected = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block._call_impl, x, temb,
                                                                     use_reentrant=False).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)


def test_inductor_matches_eager_within_tolerance(tmp_path, fresh_state):
    """Inductor (C++ kernels on the CPU): two training steps with regional compilation, and sampling through the
    compiled copies, against the plain paths."""
    run = make_run(tmp_path, (2,), memory_mode="fast")
    eager = train_run(tmp_path, run, build_tiny_components(), None, "eager")
    variant = TrainingCompile("regional", cuda_graphs=False)
    compiled = train_run(tmp_path, run, build_tiny_components(), Speedups(compile=variant), "inductor")
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-4)

    components = build_tiny_components()
    requests = eval_requests(SUBJECT, SPEC)[:2]
    settings = sampler_settings(SPEC, 32)
    generate(components, requests, tmp_path / "eager", settings, "cpu", "fp32", {}, batch_size=2, compile=False)
    generate(components, requests, tmp_path / "fast", settings, "cpu", "fp32", {}, batch_size=2, compile=True)
    for request in requests:
        assert np.abs(pixels(tmp_path / "fast", request) - pixels(tmp_path / "eager", request)).max() <= 2
