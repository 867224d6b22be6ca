"""LoRA and Custom Diffusion on the tiny model: what trains and what stays bit-identical, learning, snapshots,
determinism, resume after a kill, exports that plain diffusers loads, and the cached data a method must not use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from harness.backends.tiny import build_tiny_components
from harness.caches import build_training_data, text_key, text_path
from harness.config import ModelSpec, SubjectSpec, TrainSpec
from harness.grid import RunSpec, run_identity, run_key
from harness.methods import METHODS
from harness.methods.custom_diffusion import EMBEDDING_FILE, WEIGHTS_FILE, CustomDiffusionSettings
from harness.methods.dreambooth import DreamBoothSettings
from harness.methods.lora import LoRASettings
from harness.models import make_pipeline
from harness.sampling import render
from harness.trainer import loop as trainer
from harness.trainer import optimizers, randomness
from tests.test_trainer import DIGEST, Recorder, open_folder, synthetic_data, weights, write_pngs

SETTINGS = {"dreambooth": DreamBoothSettings(), "lora": LoRASettings(),
            "custom_diffusion": CustomDiffusionSettings()}


def make_run(tmp_path: Path, method: str, snapshot_steps: tuple[int, ...] = (2,), settings=None,
             **train: object) -> RunSpec:
    fields = {"resolution": 32, "mixed_precision": "no", "learning_rate": 1e-3, "num_class_images": 3,
              "steps": max(snapshot_steps), "method": method, "gradient_checkpointing": False, **train}
    spec = TrainSpec(**fields)
    subject = SubjectSpec(name="dog", instance_dir=tmp_path, class_noun="dog")
    method_settings, subject = METHODS.get(method).bind_subject(settings or SETTINGS[method], subject)
    model = ModelSpec(id="tiny")
    key = run_key(run_identity(subject, model, spec, method_settings, None, DIGEST))
    return RunSpec(run_key=key, subject=subject, model=model, train=spec, method=method_settings, class_images=None,
                   snapshot_steps=snapshot_steps, instance_digest=DIGEST, varied=())


def data_for(run: RunSpec, with_class: bool = True):
    """Synthetic cached data with the run's instance prompt; no cached embedding where the method encodes."""
    data = replace(synthetic_data(with_class), instance_prompt=run.subject.instance_text)
    if trainer.make_method(run).encodes_in_step("instance"):
        data = replace(data, instance_embedding=None)
    return data


def start(run: RunSpec, components=None, with_class: bool = True) -> trainer.TrainingSession:
    return trainer.start_session(trainer.make_method(run), components or build_tiny_components(),
                                 data_for(run, with_class), "cpu")


def base_name(name: str) -> str:
    """A parameter's name in the base model: peft moves a wrapped layer's weight under `.base_layer`."""
    return name.replace(".base_layer", "")


@pytest.fixture(autouse=True)
def small_parameter_threshold(monkeypatch):
    monkeypatch.setattr(optimizers, "HOOKED_MIN_ELEMENTS", 2000)


# --------------------------------------------------------------------------------------------------------------
# What trains, what stays


