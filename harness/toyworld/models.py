"""The toy world's models: their architectures, the word-level tokenizer, and loading the shipped weights.

- The text-to-image model has Stable Diffusion's architecture at toy size: an AutoencoderKL (trained on the open
  world, so it encodes any look) that turns 64x64 images into 16x16x4 latents, a UNet2DConditionModel, a
  CLIPTextModel over the world's vocabulary, and SD 1.x's noise schedule. The harness's trainer, sampler and
  pipelines run on it unchanged (`model.id: toyworld`).
- The evaluation backbones (`eval.backbones: toyworld`): an OpenCLIP-architecture dual encoder trained
  contrastively on (image, caption) pairs (the CLIP role), a timm ViT trained to recognise the same object
  across re-renders in other settings, places and sizes (the DINO role: object identity, not captions), and a
  perceptual distance of LPIPS's form over the toy VAE encoder's feature maps (the LPIPS role; see `toy_lpips`).

The weights live in `weights/` beside this file with `manifest.json`: the sha256 of every file, the training
configuration and the command that made them. Loading verifies the checksums first.

What this module does not hold: rendering (world.py) or training (pretrain.py).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.backbones import BackboneSet
from harness.store import file_digest, text_digest
from harness.toyworld.world import IMAGE_SIZE, vocabulary

if TYPE_CHECKING:
    import torch

    from harness.embedders import ClipEmbedder, DinoEmbedder
    from harness.models import Components
    from harness.perceptual import LpipsNetwork

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
PIPELINE_SUBDIR = "pipeline"
CLIP_FILE = "clip.safetensors"
DINO_FILE = "dino.safetensors"
REGENERATE = "python -m harness.toyworld.pretrain --device cuda"

MAX_TOKENS = 16
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<start>", "<end>"
TEXT_HIDDEN = 128
BACKBONE_MEAN = (0.5, 0.5, 0.5)
BACKBONE_STD = (0.5, 0.5, 0.5)
BACKBONE_PREPROCESSING = f"resize to {IMAGE_SIZE}x{IMAGE_SIZE} (bicubic), mean/std 0.5"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 64, 64),  # three levels: 64x64 pixels -> 16x16 latents
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 4 * TEXT_HIDDEN,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
}
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 160, "layers": 4, "head_width": 40},
    "text_cfg": {"context_length": MAX_TOKENS, "width": 128, "heads": 4, "layers": 3},  # vocab_size added below
}
DINO_CONFIG: dict[str, Any] = {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 160, "depth": 4, "num_heads": 4}


SCOPE_NOTE = ("toy world: the base model and the metric backbones are small models pretrained on the toy world's "
              "renders (harness/toyworld), so the numbers measure what happens in that world; they are not "
              "comparable with numbers measured on photographs with Stable Diffusion, CLIP and DINO")


class ToyWorldWeightsError(RuntimeError):
    """The shipped toy-world weights are missing, altered, or do not match the code."""


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def token_list() -> list[str]:
    """Token ids in order: padding first, the end token last (OpenCLIP pools the text at the highest id)."""
    return [PAD, UNK, BOS, *vocabulary(), EOS]


@functools.lru_cache(maxsize=1)
def world_tokenizer():
    """A word-level tokenizer over the world's vocabulary: "<start> a sks box <end> <pad> ...", 16 positions.

    Words outside the vocabulary become <unk>, so a prompt the world cannot express is visible in its token ids.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate(token_list())}
    tokenizer = Tokenizer(WordLevel(ids, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=MAX_TOKENS)


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """(len(texts), MAX_TOKENS) token ids, padded and truncated, the same as `world_tokenizer()` gives.

    A direct lookup: the world's words need no tokenizer machinery, and calling one per training step costs
    more than the step itself.
    """
    import torch

    ids = _token_ids()
    rows = np.full((len(texts), MAX_TOKENS), ids[PAD], dtype=np.int64)
    for row, text in enumerate(texts):
        words = [ids.get(w, ids[UNK]) for w in _words(text)][: MAX_TOKENS - 2]
        tokens = [ids[BOS], *words, ids[EOS]]
        rows[row, : len(tokens)] = tokens
    return torch.from_numpy(rows)


def _words(text: str) -> list[str]:
    """Lower-case words and punctuation runs, split as the tokenizer's Whitespace pre-tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]+", text.lower())


@functools.lru_cache(maxsize=1)
def _token_ids() -> dict[str, int]:
    return {token: i for i, token in enumerate(token_list())}


def unknown_words(text: str) -> list[str]:
    """Words of `text` that the world's vocabulary does not have."""
    known = set(vocabulary())
    return [word for word in _words(text) if word not in known]


# --------------------------------------------------------------------------------------------------------------
# Architectures (random weights; pretrain.py trains them)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def text_encoder_config():
    from transformers import CLIPTextConfig

    tokenizer = world_tokenizer()
    return CLIPTextConfig(vocab_size=len(token_list()), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **TEXT_ENCODER_CONFIG)


def build_text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel(text_encoder_config())


def clip_config() -> dict[str, Any]:
    config = json.loads(json.dumps(CLIP_CONFIG))
    config["text_cfg"]["vocab_size"] = len(token_list())
    return config


def build_clip():
    import open_clip

    return open_clip.CLIP(**clip_config())


def build_dino():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, global_pool="token", **DINO_CONFIG)


