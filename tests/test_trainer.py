"""The trainer on the tiny model: learning, determinism, snapshots, resume, memory modes, optimizers, caches."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from PIL import Image

from harness.backends.tiny import build_tiny_components
from harness.caches import LatentBank, TrainingData, build_training_data, latent_key
from harness.config import ClassImageSpec, ModelSpec, SubjectSpec, TrainSpec
from harness.grid import RunSpec, run_identity, run_key
from harness.methods.dreambooth import DreamBoothSettings
from harness.store import RunFolder, RunStore
from harness.trainer import loop as trainer
from harness.trainer import optimizers, randomness

DIGEST = "0" * 64


def make_run(tmp_path: Path, snapshot_steps: tuple[int, ...] = (2,), train_text_encoder: bool = False,
             **train: object) -> RunSpec:
    fields = {"resolution": 32, "mixed_precision": "no", "learning_rate": 1e-3, "num_class_images": 3,
              "steps": max(snapshot_steps), **train}
    spec = TrainSpec(**fields)
    method = DreamBoothSettings(train_text_encoder=train_text_encoder)
    subject = SubjectSpec(name="dog", instance_dir=tmp_path, class_noun="dog")
    model = ModelSpec(id="tiny")
    class_images = ClassImageSpec(steps=2) if spec.uses_prior else None
    key = run_key(run_identity(subject, model, spec, method, class_images, DIGEST))
    return RunSpec(run_key=key, subject=subject, model=model, train=spec, method=method, class_images=class_images,
                   snapshot_steps=snapshot_steps, instance_digest=DIGEST, varied=())


def start(run: RunSpec, components, data: TrainingData, device: str = "cpu") -> trainer.TrainingSession:
    """A training session of the run's method (DreamBooth here) on `components`."""
    return trainer.start_session(trainer.make_method(run), components, data, device)


def synthetic_data(with_class: bool = True, seed: int = 0) -> TrainingData:
    """Latent distributions and embeddings of the tiny model's shapes (32 px -> 4x4 latents, 32-wide text)."""
    g = torch.Generator().manual_seed(seed)

    def bank(n: int) -> LatentBank:
        return LatentBank(mean=torch.randn(n, 4, 4, 4, generator=g), std=0.1 * torch.rand(n, 4, 4, 4, generator=g))

    data = TrainingData(instance_latents=bank(3), instance_embedding=torch.randn(1, 77, 32, generator=g),
                        instance_prompt="a sks dog")
    if not with_class:
        return data
    return replace(data, class_latents=bank(3), class_embedding=torch.randn(1, 77, 32, generator=g),
                   class_prompt="a dog")


def open_folder(tmp_path: Path, run: RunSpec) -> RunFolder:
    return RunStore(tmp_path / "runs").open(run)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(autouse=True)
def small_parameter_threshold(monkeypatch):
    """The tiny UNet's tensors are all small; a lower threshold gives low_memory mode both kinds to handle, and
    smaller buckets give it several."""
    monkeypatch.setattr(optimizers, "HOOKED_MIN_ELEMENTS", 2000)
    monkeypatch.setattr(optimizers, "BUCKET_ELEMENTS", 10_000)


class Recorder:
    """A snapshot callback that records steps and the state of the model it was handed."""

    def __init__(self, folder: RunFolder | None = None, fail_at: int | None = None):
        self.steps: list[int] = []
        self.checksums: dict[int, float] = {}
        self.folder, self.fail_at = folder, fail_at

    def __call__(self, step: int, unet: torch.nn.Module, components) -> None:
        assert not unet.training and not torch.is_grad_enabled()
        assert unet is components.unet
        if step == self.fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        self.steps.append(step)
        self.checksums[step] = sum(p.double().sum().item() for p in unet.parameters())
        if self.folder is not None:
            self.folder.mark_done(f"snapshot-{step}")

    def pending(self, run: RunSpec) -> list[int]:
        return [s for s in run.snapshot_steps if not self.folder.is_done(f"snapshot-{s}")]


