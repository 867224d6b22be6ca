"""DreamBooth-LoRA: low-rank adapters (peft, as diffusers uses them) on the UNet's attention, optionally on the text
encoder.

The adapters are injected into the run's own base model (peft's `inject_adapter_in_model(LoraConfig(...))`, what
diffusers' `unet.add_adapter` does in the example `train_dreambooth_lora.py`): nothing of the base model is copied,
its weights never receive a gradient and stay bit-identical (on a GPU with mixed precision the frozen weights are
kept in the autocast dtype, as in that example; the adapters always train in float32). A snapshot samples the base
model with its adapters in place. Adapter weights start from a generator seeded by the run's seed, so a run replays
exactly.

Checkpoints hold the adapter weights only. The export is one LoRA file written by diffusers' own
`StableDiffusionPipeline.save_lora_weights` (fp16, with the adapter config as metadata, so any alpha loads right):
`pipe.load_lora_weights(folder)` loads it onto the base model.

What this module does not hold: the loop, the optimizers or the loss (harness/trainer, harness/losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.config.schema import TrainSpec, rule
from harness.methods import Method
from harness.methods.dreambooth import (
    UNetAndOptionalTextEncoder,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    frozen_dtype,
    keep_frozen_in,
    staged_folder,
)

if TYPE_CHECKING:
    import torch

    from harness.models import Components

LORA_DIR = "lora"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the diffusers example's attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoRASettings:
    rank: int = rule(4, min=1, hint="4-64 are usual")
    alpha: float | None = rule(None, gt=0, null="the rank (scale 1)")
    target_modules: tuple[str, ...] = UNET_TARGETS
    dropout: float = rule(0.0, min=0, below=1)
    train_text_encoder: bool = False

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class LoRA(UNetAndOptionalTextEncoder, Method):
    name = "lora"
    settings_type = LoRASettings
    train_defaults: ClassVar[dict[str, float]] = {"learning_rate": 1e-4}  # the diffusers LoRA example's documented rate

    @classmethod
    def check(cls, settings: LoRASettings, train: TrainSpec) -> list[tuple[str, str]]:
        problems = []
        if not settings.target_modules:
            problems.append(("target_modules", f"is empty; name the UNet layers that get adapters, e.g. "
                                               f"{list(UNET_TARGETS)}."))
        if len(set(settings.target_modules)) != len(settings.target_modules):
            problems.append(("target_modules", f"lists a layer twice: {list(settings.target_modules)}."))
        return problems

    # ---- training

    def prepare(self, components: Components, device: torch.device) -> list[torch.nn.Parameter]:
        components.vae.requires_grad_(False).eval()
        modules = [(components.unet, self.settings.target_modules)]
        if self.settings.train_text_encoder:
            modules.append((components.text_encoder, TEXT_ENCODER_TARGETS))
        else:
            components.text_encoder.requires_grad_(False).eval()
        params: list[torch.nn.Parameter] = []
        for index, (module, targets) in enumerate(modules):
            params += self._add_adapter(module, targets, device, index)
        return params

    def _add_adapter(self, module: torch.nn.Module, targets: tuple[str, ...], device: torch.device,
                     index: int) -> list[torch.nn.Parameter]:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        from harness.trainer.randomness import derive_seed

        module.requires_grad_(False)
        config = LoraConfig(r=self.settings.rank, lora_alpha=self.settings.scale_alpha,
                            lora_dropout=self.settings.dropout, init_lora_weights="gaussian",
                            target_modules=list(targets))
        # The adapters' random start is drawn on the CPU from the run's seed, so a run replays exactly.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.train.seed, "lora-init", index))
            try:
                # peft's own injection (what diffusers' add_adapter calls), for the text encoder too: transformers'
                # add_adapter asks for a newer peft than diffusers does.
                inject_adapter_in_model(config, module.to("cpu"))
            except ValueError as error:
                if "not found in the base model" not in str(error):
                    raise
                raise ValueError(_targets_message(module, list(targets))) from error
        _check_targets(module, targets)
        keep_frozen_in(module, frozen_dtype(self.train, device))
        module.to(device).train()
        if self.train.gradient_checkpointing:
            enable_gradient_checkpointing(module)
        return [p for p in module.parameters() if p.requires_grad]

    def state_dict(self, components: Components) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return {"adapters": [{k: v.detach().clone() for k, v in get_peft_model_state_dict(m).items()}
                             for m in self.trained_modules(components)]}

    def load_state_dict(self, components: Components, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        for module, adapters in zip(self.trained_modules(components), state["adapters"], strict=True):
            result = set_peft_model_state_dict(module, adapters)
            if result.unexpected_keys:
                raise RuntimeError(f"the checkpoint holds adapter weights this model does not have: "
                                   f"{result.unexpected_keys[:3]}; delete the checkpoint folder to train again.")

    def release(self, components: Components) -> None:
        super().release(components)
        if self.train.gradient_checkpointing:
            for module in self.trained_modules(components):
                disable_gradient_checkpointing(module)

    # ---- export

    def export(self, components: Components, folder: Path) -> Path:
        from diffusers import StableDiffusionPipeline

        layers = self.lora_layers(components)
        with staged_folder(folder / LORA_DIR) as staging:
            StableDiffusionPipeline.save_lora_weights(str(staging), safe_serialization=True, **layers)
        return folder / LORA_DIR

    def lora_layers(self, components: Components) -> dict[str, Any]:
        """save_lora_weights' arguments: the adapters in fp16 and diffusers' key format, with their configs."""
        import torch
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        names = {id(components.unet): "unet", id(components.text_encoder): "text_encoder"}
        layers: dict[str, Any] = {}
        for module in self.trained_modules(components):
            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
            name = names[id(module)]
            layers[f"{name}_lora_layers"] = {k: v.detach().to(torch.float16).cpu().contiguous()
                                             for k, v in state.items()}
            layers[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        return layers

    def memory_settings(self) -> list[tuple[bool, str]]:
        return [(self.settings.train_text_encoder, "lora.train_text_encoder: false")]


def _check_targets(module: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Every target name must have matched a layer; peft only complains when none did."""
    from peft.tuners.lora import LoraLayer

    adapted = [name for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in adapted)]
    if missing:
        raise ValueError(_targets_message(module, missing))


def _targets_message(module: torch.nn.Module, missing: list[str]) -> str:
    return (f"lora.target_modules: {missing} match no layer of the {type(module).__name__}; name its linear layers "
            f"by the end of their names, e.g. {list(UNET_TARGETS)} (the UNet's attention projections).")