def backbone_transform():
    """Preprocessing of both toy backbones: the images are already 64x64, others are resized."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(BACKBONE_MEAN, BACKBONE_STD),
    ])


# --------------------------------------------------------------------------------------------------------------
# Shipped weights


def read_manifest(folder: Path = WEIGHTS_DIR) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ToyWorldWeightsError(f"{path} is missing, so the toy-world weights cannot be checked or loaded. "
                                   f"Restore it from the repository (git checkout -- {path}) or make new weights "
                                   f"with `{REGENERATE}`.")
    return json.loads(path.read_text(encoding="utf-8"))


def weights_revision(folder: Path = WEIGHTS_DIR) -> str:
    """A short digest of the shipped weights (the manifest's checksums): part of every run's identity."""
    files = read_manifest(folder)["files"]
    return text_digest(json.dumps(files, sort_keys=True), 12)


@functools.lru_cache(maxsize=4)
def verify_weights(folder: Path = WEIGHTS_DIR) -> str:
    """Checks every file against the manifest's sha256 and the vocabulary; returns the weights' revision."""
    manifest = read_manifest(folder)
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (actual := file_digest(path)) != expected:
            problems.append(f"{path} has sha256 {actual[:16]}..., the manifest says {expected[:16]}...")
    if manifest.get("vocabulary") != token_list():
        problems.append("the vocabulary in the manifest differs from harness/toyworld/world.py's")
    if problems:
        raise ToyWorldWeightsError(
            "the toy-world weights do not match their manifest (" + folder.as_posix() + "/" + MANIFEST + "):\n  "
            + "\n  ".join(problems) + f"\nRestore the files from the repository (git checkout -- {folder}) or "
            f"retrain them all with `{REGENERATE}` (a few minutes on a GPU; it rewrites the manifest).")
    return weights_revision(folder)


def load_toyworld_components(dtype: torch.dtype | None = None, folder: Path = WEIGHTS_DIR) -> Components:
    """The pretrained toy text-to-image model, after checking its files; float32 unless `dtype` is given."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from harness.models import Components

    revision = verify_weights(folder)
    pipeline = folder / PIPELINE_SUBDIR
    dtype = dtype or torch.float32
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder").to(dtype)
    scheduler_config = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    for module in (unet, vae, text_encoder):
        module.eval()
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=world_tokenizer(),
                      scheduler_config=scheduler_config, identity=f"toyworld@{revision}")


def _load_state(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))
    return module.float().eval()


BACKBONE_SOURCE = "toy world (pretrained by harness.toyworld.pretrain)"