def test_lora_trains_only_its_adapters_and_the_base_stays_bit_identical(tmp_path):
    components = build_tiny_components()
    base_unet, base_text = weights(components.unet), weights(components.text_encoder)
    session = start(make_run(tmp_path, "lora"), components)
    for _ in range(2):
        trainer.advance(session)
    after = {base_name(k): v for k, v in components.unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == base_unet.keys()
    assert all(torch.equal(after[k], v) for k, v in base_unet.items())
    assert all(torch.equal(v, base_text[k]) for k, v in weights(components.text_encoder).items())
    adapters = {k: v for k, v in components.unet.named_parameters() if "lora_" in k}
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0 is the fourth
    assert all(p.requires_grad for p in adapters.values())
    assert session.trainable_params == sum(p.numel() for p in adapters.values())
    lora_b = [v for k, v in adapters.items() if "lora_B" in k]
    assert all(b.abs().sum() > 0 for b in lora_b)  # B starts at zero; every adapter moved


def test_lora_text_encoder_adapters_train_and_both_prompts_run_through_the_encoder(tmp_path):
    components = build_tiny_components()
    base_text = weights(components.text_encoder)
    run = make_run(tmp_path, "lora", settings=LoRASettings(train_text_encoder=True))
    session = start(run, components)
    assert set(session.tokens) == {"instance", "class"} and not session.embeddings
    trainer.advance(session)
    after = {base_name(k): v for k, v in components.text_encoder.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base_text.items())
    moved = [v for k, v in components.text_encoder.named_parameters() if "lora_B" in k]
    assert moved and all(b.abs().sum() > 0 for b in moved)


@pytest.mark.parametrize("freeze_model", ["crossattn_kv", "crossattn"])
def test_custom_diffusion_trains_cross_attention_copies_and_one_token_row(tmp_path, freeze_model):
    components = build_tiny_components()
    shared_tokenizer = components.tokenizer
    base_unet, base_rows = weights(components.unet), components.text_encoder.get_input_embeddings().weight.clone()
    run = make_run(tmp_path, "custom_diffusion", settings=CustomDiffusionSettings(freeze_model=freeze_model))
    method = trainer.make_method(run)
    session = trainer.start_session(method, components, data_for(run), "cpu")
    for _ in range(2):
        trainer.advance(session)
    trainer.finish_session(session)
    state = components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_unet.items())  # the base UNet, untouched
    copies = {k: v for k, v in state.items() if "_custom_diffusion." in k}
    kinds = {k.split(".processor.")[1].split("_custom_diffusion")[0] for k in copies}
    assert kinds == ({"to_k", "to_v"} if freeze_model == "crossattn_kv" else {"to_k", "to_v", "to_q", "to_out"})
    assert all(".attn2.processor." in k for k in copies)  # cross-attention only
    for key, value in copies.items():
        original = base_unet[key.replace(".processor.", ".").replace("_custom_diffusion", "")]
        assert not torch.equal(value, original), key  # every copy trained
    rows = components.text_encoder.get_input_embeddings().weight
    vocabulary = base_rows.shape[0]
    assert rows.shape[0] == vocabulary + 1
    assert torch.equal(rows[:vocabulary], base_rows)  # every existing row bit-identical
    sks = shared_tokenizer.encode("sks", add_special_tokens=False)[0]
    assert not torch.equal(rows[vocabulary], base_rows[sks])  # the new row moved from where it started
    assert components.tokenizer.convert_tokens_to_ids("<new1>") == vocabulary
    assert "<new1>" not in shared_tokenizer.get_vocab()  # the base model's tokenizer was copied, not changed
    expected = sum(v.numel() for v in copies.values()) + base_rows.shape[1]
    assert session.trainable_params == expected


def test_custom_diffusion_starts_as_the_base_model_with_the_subjects_identifier(tmp_path):
    base = build_tiny_components()
    components = build_tiny_components()
    run = make_run(tmp_path, "custom_diffusion")
    assert run.subject.instance_text == "a <new1> dog" and run.method.initializer_token == "sks"
    trainer.start_session(trainer.make_method(run), components, data_for(run), "cpu")
    latents, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        ours = components.text_encoder(components.tokenizer(["a <new1> dog"] * 2, padding="max_length",
                                                            return_tensors="pt").input_ids)[0]
        theirs = base.text_encoder(base.tokenizer(["a sks dog"] * 2, padding="max_length",
                                                  return_tensors="pt").input_ids)[0]
        assert torch.equal(ours, theirs)
        components.unet.eval()
        out, expected = components.unet(latents, t, ours).sample, base.unet(latents, t, theirs).sample
    assert torch.allclose(out, expected, atol=1e-6)


def test_training_data_skips_the_embedding_a_method_encodes_in_each_step(tmp_path):
    instances, classes = write_pngs(tmp_path / "i", 2), write_pngs(tmp_path / "c", 2, seed=1)
    components = build_tiny_components()
    calls = []
    forward = components.text_encoder.forward
    components.text_encoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    cache = tmp_path / "cache"
    data = build_training_data(components, instances, "a <new1> dog", 32, cache, "cpu", classes, "a dog",
                               encoded_in_step={"instance"})
    assert data.instance_embedding is None and data.class_embedding.shape == (1, 77, 32)
    assert len(calls) == 1  # the class prompt only
    assert not text_path(cache, text_key("a <new1> dog", components)).exists()
    assert text_path(cache, text_key("a dog", components)).is_file()
    run = make_run(tmp_path, "dreambooth")  # encodes nothing in the step: a missing embedding is refused
    with pytest.raises(ValueError, match="no cached embedding of the instance prompt"):
        trainer.start_session(trainer.make_method(run), components, replace(data, instance_embedding=None), "cpu")


