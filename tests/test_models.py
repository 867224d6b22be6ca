"""The tiny offline model, the CLIP tokenizer, schedulers, pipelines and the real loading path (offline)."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from diffusers import DDPMScheduler

from harness.backends import ModelUnavailableError, load_components
from harness.backends.tiny import build_clip_tokenizer, build_tiny_components
from harness.config import ModelSpec
from harness.models import Components, encode_prompts, make_pipeline, make_scheduler, stepped_on_host

PROMPTS = ["a photo of a sks dog", "A DOG's photo, on the beach!! 123", "a sks backpack in the jungle"]


@pytest.fixture(scope="module")
def tiny() -> Components:
    return build_tiny_components()


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; set both so no test can reach for the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def generate(components: Components, seed: int, height: int, width: int, sampler: str = "dpmsolver++") -> np.ndarray:
    pipeline = make_pipeline(components, sampler)
    generator = torch.Generator().manual_seed(seed)
    return pipeline(PROMPTS[0], height=height, width=width, num_inference_steps=2, generator=generator,
                    output_type="np").images


@pytest.mark.parametrize("height,width", [(32, 32), (64, 48)])
def test_tiny_pipeline_generates_the_requested_size_deterministically(tiny, height, width):
    first = generate(tiny, 0, height, width)
    assert first.shape == (1, height, width, 3)
    assert np.isfinite(first).all() and first.std() > 0.01
    np.testing.assert_array_equal(first, generate(tiny, 0, height, width))
    assert not np.allclose(first, generate(tiny, 1, height, width))


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "euler", "euler_a"])
def test_every_sampler_runs_in_the_pipeline(tiny, sampler):
    assert generate(tiny, 0, 32, 32, sampler).shape == (1, 32, 32, 3)


def test_tiny_components_are_deterministic_per_seed_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_components(0)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_components(0)
    c = build_tiny_components(1)
    for name in ("unet", "vae", "text_encoder"):
        state_a, state_b, state_c = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name
        assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a if state_a[k].is_floating_point()), name
    assert a.identity == "tiny-random-seed0" and c.identity == "tiny-random-seed1"


def test_tiny_components_have_sd_shapes(tiny):
    assert tiny.vae_scale_factor == 8 and tiny.vae.config.latent_channels == 4
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    assert tiny.text_encoder.config.vocab_size == 49408
    assert tiny.prediction_type == "epsilon"
    assert tiny.scheduler_config["beta_schedule"] == "scaled_linear"
    assert (tiny.scheduler_config["beta_start"], tiny.scheduler_config["beta_end"]) == (0.00085, 0.012)
    latents = tiny.vae.encode(torch.zeros(1, 3, 48, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 6, 4)


def test_prediction_type_comes_from_the_scheduler_config(tiny):
    v = dataclasses.replace(tiny, scheduler_config={**tiny.scheduler_config, "prediction_type": "v_prediction"})
    assert v.prediction_type == "v_prediction"


def test_load_components_tiny(tiny):
    loaded = load_components(ModelSpec(id="tiny"))
    assert loaded.identity == "tiny-random-seed0"
    assert loaded.unet.dtype == torch.float32  # fp16 is the spec's default, but not for a CPU test model
    assert torch.equal(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert load_components(ModelSpec(id="tiny"), dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_clip_tokenizer_matches_open_clip():
    tokenizer = build_clip_tokenizer()
    reference = open_clip.tokenizer.SimpleTokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    assert tokenizer.bos_token_id == 49406
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids == [reference.sot_token_id, *reference.encode(prompt), reference.eot_token_id]
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(reference.encode(prompt)).strip()
    ids = tokenizer("a photo of a sks dog").input_ids
    assert ids == open_clip.tokenize(["a photo of a sks dog"])[0][: len(ids)].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a sks dog"
    assert build_clip_tokenizer() is tokenizer  # cached per process


def test_clip_tokenizer_into_a_folder(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert tokenizer("a sks dog", padding="max_length", max_length=77).input_ids[-1] == 49407


def test_encode_prompts_shape_and_padding(tiny):
    states = encode_prompts(tiny, PROMPTS)
    assert states.shape == (3, 77, 32) and not states.requires_grad
    long_prompt = " ".join(["dog"] * 200)  # truncated to 77 tokens, not an error
    assert encode_prompts(tiny, [long_prompt]).shape == (1, 77, 32)
    torch.testing.assert_close(encode_prompts(tiny, PROMPTS[:1])[0], states[0])


SAMPLERS = ("ddpm", "pndm", "ddim", "dpmsolver++", "euler", "euler_a")


def _denoise(scheduler, steps: int) -> tuple[torch.Tensor, int]:
    """Samples with a stand-in noise predictor; returns the final latent and how many times the model was called."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    # As the pipelines do: only the ancestral samplers take a generator.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    calls = 0
    for t in scheduler.timesteps:
        predicted_noise = 0.5 * scheduler.scale_model_input(sample, t)
        calls += 1
        sample = scheduler.step(predicted_noise, t, sample, **extra).prev_sample
    return sample, calls


def test_every_sampler_keeps_the_models_noise_schedule_and_prediction_type(tiny):
    trained = DDPMScheduler.from_config(tiny.scheduler_config).alphas_cumprod
    v_model = {**tiny.scheduler_config, "prediction_type": "v_prediction"}
    for name in SAMPLERS:
        torch.testing.assert_close(make_scheduler(tiny.scheduler_config, name).alphas_cumprod, trained)
        assert make_scheduler(v_model, name).config.prediction_type == "v_prediction", name