def toy_clip(device: str | torch.device = "cpu", batch_size: int = 32, folder: Path = WEIGHTS_DIR) -> ClipEmbedder:
    """The toy CLIP: image and caption embeddings in one space, trained on the open world."""
    from harness.embedders import ClipEmbedder

    revision = verify_weights(folder)
    model = _load_state(build_clip(), folder / CLIP_FILE)
    vision, text = CLIP_CONFIG["vision_cfg"], CLIP_CONFIG["text_cfg"]
    return ClipEmbedder(
        model, backbone_transform(), tokenize, tag=f"toyworld:clip@{revision}",
        model_id=(f"toy OpenCLIP (embed_dim {CLIP_CONFIG['embed_dim']}; vision {vision['layers']} layers x "
                  f"{vision['width']}, patch {vision['patch_size']}; text {text['layers']} layers x {text['width']})"),
        source=BACKBONE_SOURCE, preprocessing=BACKBONE_PREPROCESSING, device=device, batch_size=batch_size,
    )


def toy_dino(device: str | torch.device = "cpu", batch_size: int = 32, folder: Path = WEIGHTS_DIR) -> DinoEmbedder:
    """The toy DINO-role encoder: the CLS token of a ViT trained to match re-renders of the same object."""
    from harness.embedders import DinoEmbedder

    revision = verify_weights(folder)
    model = _load_state(build_dino(), folder / DINO_FILE)
    return DinoEmbedder(
        model, backbone_transform(), tag=f"toyworld:dino@{revision}",
        model_id=(f"toy timm ViT ({DINO_CONFIG['depth']} blocks x {DINO_CONFIG['embed_dim']}, patch "
                  f"{DINO_CONFIG['patch_size']}), object-identity contrastive"),
        source=BACKBONE_SOURCE, preprocessing=BACKBONE_PREPROCESSING, device=device, batch_size=batch_size,
    )


LPIPS_MIN_SIDE = 8  # the encoder halves the image twice
LPIPS_SOURCE = ("toy world: the encoder of the toy VAE (pretrained by harness.toyworld.pretrain); uniform layer "
                "weights")


def toy_lpips(device: str | torch.device = "cpu", batch_size: int = 32, net: str = "alex",
              folder: Path = WEIGHTS_DIR) -> LpipsNetwork:
    """The toy world's perceptual distance: LPIPS's form over the feature maps of the toy VAE's encoder.

    The maps are those after the encoder's input convolution, each of its down blocks and its middle block (64, 32
    and 16 px for a 64 px image). The encoder was trained to reconstruct renders of the open world, so it sees
    every colour, pattern, place and size. The toy world has no human similarity judgments to learn LPIPS's linear
    layers from, so every channel weighs the same: the LPIPS paper's baseline without learned weights. It is the
    toy world's only LPIPS network, so `net` must stay at its default ("alex", which names the real network).
    """
    import torch
    from diffusers import AutoencoderKL

    from harness.perceptual import UNIT_RANGE, LpipsNetwork

    if net != "alex":
        raise ValueError(f"the toy world has one LPIPS network (the toy VAE encoder's features); it cannot use "
                         f"{net!r}. Remove eval.lpips_net from the protocol.")
    revision = verify_weights(folder)
    encoder = AutoencoderKL.from_pretrained(folder / PIPELINE_SUBDIR / "vae", torch_dtype=torch.float32).encoder
    stages = torch.nn.ModuleList([encoder.conv_in, *encoder.down_blocks, encoder.mid_block])
    return LpipsNetwork(
        stages, None, tag=f"toyworld:lpips-vae@{revision}", source=LPIPS_SOURCE, normalisation=UNIT_RANGE,
        model_id=f"toy VAE encoder feature maps ({len(stages)} depths), uniform channel weights",
        layer_weights="uniform: each depth's squared differences summed over channels (no learned weights)",
        min_side=LPIPS_MIN_SIDE, device=device, batch_size=batch_size,
    )


TOY_BACKBONES = BackboneSet({"clip": toy_clip, "dino": toy_dino, "lpips": toy_lpips},
                            scope_note=SCOPE_NOTE, lpips_nets=("alex",), lpips_min_side={"alex": LPIPS_MIN_SIDE},
                            description="the toy world's CLIP, DINO-role encoder and VAE-feature LPIPS")