# --------------------------------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
@pytest.mark.parametrize("memory_mode", ["fast", "low_memory"])
def test_tiny_model_overfits_a_fixed_batch(tmp_path, monkeypatch, memory_mode):
    """With the same latents, noise and timesteps every step, 30 steps at lr 3e-3 cut the loss at least 50x."""
    run = make_run(tmp_path, (30,), learning_rate=3e-3, prior_loss_weight=0.0, memory_mode=memory_mode,
                   max_grad_norm=None)
    spec = run.train
    data = synthetic_data(with_class=False)
    session = start(run, build_tiny_components(), data, "cpu")
    fixed = randomness.draw_step_inputs(data, spec, 0, 0.18215, 1000, torch.device("cpu"))
    monkeypatch.setattr(trainer, "draw_step_inputs", lambda *args: fixed)
    before = trainer.compute_loss(session, fixed).total.item()
    for _ in range(30):
        last = trainer.advance(session).read()
    assert last.step == 30 and last.prior is None
    assert last.instance < before / 50, (before, last.instance)


def test_adamw8bit_is_the_real_bitsandbytes_optimizer_on_cpu(tmp_path):
    run = make_run(tmp_path)
    session = start(run, build_tiny_components(), synthetic_data(), "cpu")
    assert isinstance(session.updater.optimizer, bnb.optim.AdamW8bit)
    assert session.optimizer_label == "bitsandbytes.AdamW8bit"
    trainer.advance(session)
    big = max(session.components.unet.parameters(), key=lambda p: p.numel())
    state = session.updater.optimizer.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8  # 8-bit moments


def test_unusable_bitsandbytes_falls_back_to_torch_adamw_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(optimizers, "bnb_8bit_problem", lambda device: "RuntimeError: no kernel")
    run = make_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="harness.trainer.optimizers"):
        session = start(run, build_tiny_components(), synthetic_data(), "cpu")
    assert type(session.updater.optimizer) is torch.optim.AdamW
    assert "fallback" in session.optimizer_label
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AdamW8bit" in warnings[0].message and "no kernel" in warnings[0].message


