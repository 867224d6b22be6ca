"""The tiny backend (`model.id: tiny`): an SD-architecture model with random weights, built from configs offline.

It makes every code path run in seconds on a CPU and says nothing about image quality. Its CLIP tokenizer is
Stable Diffusion's, derived without a download from the BPE merges open_clip ships.

What this module does not hold: real models (hub.py) or the toy world's pretrained model (harness/toyworld).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from harness.backends import ModelBackend
from harness.backends.clip_vocab import clip_merges, common_word_problem
from harness.config.schema import ModelSpec

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from harness.models import Components

TINY_TEXT_HIDDEN = 32
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


class TinyBackend(ModelBackend):
    random_weights = True
    plan_note = "random weights: pipeline check only, no quality conclusions"

    def identifier_problem(self, model: ModelSpec, identifier: str) -> str | None:
        return common_word_problem(identifier)  # its tokenizer is CLIP's

    def load(self, model: ModelSpec, dtype: torch.dtype | None) -> Components:
        tiny = build_tiny_components()
        if dtype is not None:
            for module in (tiny.unet, tiny.vae, tiny.text_encoder):
                module.to(dtype=dtype)
        return tiny


BACKEND = TinyBackend()


def build_tiny_components(seed: int = 0) -> Components:
    """An SD-architecture model with random weights, the same for the same seed; the global RNG is left untouched.

    The VAE downsamples by 8 like SD's and the UNet halves once more, so any resolution that is a multiple of 16
    works.
    """
    import torch

    from harness.models import Components, sd15_scheduler_config

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
    from diffusers import UNet2DConditionModel

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
    from diffusers import AutoencoderKL

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
    from transformers import CLIPTextConfig, CLIPTextModel

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


# --------------------------------------------------------------------------------------------------------------
# The CLIP tokenizer, derived from open_clip's bundled BPE merges


def build_clip_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """Stable Diffusion's CLIP tokenizer (49408 tokens, 77 positions) without a download.

    The files are written into `folder`; with None they go to a temporary folder that is removed once the
    tokenizer is loaded (it keeps everything in memory), and the tokenizer is built once per process.
    """
    from transformers import CLIPTokenizer

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
    return list(clip_merges())


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
