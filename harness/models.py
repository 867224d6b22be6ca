"""Model components: loading Stable Diffusion from a hub id or a local diffusers folder, and a tiny offline twin.

`load_components(ModelSpec)` returns the UNet, VAE, text encoder, tokenizer and scheduler config of a model.
`model.id: tiny` builds an SD-architecture model from configs with random weights (offline, seconds on a CPU);
it makes every code path run and says nothing about image quality. `model.id: toyworld` loads the small pretrained
model of the toy world (harness/toyworld). Samplers and the inference pipeline are built
here from the model's scheduler config, so every caller uses the same names ("pndm", "dpmsolver++", ...).

What this module does not hold: training, sampling loops, caching of latents or embeddings, image files.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from packaging import version
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from harness.config import DEFAULT_MODEL, MOVED_MODEL_IDS, ModelSpec

TINY_TEXT_HIDDEN = 32
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}


class ModelUnavailableError(RuntimeError):
    """The model's files could not be loaded (no network, no such repo or revision, an incomplete folder)."""


@dataclass
class Components:
    """The parts of a Stable Diffusion model that training and sampling use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    identity: str

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a protocol's dtype or mixed-precision name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}.") from None


# --------------------------------------------------------------------------------------------------------------
# Loading a real model


def load_components(model: ModelSpec, dtype: torch.dtype | None = None) -> Components:
    """The model's components; `tiny` builds the offline test model, `toyworld` loads the shipped toy model.

    Raises ModelUnavailableError when a hub or folder model is unreachable. The tiny and toy models stay in float32
    unless `dtype` is given: half precision on a CPU is slow or unsupported.
    """
    if model.is_toyworld:
        from harness.toyworld.models import load_toyworld_components

        return load_toyworld_components(dtype)
    if model.is_tiny:
        tiny = build_tiny_components()
        if dtype is not None:
            for module in (tiny.unet, tiny.vae, tiny.text_encoder):
                module.to(dtype=dtype)
        return tiny
    dtype = dtype or torch_dtype(model.dtype)
    source = dict(pretrained_model_name_or_path=model.id, revision=model.revision)
    try:
        # The scheduler config is the smallest file: an unreachable model fails here before any large download.
        scheduler_config = dict(DDPMScheduler.load_config(subfolder="scheduler", **source))
        tokenizer = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **source)
        text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", **source, **_transformers_dtype(dtype))
        vae = AutoencoderKL.from_pretrained(subfolder="vae", torch_dtype=dtype, **source)
        unet = UNet2DConditionModel.from_pretrained(subfolder="unet", torch_dtype=dtype, **source)
    except (OSError, ValueError) as error:  # hub, HTTP, validation and missing-file errors all derive from these
        raise ModelUnavailableError(unavailable_message(model, error)) from error
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler_config=scheduler_config, identity=f"{model.id}@{model.revision or 'main'}")


def _transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56 and warns about the old name since.
    if version.parse(transformers.__version__) >= version.parse("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def unavailable_message(model: ModelSpec, error: BaseException) -> str:
    """What went wrong loading `model` and the two ways out."""
    revision = f" at revision {model.revision!r}" if model.revision else ""
    lines = [f"Could not load the model {model.id!r}{revision}: {_diagnose(model, error)}"]
    if model.id in MOVED_MODEL_IDS:
        lines.append(f"The id {model.id!r} was removed from the Hugging Face hub in 2024; its weights now live at "
                     f"{MOVED_MODEL_IDS[model.id]!r}. Write that id in model.id.")
    lines += [
        "Ways out:",
        "  1. Connect to the network so the model hub can be reached (if the model is gated, accept its licence on "
        "its hub page and run `huggingface-cli login`).",
        "  2. Point model.id at a local diffusers folder (one with model_index.json, written by "
        f"pipeline.save_pretrained), for example a saved copy of {DEFAULT_MODEL!r}; or use `model.id: tiny` for "
        "the offline test model (random weights: it runs every code path but says nothing about image quality).",
    ]
    return "\n".join(lines)


def _diagnose(model: ModelSpec, error: BaseException) -> str:
    """A short reason. diffusers rewraps hub errors into an OSError whose text hides the cause, so read the chain."""
    folder = Path(model.id).expanduser()
    if folder.is_absolute() or model.id.startswith((".", "~")) or model.id.count("/") != 1:
        if not folder.is_dir():
            return f"the folder {str(folder)!r} does not exist."
        if not (folder / "model_index.json").is_file():
            return f"the folder {str(folder)!r} has no model_index.json, so it is not a diffusers pipeline."
        return _short_text(error)
    causes = {cls.__name__ for link in _exception_chain(error) for cls in type(link).__mro__}
    if "OfflineModeIsEnabled" in causes:
        return "offline mode is on (HF_HUB_OFFLINE=1) and the model is not in the local cache."
    if "RevisionNotFoundError" in causes:
        return f"the repository has no revision {model.revision!r}."
    if "GatedRepoError" in causes:
        return "the model is gated and this machine is not logged in to the hub with access to it."
    if "RepositoryNotFoundError" in causes:
        return "the hub has no such repository (or it is private)."
    if causes & {"LocalEntryNotFoundError", "ConnectionError", "Timeout", "ConnectTimeout", "ConnectError"}:
        return "the hub could not be reached and the model is not in the local cache."
    return _short_text(error)


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _short_text(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# The tiny offline model


def build_tiny_components(seed: int = 0) -> Components:
    """An SD-architecture model with random weights, the same for the same seed; the global RNG is left untouched.

    The VAE downsamples by 8 like SD's and the UNet halves once more, so any resolution that is a multiple of 16
    works.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder()
    for module in (unet, vae, text_encoder):
        module.eval()
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
                      scheduler_config=sd15_scheduler_config(), identity=f"tiny-random-seed{seed}")


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_text_encoder() -> CLIPTextModel:
    tokenizer = build_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def sd15_scheduler_config() -> dict[str, Any]:
    """The noise schedule of Stable Diffusion 1.x (as in its scheduler/scheduler_config.json)."""
    return {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "skip_prk_steps": True,
    }