def test_samplers_are_distinct_algorithms_with_the_expected_number_of_model_calls(tiny):
    results = {name: _denoise(make_scheduler(tiny.scheduler_config, name), steps=10) for name in SAMPLERS}
    # PNDM's PLMS start takes one extra model call; every other sampler calls the model once per step.
    assert {name: calls for name, (_, calls) in results.items()} == {name: 10 + (name == "pndm") for name in SAMPLERS}
    for i, first in enumerate(SAMPLERS):
        for second in SAMPLERS[i + 1:]:
            assert not torch.allclose(results[first][0], results[second][0]), (first, second)


def _spied(scheduler, seen: list):
    """`scheduler` with the timesteps its own step() receives recorded in `seen`."""
    step = scheduler.step

    @functools.wraps(step)  # keeps the signature the pipelines inspect for `generator`
    def spy(model_output, timestep, *args, **kwargs):
        seen.append(timestep)
        return step(model_output, timestep, *args, **kwargs)

    scheduler.step = spy
    return scheduler


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_host_timesteps_step_every_sampler_to_the_same_latents_with_plain_numbers(tiny, sampler):
    plain, plain_calls = _denoise(make_scheduler(tiny.scheduler_config, sampler), steps=10)
    seen: list = []
    hosted, calls = _denoise(stepped_on_host(_spied(make_scheduler(tiny.scheduler_config, sampler), seen)), steps=10)
    assert calls == plain_calls
    assert torch.equal(hosted, plain)
    assert seen and all(type(t) in (int, float) for t in seen), {type(t) for t in seen}


@pytest.mark.parametrize("sampler", ["pndm", "ddim"])
def test_host_timesteps_never_read_the_timestep_tensor_the_pipeline_passes(tiny, sampler):
    # A timestep on the meta device has no value: reading it fails, as reading one on a GPU would wait for the GPU.
    scheduler = stepped_on_host(make_scheduler(tiny.scheduler_config, sampler))
    scheduler.set_timesteps(5)
    sample = torch.zeros(1, 4, 8, 8)
    for t in scheduler.timesteps:
        sample = scheduler.step(0.5 * sample + 0.1, t.to("meta"), sample).prev_sample
    assert torch.isfinite(sample).all()
    plain = make_scheduler(tiny.scheduler_config, sampler)
    plain.set_timesteps(5)
    with pytest.raises((NotImplementedError, RuntimeError)):  # the sampler alone reads it
        plain.step(sample, plain.timesteps[0].to("meta"), sample)


def test_host_timesteps_refuse_a_step_out_of_order(tiny):
    scheduler = stepped_on_host(make_scheduler(tiny.scheduler_config, "ddim"))
    scheduler.set_timesteps(5)
    sample = torch.zeros(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match=r"stepped at timestep .* in order"):
        scheduler.step(sample, scheduler.timesteps[1], sample)


def test_pipeline_images_are_the_same_with_host_timesteps(tiny):
    pipeline = make_pipeline(tiny, "pndm")
    hosted = pipeline(PROMPTS[0], height=32, width=32, num_inference_steps=4, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    pipeline.scheduler = make_scheduler(tiny.scheduler_config, "pndm")
    plain = pipeline(PROMPTS[0], height=32, width=32, num_inference_steps=4, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(hosted, plain)


def test_make_scheduler_rejects_unknown_names(tiny):
    with pytest.raises(ValueError) as caught:
        make_scheduler(tiny.scheduler_config, "heun")
    for name in ("'heun'", "ddpm", "pndm", "ddim", "dpmsolver++", "euler", "euler_a"):
        assert name in str(caught.value)


def assert_names_both_ways_out(message: str) -> None:
    assert "Could not load the model" in message
    assert "Connect to the network" in message and "huggingface-cli login" in message
    assert "local diffusers folder" in message and "model.id: tiny" in message


def test_offline_hub_id_names_the_ways_out(offline):
    with pytest.raises(ModelUnavailableError) as caught:
        load_components(ModelSpec(id="someone/some-model", revision="v1"))
    message = str(caught.value)
    assert_names_both_ways_out(message)
    assert "'someone/some-model' at revision 'v1'" in message and "HF_HUB_OFFLINE" in message
    assert "removed" not in message


def test_removed_runwayml_id_names_its_new_home(offline):
    with pytest.raises(ModelUnavailableError) as caught:
        load_components(ModelSpec(id="runwayml/stable-diffusion-v1-5"))
    message = str(caught.value)
    assert_names_both_ways_out(message)
    assert "removed from the Hugging Face hub in 2024" in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message


def test_missing_and_incomplete_local_folders(offline, tmp_path):
    with pytest.raises(ModelUnavailableError) as caught:
        load_components(ModelSpec(id=str(tmp_path / "no-such-model")))
    assert "does not exist" in str(caught.value)
    assert_names_both_ways_out(str(caught.value))
    with pytest.raises(ModelUnavailableError, match=r"no model_index\.json"):
        load_components(ModelSpec(id=str(tmp_path)))


def test_load_components_from_a_local_diffusers_folder(offline, tiny, tmp_path):
    make_pipeline(tiny, "pndm").save_pretrained(tmp_path)
    loaded = load_components(ModelSpec(id=str(tmp_path), dtype="fp32"))
    assert loaded.identity == f"{tmp_path}@main"
    for name in ("unet", "vae", "text_encoder"):
        original, reloaded = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(original[k], reloaded[k]) for k in original), name
    assert loaded.tokenizer(PROMPTS[0]).input_ids == tiny.tokenizer(PROMPTS[0]).input_ids
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear" and loaded.prediction_type == "epsilon"
    half = load_components(ModelSpec(id=str(tmp_path), dtype="fp16"))
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}
    assert load_components(ModelSpec(id=str(tmp_path)), dtype=torch.float32).unet.dtype == torch.float32