@pytest.mark.slow
def test_low_memory_mode_matches_fast_mode_without_clipping(tmp_path):
    results = {}
    for mode in ("fast", "low_memory"):
        run = make_run(tmp_path, (3,), memory_mode=mode, max_grad_norm=None)
        session = start(run, build_tiny_components(), synthetic_data(), "cpu")
        if mode == "low_memory":
            updater = session.updater
            hooked = sum(len(bucket) for bucket in updater.buckets)
            assert hooked + len(updater.small) == len(list(session.components.unet.parameters()))
            assert len(updater.optimizers) == len(updater.buckets) > 3
        for _ in range(3):
            trainer.advance(session)
        results[mode] = weights(session.components.unet)
    for name, value in results["fast"].items():
        assert torch.allclose(value, results["low_memory"][name], atol=1e-6), name


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("memory_mode", ["fast", "low_memory"])
def test_low_memory_mode_holds_only_the_gradients_of_buckets_under_way(tmp_path, memory_mode):
    run = make_run(tmp_path, memory_mode=memory_mode)
    session = start(run, build_tiny_components(), synthetic_data(), "cpu")
    unet = session.components.unet
    large = [p for p in unet.parameters() if p.numel() >= optimizers.HOOKED_MIN_ELEMENTS]
    held = []  # elements of large gradients alive each time a layer's backward finishes
    hooks = [m.register_full_backward_hook(
        lambda *args: held.append(sum(p.numel() for p in large if p.grad is not None)))
        for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    trainer.advance(session)
    for hook in hooks:
        hook.remove()
    total = sum(p.numel() for p in large)
    assert len(held) > 10 and len(large) > 10 and total > 8 * optimizers.BUCKET_ELEMENTS
    if memory_mode == "low_memory":
        # each bucket is stepped and freed the moment its last gradient completes
        assert 0 < max(held) <= 2 * optimizers.BUCKET_ELEMENTS
    else:
        assert max(held) > total // 2  # fast mode holds them until the step
    assert all(p.grad is None for p in unet.parameters())


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_buckets_update_exactly_as_one_optimizer_per_parameter(tmp_path, monkeypatch, max_grad_norm):
    run = make_run(tmp_path, (3,), memory_mode="low_memory", max_grad_norm=max_grad_norm)
    results = {}
    for limit in (1, 10_000, 10**9):  # one parameter a bucket, several, all in one
        monkeypatch.setattr(optimizers, "BUCKET_ELEMENTS", limit)
        session = start(run, build_tiny_components(), synthetic_data(), "cpu")
        for _ in range(3):
            trainer.advance(session)
        results[limit] = weights(session.components.unet)
    assert_same_weights(results[1], results[10_000])
    assert_same_weights(results[1], results[10**9])


def test_optimizer_state_moves_between_bucket_layouts(tmp_path, monkeypatch):
    run = make_run(tmp_path, (3,), memory_mode="low_memory")
    monkeypatch.setattr(optimizers, "BUCKET_ELEMENTS", 1)
    first = start(run, build_tiny_components(), synthetic_data(), "cpu")
    for _ in range(2):
        trainer.advance(first)
    saved = first.updater.state_dict()
    assert len(saved["optimizers"]) == sum(len(b) for b in first.updater.buckets)  # one state per parameter
    monkeypatch.setattr(optimizers, "BUCKET_ELEMENTS", 10**9)
    second = start(run, build_tiny_components(), synthetic_data(), "cpu")
    second.components.unet.load_state_dict(first.components.unet.state_dict())
    second.updater.load_state_dict(saved)
    second.step = first.step
    trainer.advance(first)
    trainer.advance(second)
    assert_same_weights(weights(first.components.unet), weights(second.components.unet))


def _twin_adamw8bit(shapes: list[tuple[int, ...]], transposed: bool = False):
    torch.manual_seed(0)
    made = [torch.randn(*shape) for shape in shapes]
    if transposed:
        made = [t.t() for t in made]  # non-contiguous parameters
    spec = TrainSpec(learning_rate=1e-3, adam_weight_decay=0.05)
    params = [torch.nn.Parameter(t.clone()) for t in made]
    twins = [torch.nn.Parameter(t.clone()) for t in made]
    return params, optimizers._adamw8bit(params, spec), twins, optimizers._adamw8bit(twins, spec)


def test_direct_kernel_calls_update_exactly_as_bitsandbytes_own_step(monkeypatch):
    # 100 elements: 32-bit state; 5,000 and 70,000: 8-bit blockwise state (bitsandbytes' min_8bit_size is 4,096)
    params, direct, twins, stock = _twin_adamw8bit([(100,), (50, 100), (70, 1000)])
    stock.direct_calls = False
    own_steps = []
    monkeypatch.setattr(direct, "update_step", lambda *args: own_steps.append(args))
    assert direct.direct_calls
    for _ in range(4):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        direct.step()
        stock.step()
    assert own_steps == []  # every update went through the direct calls
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        for key, value in stock.state[q].items():
            assert torch.equal(torch.as_tensor(direct.state[p][key]), torch.as_tensor(value)), key
    assert [direct.state[p]["state1"].dtype for p in params] == [torch.float32, torch.uint8, torch.uint8]


def test_direct_kernel_calls_leave_non_contiguous_parameters_to_bitsandbytes(monkeypatch):
    params, direct, twins, stock = _twin_adamw8bit([(100, 60)], transposed=True)
    stock.direct_calls = False
    own = direct.update_step
    calls = []
    monkeypatch.setattr(direct, "update_step", lambda *args: calls.append(1) or own(*args))
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    direct.step()
    stock.step()
    assert calls == [1]
    assert torch.equal(params[0], twins[0])


def test_clip_each_bounds_every_gradient_on_its_own():
    big, small = torch.full((3, 4), 10.0), torch.full((5,), 0.001)
    expected_small = small.clone()
    optimizers.clip_each([big, small], max_norm=2.0)
    assert torch.linalg.vector_norm(big).item() == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(small, expected_small)  # already under the bound: untouched


def test_low_memory_mode_clips_every_parameter(tmp_path, monkeypatch):
    run = make_run(tmp_path, memory_mode="low_memory", max_grad_norm=1e-3)
    session = start(run, build_tiny_components(), synthetic_data(), "cpu")
    assert session.updater.small and session.updater.optimizers  # both kinds of parameters exist here
    clipped = []

    def spy(grads, max_norm):
        optimizers.clip_each.__wrapped__(grads, max_norm)
        clipped.extend(torch.linalg.vector_norm(g).item() for g in grads)

    spy.__wrapped__ = optimizers.clip_each
    monkeypatch.setattr(optimizers, "clip_each", spy)
    trainer.advance(session)
    assert len(clipped) == len(list(session.components.unet.parameters()))
    assert max(clipped) <= 1e-3 * 1.001


def test_learning_rate_schedule_drives_every_optimizer():
    spec = TrainSpec(learning_rate=1.0, lr_schedule="constant_with_warmup", lr_warmup_steps=2, steps=10)
    sgds = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5.0) for _ in range(3)]
    lr = optimizers.LearningRate(spec, sgds)
    seen = []
    for _ in range(3):
        seen.append([o.param_groups[0]["lr"] for o in sgds])
        lr.step()
    assert seen == [[0.0] * 3, [0.5] * 3, [1.0] * 3]
    restored = optimizers.LearningRate(spec, sgds[:1])
    restored.load_state_dict(lr.state_dict())
    assert restored.current == 1.0 and sgds[0].param_groups[0]["lr"] == 1.0