@pytest.mark.parametrize("method", ["lora", "custom_diffusion"])
def test_low_memory_mode_trains_every_method(tmp_path, method):
    session = start(make_run(tmp_path, method, memory_mode="low_memory"))
    before = [p.detach().clone() for p in session.updater.small + [p for o in session.updater.optimizers
                                                                      for p in o.param_groups[0]["params"]]]
    loss = trainer.advance(session)
    after = session.updater.small + [p for o in session.updater.optimizers for p in o.param_groups[0]["params"]]
    assert np.isfinite(loss.instance) and len(after) == len(before)
    assert sum(not torch.equal(a, b) for a, b in zip(after, before, strict=True)) > len(before) // 2


def test_lora_dropout_replays_whatever_the_global_generator_did_before(tmp_path):
    finals = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # anything else in the process may have used the global generator
        torch.rand(noise * 7)
        session = start(make_run(tmp_path, "lora", settings=LoRASettings(dropout=0.3)))
        for _ in range(2):
            trainer.advance(session)
        finals.append(session.method.state_dict(session.components))
    assert all(torch.equal(a, b) for a, b in zip(finals[0]["adapters"][0].values(),
                                                 finals[1]["adapters"][0].values(), strict=True))


# --------------------------------------------------------------------------------------------------------------
# Learning, snapshots, determinism, resume


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "custom_diffusion"])
def test_loss_falls_on_a_fixed_batch(tmp_path, monkeypatch, method):
    """The same latents, noise and timesteps every step: 30 steps at lr 1e-2 at least halve the loss."""
    run = make_run(tmp_path, method, (30,), learning_rate=1e-2, max_grad_norm=None, prior_loss_weight=0.0)
    session = start(run, with_class=False)
    fixed = randomness.draw_step_inputs(session.data, run.train, 0, 0.18215, 1000, torch.device("cpu"))
    monkeypatch.setattr(trainer, "draw_step_inputs", lambda *args: fixed)
    before = trainer.compute_loss(session, fixed).total.item()
    for _ in range(30):
        last = trainer.advance(session)
    assert last.instance < before / 2, (before, last.instance)


def _state(method, components) -> dict[str, torch.Tensor]:
    """The method's trainable state, flattened to name -> tensor."""
    state = method.state_dict(components)
    if "adapters" in state:
        return {f"{i}.{k}": v for i, part in enumerate(state["adapters"]) for k, v in part.items()}
    return {**state["attention"], "token_row": state["token_row"]}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class MethodRecorder(Recorder):
    """Records the snapshot steps and the method's state at each."""

    def __init__(self, method_of, folder=None):
        super().__init__(folder)
        self.method_of = method_of
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, step, unet, components):
        super().__call__(step, unet, components)
        self.states[step] = {k: v.clone() for k, v in _state(self.method_of(), components).items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "custom_diffusion"])
