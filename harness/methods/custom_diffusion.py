"""Custom Diffusion (Kumari et al., CVPR 2023): the cross-attention key and value projections and one new token.

What trains:
- with `freeze_model: crossattn_kv` (the paper's default) a copy of every cross-attention layer's key and value
  projection (`to_k`, `to_v` of each `attn2`); with `crossattn` also its query and output projection. The copies live
  in diffusers' own `CustomDiffusionAttnProcessor2_0` (which, as the official code, lets no gradient through the
  start token's key and value); the base model's layers stay untouched and unused where a copy replaces them;
- the embedding of a new modifier token (`<new1>` by default), initialised from a rare token's embedding: by
  default the subject's identifier (`sks`), so that at step 0 the model is exactly the base model the reference row
  samples. (The diffusers example's default `ktn` is two tokens in Stable Diffusion's tokenizer.) The trained row is
  a parameter of its own, substituted into the embedding lookup's output wherever the token occurs, so every other
  row of the embedding stays bit-identical by construction (and the optimizer holds one row, not 49408). `release`
  writes it into the embedding.

The modifier token is the subject's token in every prompt of the run (training and evaluation): the grid gives the
run a subject whose identifier is the modifier token (`bind_subject`), so CLIP-T strips it like any identifier. The
instance prompt then runs through the text encoder in every step (`encodes_in_step`): its cached embedding would be
stale. The class prompt has no modifier token and comes from the cache.

Regularisation is the harness's prior preservation: the paper's real class photos are `class_images: {source:
folder}`. Not implemented: the official code's random crop/zoom augmentation with its loss mask and "far away" /
"close up" prompt words (see README, "Methods").

The export is what diffusers' Custom Diffusion example writes: the attention weights by `unet.save_attn_procs`
(`pytorch_custom_diffusion_weights.bin`) and the token embedding in diffusers' textual-inversion format
(`learned_embeds.safetensors`, {token: vector}), both fp16. Plain diffusers loads them with
`pipe.unet.load_attn_procs(folder, weight_name=WEIGHTS_FILE, _pipeline=pipe)` and `pipe.load_textual_inversion(folder)`
(diffusers applies loaded attention processors only when `_pipeline` is given: huggingface/diffusers#9320).

What this module does not hold: the loop, the optimizers or the loss (harness/trainer, harness/losses).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from harness.config.schema import SubjectSpec, TrainSpec
from harness.methods import Method
from harness.methods.dreambooth import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    frozen_dtype,
    keep_frozen_in,
    staged_folder,
)

if TYPE_CHECKING:
    import torch

    from harness.models import Components

EXPORT_DIR = "custom_diffusion"
WEIGHTS_FILE = "pytorch_custom_diffusion_weights.bin"  # the name diffusers' example and documentation use
EMBEDDING_FILE = "learned_embeds.safetensors"  # load_textual_inversion's default file name
BASE_LEARNING_RATE = 1e-5  # the paper's, per image of a batch


@dataclass(frozen=True)
class CustomDiffusionSettings:
    modifier_token: str = "<new1>"
    initializer_token: str | None = None  # None: the subject's identifier (a rare single token, e.g. sks)
    freeze_model: Literal["crossattn_kv", "crossattn"] = "crossattn_kv"


class CustomDiffusion(Method):
    name = "custom_diffusion"
    settings_type = CustomDiffusionSettings

    @classmethod
    def preferred_train(cls, train: TrainSpec) -> dict[str, Any]:
        """The paper's rate, 1e-5 per image: scaled by the batch and doubled with prior preservation (the official
        code's and diffusers' `--scale_lr`), since a step then sees class images too."""
        images = train.batch_size * (2 if train.uses_prior else 1)
        return {"learning_rate": BASE_LEARNING_RATE * images}

    @classmethod
    def bind_subject(cls, settings: CustomDiffusionSettings, subject: SubjectSpec
                     ) -> tuple[CustomDiffusionSettings, SubjectSpec]:
        """The modifier token names the subject; it starts from the subject's identifier unless told otherwise."""
        if settings.initializer_token is None:
            settings = replace(settings, initializer_token=subject.identifier)
        return settings, replace(subject, identifier=settings.modifier_token)

    @classmethod
    def vocabulary_words(cls, settings: CustomDiffusionSettings) -> list[tuple[str, str]]:
        return [] if settings.initializer_token is None else [("initializer_token", settings.initializer_token)]

    @classmethod
    def check(cls, settings: CustomDiffusionSettings, train: TrainSpec) -> list[tuple[str, str]]:
        problems = []
        for key in ("modifier_token", "initializer_token"):
            value = getattr(settings, key)
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                problems.append((key, f"{value!r} must be one word without spaces, e.g. "
                                      f"{'<new1>' if key == 'modifier_token' else 'sks'!r}."))
        if settings.modifier_token == settings.initializer_token:
            problems.append(("modifier_token", "equals initializer_token; the modifier token must be a new token "
                                               "(e.g. '<new1>'), initialised from an existing rare one."))
        return problems

    def __init__(self, settings: CustomDiffusionSettings, train: TrainSpec):
        super().__init__(settings, train)
        self.token_row: torch.nn.Parameter | None = None
        self.token_id: int | None = None
        self._hook: Any = None

    # ---- training

    def prepare(self, components: Components, device: torch.device) -> list[torch.nn.Parameter]:
        components.vae.requires_grad_(False).eval()
        dtype = frozen_dtype(self.train, device)
        for module in (components.unet, components.text_encoder):
            module.requires_grad_(False)
            keep_frozen_in(module, dtype)
            module.to(device)
        row = self._add_modifier_token(components, device)
        attention = self._add_attention_copies(components.unet, device)
        components.unet.train()
        components.text_encoder.eval()  # frozen; only the token's row trains
        if self.train.gradient_checkpointing:
            enable_gradient_checkpointing(components.unet)
        return [*attention, row]

    def _add_modifier_token(self, components: Components, device: torch.device) -> torch.nn.Parameter:
        """A new token in a copy of the tokenizer (the base one may be shared) and its trainable embedding row."""
        import torch

        tokenizer = copy.deepcopy(components.tokenizer)
        modifier, initializer = self.settings.modifier_token, self.settings.initializer_token
        if tokenizer.add_tokens(modifier) == 0:
            raise ValueError(f"custom_diffusion.modifier_token: {modifier!r} is already a token of the model's "
                             "tokenizer; choose a new one, such as '<new1>'.")
        initial = tokenizer.encode(initializer, add_special_tokens=False)
        if len(initial) != 1 or initial[0] == tokenizer.unk_token_id:
            raise ValueError(f"custom_diffusion.initializer_token: {initializer!r} is not one token of the model's "
                             f"tokenizer (it encodes to {initial}); choose a rare word the tokenizer keeps whole, "
                             "such as 'sks' for Stable Diffusion.")
        text_encoder = components.text_encoder
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = text_encoder.get_input_embeddings()
        self.token_id = tokenizer.convert_tokens_to_ids(modifier)
        with torch.no_grad():
            embedding.weight[self.token_id] = embedding.weight[initial[0]]
        self.token_row = torch.nn.Parameter(embedding.weight[initial[0]].detach().to(device, torch.float32).clone())
        self._hook = embedding.register_forward_hook(self._substitute_row)
        components.tokenizer = tokenizer
        return self.token_row

    def _substitute_row(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        import torch

        where = (args[0] == self.token_id).unsqueeze(-1)
        return torch.where(where, self.token_row.to(output.dtype), output)

    def _add_attention_copies(self, unet: torch.nn.Module, device: torch.device) -> list[torch.nn.Parameter]:
        """diffusers' Custom Diffusion processors: trainable copies in every cross-attention layer, plain attention
        (the same computation as the default processor) in the self-attention ones."""
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        train_q_out = self.settings.freeze_model == "crossattn"
        processors = {}
        for name in unet.attn_processors:
            attention = unet.get_submodule(name.removesuffix(".processor"))
            if not name.endswith("attn2.processor"):
                processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
                continue
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=train_q_out, hidden_size=attention.to_k.out_features,
                cross_attention_dim=attention.to_k.in_features, out_bias=attention.to_out[0].bias is not None)
            processor.load_state_dict(_copies_of(attention, train_q_out))
            processors[name] = processor.to(device)
        params = [p for processor in processors.values() for p in processor.parameters()]
        unet.set_attn_processor(processors)  # (it empties the dict)
        return params

    def trained_modules(self, components: Components) -> list[torch.nn.Module]:
        return [components.unet]

    def frozen_modules(self, components: Components) -> list[torch.nn.Module]:
        return [components.vae]  # the text encoder encodes the instance prompt in every step: it stays

    def encodes_in_step(self, prompt_kind: str) -> bool:
        return prompt_kind == "instance"

    def state_dict(self, components: Components) -> dict[str, Any]:
        return {"attention": {k: v.detach().clone() for k, v in _processor_state(components.unet).items()},
                "token_row": self.token_row.detach().clone()}

    def load_state_dict(self, components: Components, state: dict[str, Any]) -> None:
        import torch

        if set(state["attention"]) != set(_processor_state(components.unet)):
            raise RuntimeError("the checkpoint's attention weights do not match this run's layers; delete the "
                               "checkpoint folder to train again.")
        components.unet.load_state_dict(state["attention"], strict=False)
        with torch.no_grad():
            self.token_row.copy_(state["token_row"])

    def release(self, components: Components) -> None:
        """Writes the trained row into the embedding (the text encoder is then a plain one with the new token)."""
        import torch

        super().release(components)
        if self.train.gradient_checkpointing:
            disable_gradient_checkpointing(components.unet)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            embedding = components.text_encoder.get_input_embeddings()
            with torch.no_grad():
                embedding.weight[self.token_id] = self.token_row.to(embedding.weight.dtype)
            self.token_row.requires_grad_(False)

    # ---- export

    def export(self, components: Components, folder: Path) -> Path:
        import torch
        from safetensors.torch import save_file

        trained = [p for p in components.unet.attn_processors.values() if list(p.parameters())]
        with staged_folder(folder / EXPORT_DIR) as staging:
            dtypes = [next(p.parameters()).dtype for p in trained]
            try:
                for processor in trained:
                    processor.to(torch.float16)
                components.unet.save_attn_procs(str(staging), weight_name=WEIGHTS_FILE, safe_serialization=False)
            finally:
                for processor, dtype in zip(trained, dtypes, strict=True):
                    processor.to(dtype)
            row = self.token_row.detach().to(torch.float16).cpu().contiguous()
            save_file({self.settings.modifier_token: row}, str(staging / EMBEDDING_FILE))
        return folder / EXPORT_DIR


def _copies_of(attention: torch.nn.Module, train_q_out: bool) -> dict[str, torch.Tensor]:
    """The processor's starting weights: float32 copies of the layer's own projections."""
    import torch

    def copy_of(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().to(torch.float32).clone()

    weights = {"to_k_custom_diffusion.weight": copy_of(attention.to_k.weight),
               "to_v_custom_diffusion.weight": copy_of(attention.to_v.weight)}
    if train_q_out:
        weights["to_q_custom_diffusion.weight"] = copy_of(attention.to_q.weight)
        weights["to_out_custom_diffusion.0.weight"] = copy_of(attention.to_out[0].weight)
        if attention.to_out[0].bias is not None:
            weights["to_out_custom_diffusion.0.bias"] = copy_of(attention.to_out[0].bias)
    return weights


def _processor_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unet.state_dict().items() if "_custom_diffusion." in k}