# --------------------------------------------------------------------------------------------------------------
# The CLIP tokenizer, derived from open_clip's bundled BPE merges


def build_clip_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """Stable Diffusion's CLIP tokenizer (49408 tokens, 77 positions) without a download.

    The files are written into `folder`; with None they go to a temporary folder that is removed once the
    tokenizer is loaded (it keeps everything in memory), and the tokenizer is built once per process.
    """
    if folder is None:
        return _default_clip_tokenizer()
    folder = Path(folder)
    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


@functools.lru_cache(maxsize=1)
def _default_clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as folder:
        return build_clip_tokenizer(Path(folder))


def write_clip_tokenizer_files(folder: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of the CLIP tokenizer, derived from open_clip's merges."""
    merges = _open_clip_merges()
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"the CLIP vocabulary derived from open_clip has {len(vocab)} tokens, "
                           f"expected {CLIP_VOCAB_SIZE}; is open_clip_torch installed intact?")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": CLIP_MAX_LENGTH, "bos_token": CLIP_BOS, "eos_token": CLIP_EOS,
              "unk_token": CLIP_EOS, "pad_token": CLIP_EOS, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _open_clip_merges() -> list[str]:
    import open_clip.tokenizer  # imported here: open_clip pulls in timm and more, only needed for this file

    with gzip.open(open_clip.tokenizer.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    # The first line is a header; CLIP uses the first 48894 merges (49152 - 256 byte tokens - 2 special tokens).
    return lines[1 : 49152 - 256 - 2 + 1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (the first 256 vocabulary entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


# --------------------------------------------------------------------------------------------------------------
# Schedulers, pipelines, prompts

SCHEDULERS: dict[str, Callable[[dict], Any]] = {
    "ddpm": lambda config: DDPMScheduler.from_config(config),
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
}


def make_scheduler(scheduler_config: dict, name: str):
    """A fresh scheduler of kind `name` ("ddpm" for training, a sampler name otherwise) on the model's schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; valid names are {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[name](dict(scheduler_config))


def make_pipeline(components: Components, sampler: str) -> StableDiffusionPipeline:
    """An inference pipeline over the components (shared, not copied), without a safety checker."""
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=make_scheduler(components.scheduler_config, sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encode_prompts(components: Components, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The text encoder's last hidden states of the prompts: (len(prompts), max length, hidden)."""
    tokens = components.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return components.text_encoder(tokens.input_ids.to(device))[0]