def test_mixed_precision_bf16_keeps_float32_weights(tmp_path):
    run = make_run(tmp_path, mixed_precision="bf16")
    session = start(run, build_tiny_components(), synthetic_data(), "cpu")
    loss = trainer.advance(session).read()
    assert np.isfinite(loss.instance) and np.isfinite(loss.prior)
    assert {p.dtype for p in session.components.unet.parameters()} == {torch.float32}


@pytest.mark.slow
def test_text_encoder_training_v_prediction_and_min_snr(tmp_path):
    run = make_run(tmp_path, train_text_encoder=True, snr_gamma=5.0, offset_noise=0.1)
    components = build_tiny_components()
    components.scheduler_config["prediction_type"] = "v_prediction"
    before = weights(components.text_encoder)
    session = start(run, components, synthetic_data(), "cpu")
    loss = trainer.advance(session).read()
    assert np.isfinite(loss.instance) and np.isfinite(loss.prior)
    after = weights(components.text_encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the encoder was trained


# --------------------------------------------------------------------------------------------------------------
# Data order and randomness


def test_each_epoch_visits_every_image_once():
    order = [randomness.stream_indices(5, 2, seed=3, stream="instance", step=s) for s in range(5)]
    flat = [i for batch in order for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert order == [randomness.stream_indices(5, 2, 3, "instance", s) for s in range(5)]  # a pure function
    assert flat != [i for s in range(5) for i in randomness.stream_indices(5, 2, 4, "instance", s)]  # seed matters


class Untouchable:
    """Stands in for class data that must never be read."""

    def __getattr__(self, name):
        raise AssertionError(f"class data was read ({name})")

    def __len__(self):
        raise AssertionError("class data was read (len)")


def test_prior_weight_zero_never_touches_class_data(tmp_path):
    run = make_run(tmp_path, (2,), prior_loss_weight=0.0)
    data = replace(synthetic_data(with_class=False), class_latents=Untouchable(), class_embedding=Untouchable())
    result = trainer.train(run, open_folder(tmp_path, run), build_tiny_components(), data, Recorder(), "cpu")
    assert result.final_step == 2
    assert all(entry["prior"] is None for entry in result.loss_history)


# --------------------------------------------------------------------------------------------------------------
# The entry point: snapshots, results, determinism, resume


@pytest.mark.slow
def test_snapshots_fire_at_the_grid_steps_and_the_result_is_stored(tmp_path):
    run = make_run(tmp_path, (1, 3, 4))
    folder = open_folder(tmp_path, run)
    recorder = Recorder()
    result = trainer.train(run, folder, build_tiny_components(), synthetic_data(), recorder, "cpu")
    assert recorder.steps == [1, 3, 4]
    assert result.final_step == 4 and [e["step"] for e in result.loss_history] == [1, 2, 3, 4]
    assert result.optimizer == "bitsandbytes.AdamW8bit" and result.peak_memory_bytes is None
    assert result.seconds_per_step > 0 and result.wall_seconds >= result.seconds_per_step
    stored = json.loads(folder.file("train.json").read_text())
    assert stored["final_step"] == 4 and stored["loss_history"] == result.loss_history
    assert folder.is_done("train")
    # Done and nothing pending: nothing runs (these components would be refused if it trained).
    again = Recorder()
    assert trainer.train(run, folder, build_tiny_components(), synthetic_data(), again, "cpu", []) == result
    assert again.steps == []


@pytest.mark.slow
def test_same_spec_and_seed_give_identical_weights(tmp_path):
    finals = []
    for attempt in range(2):
        run = make_run(tmp_path, (3,))
        components = build_tiny_components()
        trainer.train(run, open_folder(tmp_path / str(attempt), run), components, synthetic_data(), Recorder(), "cpu")
        finals.append(weights(components.unet))
    assert_same_weights(*finals)
    other = build_tiny_components()
    run = make_run(tmp_path, (3,), seed=1)
    trainer.train(run, open_folder(tmp_path / "seed1", run), other, synthetic_data(), Recorder(), "cpu")
    assert any(not torch.equal(finals[0][k], v) for k, v in weights(other.unet).items())


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, checkpoint_every):
    run = make_run(tmp_path, (2, 4, 5), checkpoint_every=checkpoint_every)
    reference = build_tiny_components()
    uninterrupted = Recorder()
    trainer.train(run, open_folder(tmp_path / "reference", run), reference, synthetic_data(), uninterrupted, "cpu")

    folder = open_folder(tmp_path / "killed", run)
    first = Recorder(folder)
    real_advance = trainer.advance

    def crash_after_three_steps(session):
        if session.step == 3:
            raise KeyboardInterrupt("killed")
        return real_advance(session)

    monkeypatch.setattr(trainer, "advance", crash_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(run, folder, build_tiny_components(), synthetic_data(), first, "cpu", first.pending(run))
    monkeypatch.setattr(trainer, "advance", real_advance)
    assert first.steps == [2] and not folder.is_done("train")
    assert folder.file("checkpoint", "state.pt").is_file() == (checkpoint_every is not None)

    second = Recorder(folder)
    resumed = build_tiny_components()
    result = trainer.train(run, folder, resumed, synthetic_data(), second, "cpu", second.pending(run))
    assert second.steps == [4, 5]  # snapshot 2 is not sampled again
    assert result.resumed_from_step == (2 if checkpoint_every else 0)
    assert [e["step"] for e in result.loss_history] == [1, 2, 3, 4, 5]
    assert second.checksums == {s: uninterrupted.checksums[s] for s in (4, 5)}
    assert_same_weights(weights(reference.unet), weights(resumed.unet))
    assert not folder.file("checkpoint").exists()  # removed once the run is done


@pytest.mark.slow
def test_resume_from_a_checkpoint_at_a_pending_snapshot_samples_it_first(tmp_path):
    run = make_run(tmp_path, (2, 3), checkpoint_every=2)
    folder = open_folder(tmp_path, run)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train(run, folder, build_tiny_components(), synthetic_data(), Recorder(folder, fail_at=2), "cpu")
    recorder = Recorder(folder)
    result = trainer.train(run, folder, build_tiny_components(), synthetic_data(), recorder, "cpu",
                           recorder.pending(run))
    assert result.resumed_from_step == 2 and recorder.steps == [2, 3]


@pytest.mark.slow
def test_a_checkpoint_past_a_pending_snapshot_is_not_used(tmp_path, monkeypatch):
    run = make_run(tmp_path, (2, 4), checkpoint_every=1)
    folder = open_folder(tmp_path, run)
    real_advance = trainer.advance
    monkeypatch.setattr(trainer, "advance", lambda s: real_advance(s) if s.step < 3 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.train(run, folder, build_tiny_components(), synthetic_data(), Recorder(), "cpu")
    monkeypatch.setattr(trainer, "advance", real_advance)
    recorder = Recorder()  # snapshot 2 must be sampled again, but the checkpoint holds step 3
    result = trainer.train(run, folder, build_tiny_components(), synthetic_data(), recorder, "cpu", [2, 4])
    assert result.resumed_from_step == 0 and recorder.steps == [2, 4]


@pytest.mark.slow
def test_a_done_run_replays_only_to_the_snapshot_asked_again(tmp_path):
    run = make_run(tmp_path, (1, 3))
    folder = open_folder(tmp_path, run)
    original = Recorder()
    stored = trainer.train(run, folder, build_tiny_components(), synthetic_data(), original, "cpu")
    replay = Recorder()
    again = trainer.train(run, folder, build_tiny_components(), synthetic_data(), replay, "cpu", [1])
    assert replay.steps == [1] and replay.checksums[1] == original.checksums[1]
    assert again == stored


@pytest.mark.slow
def test_components_are_trained_once(tmp_path):
    run = make_run(tmp_path, (1,))
    components = build_tiny_components()
    trainer.train(run, open_folder(tmp_path, run), components, synthetic_data(), Recorder(), "cpu")
    other = make_run(tmp_path, (1,), seed=5)
    with pytest.raises(ValueError, match="already trained"):
        trainer.train(other, open_folder(tmp_path, other), components, synthetic_data(), Recorder(), "cpu")


def test_out_of_memory_names_the_settings_that_help(tmp_path, monkeypatch):
    def out_of_memory(session):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "advance", out_of_memory)
    run = make_run(tmp_path, (2,), batch_size=2, gradient_checkpointing=False, mixed_precision="fp16")
    with pytest.raises(trainer.TrainingOutOfMemoryError) as error:
        trainer.train(run, open_folder(tmp_path, run), build_tiny_components(), synthetic_data(), Recorder(), "cpu")
    message = str(error.value)
    for setting in ("memory_mode: low_memory", "batch_size: 1", "gradient_checkpointing: true",
                    "mixed_precision: bf16", run.run_key, "Tried to allocate 2.00 GiB"):
        assert setting in message


@pytest.mark.slow
def test_save_final_writes_an_fp16_diffusers_pipeline(tmp_path):
    from safetensors import safe_open

    run = make_run(tmp_path, (1,), save="final")
    folder = open_folder(tmp_path, run)
    result = trainer.train(run, folder, build_tiny_components(), synthetic_data(), Recorder(), "cpu")
    pipeline = folder.file("pipeline")
    assert result.pipeline_dir == str(pipeline) and (pipeline / "model_index.json").is_file()
    with safe_open(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert not list(folder.path.glob(".pipeline-*"))  # no staging folder left behind


# --------------------------------------------------------------------------------------------------------------
# Caches


def write_pngs(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_latents_and_embeddings_are_computed_once(tmp_path):
    instances, classes = write_pngs(tmp_path / "i", 2), write_pngs(tmp_path / "c", 3, seed=1)
    components = build_tiny_components()
    calls = {"encode": 0, "text": 0}
    encode, text_forward = components.vae.encode, components.text_encoder.forward

    def counting_encode(x):
        calls["encode"] += x.shape[0]
        return encode(x)

    def counting_text(*args, **kwargs):
        calls["text"] += 1
        return text_forward(*args, **kwargs)

    components.vae.encode, components.text_encoder.forward = counting_encode, counting_text
    first = build_training_data(components, instances, "a sks dog", 32, tmp_path / "cache", "cpu",
                                classes, "a dog")
    assert calls == {"encode": 5, "text": 2}
    assert first.instance_latents.mean.shape == (2, 4, 4, 4) and len(first.class_latents) == 3
    assert first.instance_embedding.shape == (1, 77, 32)
    with torch.no_grad():
        direct = encode(torch.from_numpy(np.asarray(Image.open(instances[1]), dtype=np.float32)).permute(2, 0, 1)
                        .unsqueeze(0) / 127.5 - 1).latent_dist
    assert torch.allclose(first.instance_latents.mean[1], direct.mean[0], atol=1e-5)
    assert torch.allclose(first.instance_latents.std[1], direct.std[0], atol=1e-5)

    again = build_training_data(components, instances, "a sks dog", 32, tmp_path / "cache", "cpu")
    assert calls == {"encode": 5, "text": 2}  # everything came from the cache
    assert again.class_latents is None and again.class_embedding is None
    assert torch.equal(again.instance_latents.mean, first.instance_latents.mean)


def test_latent_keys_follow_content_model_and_resolution():
    a, b = build_tiny_components(seed=0), build_tiny_components(seed=1)
    keys = {latent_key("x" * 64, a, 32), latent_key("y" * 64, a, 32), latent_key("x" * 64, b, 32),
            latent_key("x" * 64, a, 64)}
    assert len(keys) == 4


def test_images_of_the_wrong_size_are_refused_with_the_fix(tmp_path):
    paths = write_pngs(tmp_path, 1, size=48)
    with pytest.raises(ValueError, match="48x48 pixels but training runs at 32x32"):
        build_training_data(build_tiny_components(), paths, "a sks dog", 32, tmp_path / "cache", "cpu")