def test_snapshots_at_the_grid_steps_determinism_and_resume_after_a_kill(tmp_path, monkeypatch, method):
    run = make_run(tmp_path, method, (1, 3, 4), checkpoint_every=2)
    made = []
    real_make = trainer.make_method
    monkeypatch.setattr(trainer, "make_method", lambda r: made.append(real_make(r)) or made[-1])

    uninterrupted = MethodRecorder(lambda: made[-1])
    trainer.train(run, open_folder(tmp_path / "a", run), build_tiny_components(), data_for(run), uninterrupted, "cpu")
    assert uninterrupted.steps == [1, 3, 4]
    again = MethodRecorder(lambda: made[-1])
    trainer.train(run, open_folder(tmp_path / "b", run), build_tiny_components(), data_for(run), again, "cpu")
    assert all(_same(again.states[s], uninterrupted.states[s]) for s in (1, 3, 4))  # deterministic
    assert not _same(uninterrupted.states[1], uninterrupted.states[4])

    folder = open_folder(tmp_path / "killed", run)
    first = MethodRecorder(lambda: made[-1], folder)
    real_advance = trainer.advance
    monkeypatch.setattr(trainer, "advance", lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s.step == 2
                        else real_advance(s))  # killed in step 3, after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        trainer.train(run, folder, build_tiny_components(), data_for(run), first, "cpu", first.pending(run))
    monkeypatch.setattr(trainer, "advance", real_advance)
    assert first.steps == [1] and folder.file("checkpoint", "state.pt").is_file()
    second = MethodRecorder(lambda: made[-1], folder)
    result = trainer.train(run, folder, build_tiny_components(), data_for(run), second, "cpu", second.pending(run))
    assert result.resumed_from_step == 2 and second.steps == [3, 4]
    assert all(_same(second.states[s], uninterrupted.states[s]) for s in (3, 4))
    assert result.trainable_params == sum(v.numel() for v in uninterrupted.states[4].values())


# --------------------------------------------------------------------------------------------------------------
# Exports, loaded with plain diffusers calls

PROMPTS = ["{} dog", "a {} dog on the beach"]
TOLERANCE = 3  # 8-bit pixel levels; the export is fp16 (the snapshot samples fp32 weights)


def _render(pipe, identifier: str) -> np.ndarray:
    prompts = [p.format(identifier) for p in PROMPTS]
    images = render(pipe, prompts, [0, 1], 32, 3, 5.0, torch.device("cpu"))
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def _load_export(method: str, export: Path, base: Path) -> StableDiffusionPipeline:
    """The base model, then the export as diffusers documents loading each kind."""
    if method == "dreambooth":
        pipe = StableDiffusionPipeline.from_pretrained(str(export), torch_dtype=torch.float32)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(base))
    if method == "lora":
        pipe.load_lora_weights(str(export))
    elif method == "custom_diffusion":
        pipe.unet.load_attn_procs(str(export), weight_name=WEIGHTS_FILE, _pipeline=pipe)
        pipe.load_textual_inversion(str(export), weight_name=EMBEDDING_FILE)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize(("method", "settings"), [
    ("dreambooth", None), ("lora", None), ("lora", LoRASettings(rank=2, alpha=8.0, train_text_encoder=True)),
    ("custom_diffusion", None), ("custom_diffusion", CustomDiffusionSettings(freeze_model="crossattn"))])
def test_an_export_loads_with_plain_diffusers_and_draws_the_snapshots_images(tmp_path, method, settings):
    base = tmp_path / "base"
    make_pipeline(build_tiny_components(), "ddim").save_pretrained(str(base))
    run = make_run(tmp_path, method, (3,), settings=settings, learning_rate=2e-2, save="final")
    seen = {}

    def on_snapshot(step, unet, components):
        seen["images"] = _render(make_pipeline(components, "ddim"), run.subject.identifier)

    folder = open_folder(tmp_path, run)
    result = trainer.train(run, folder, build_tiny_components(), data_for(run), on_snapshot, "cpu")
    export = Path(result.pipeline_dir)
    assert result.artifact_bytes == sum(f.stat().st_size for f in export.rglob("*") if f.is_file())
    untrained = _render(StableDiffusionPipeline.from_pretrained(str(base)), "sks")
    loaded = _render(_load_export(method, export, base), run.subject.identifier)
    difference = np.abs(loaded - seen["images"])
    assert difference.max() <= TOLERANCE, difference.max()
    assert np.abs(untrained - seen["images"]).max() > 3 * TOLERANCE  # training did change the images


def test_an_unsaved_run_reports_the_fp16_size_of_what_its_export_would_hold(tmp_path):
    run = make_run(tmp_path, "lora", (1,))
    result = trainer.train(run, open_folder(tmp_path, run), build_tiny_components(), data_for(run), Recorder(),
                           "cpu")
    assert result.pipeline_dir is None and result.artifact_bytes == 2 * result.trainable_params > 0
