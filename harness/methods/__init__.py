"""Fine-tuning methods: what one method decides, and the registry of methods.

A method is one class, registered under its name, that says which parameters train, how the text conditioning of
a step is built, what its checkpoints hold, how its result is exported, and which settings it has (a frozen
dataclass, the protocol section of the same name: `dreambooth: {train_text_encoder: true}`). The shared trainer
(harness/trainer) runs the loop, the optimizers, the memory modes and the checkpoints, and asks the method for
the rest. Adding a method is one module with a subclass of `Method` plus one `METHODS.register` line.

This module imports no torch and nothing of the protocol's (the protocol loader validates method names and settings
through it, so `train` below is a config TrainSpec without the import). Method modules import torch inside their
hooks for the same reason.

What this module does not hold: the training loop (harness/trainer) or any method's implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.registry import Registry

if TYPE_CHECKING:
    import torch

    from harness.models import Components


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none."""


class Method:
    """One run's method. Subclasses set the class attributes and override the hooks they need.

    The trainer calls, in order: `prepare` (once, on fresh components), `encodes_in_step` to know which prompts
    run through the text encoder with gradients in every step, `state_dict`/`load_state_dict` for checkpoints,
    `release` at the end, and `export` when the run is saved (`export_elements` when it is not). Before any of
    that, the grid asks the class methods for the run's preferred training values and the subject's token.
    """

    name: ClassVar[str] = ""
    settings_type: ClassVar[type] = NoSettings
    # TrainSpec values the method prefers; they apply to the fields a protocol leaves unset.
    train_defaults: ClassVar[Mapping[str, Any]] = {}
    # Settings that were part of the run identity before they became method settings: always in the identity.
    legacy_identity: ClassVar[frozenset[str]] = frozenset()
    # Why this method's training cannot run compiled (harness/trainer/compiled.py), or None when it can. A method
    # whose modules' structure changes mid-run, or that calls the UNet outside its forward, says so here and trains
    # eager whatever `train.compile` asks.
    compile_problem: ClassVar[str | None] = None

    def __init__(self, settings: Any, train: Any):
        self.settings = settings
        self.train = train

    # ---- what the method brings to a run before it trains (no torch)

    @classmethod
    def preferred_train(cls, train: Any) -> dict[str, Any]:
        """The TrainSpec values the method prefers, given the run's other training values (`train`); they apply to
        the fields the protocol leaves unset. By default `train_defaults`; a method whose preference depends on
        other settings (a learning rate scaled by the batch) computes it here."""
        return dict(cls.train_defaults)

    @classmethod
    def bind_subject(cls, settings: Any, subject: Any) -> tuple[Any, Any]:
        """(the settings, the subject) as a run of this subject uses them: a method may fill a setting from the
        subject, or name the subject with its own token in the run's prompts (training and evaluation) by
        returning the subject with another identifier. By default both are unchanged."""
        return settings, subject

    @classmethod
    def vocabulary_words(cls, settings: Any) -> list[tuple[str, str]]:
        """(setting, word) for each setting whose value must be a word the base model's tokenizer knows, so that
        a backend with a fixed vocabulary refuses an unknown one before anything runs."""
        return []

    # ---- checks (no torch): (settings key, message) pairs

    @classmethod
    def check(cls, settings: Any, train: Any) -> list[tuple[str, str]]:
        """Contradictions between the method's settings and the common training settings."""
        return []

    # ---- training

    def prepare(self, components: Components, device: torch.device) -> list[torch.nn.Parameter]:
        """Makes the trainable parameters (float32, on `device`, with gradients) and returns them; everything
        else stays frozen. Called once per run on freshly loaded components."""
        raise NotImplementedError

    def trained_modules(self, components: Components) -> list[torch.nn.Module]:
        """Modules whose train/eval mode follows training (the UNet, and the text encoder when it trains)."""
        return [components.unet]

    def frozen_modules(self, components: Components) -> list[torch.nn.Module]:
        """Modules kept on the CPU while training: their outputs come from the caches."""
        return [components.vae, components.text_encoder]

    def encodes_in_step(self, prompt_kind: str) -> bool:
        """True when the prompt of `prompt_kind` ("instance" or "class") must run through the text encoder in
        every step (its weights or its token embeddings train); False to use its cached embedding."""
        return False

    def state_dict(self, components: Components) -> dict[str, Any]:
        """What a checkpoint must hold to resume: the trainable state only."""
        raise NotImplementedError

    def load_state_dict(self, components: Components, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def release(self, components: Components) -> None:
        """Ends training: the trained modules in eval mode without gradients, training-only settings undone."""
        for module in self.trained_modules(components):
            module.requires_grad_(False).eval()

    def export(self, components: Components, folder: Path) -> Path:
        """Writes the result where plain diffusers loads it (see the method's docstring); returns the path."""
        raise NotImplementedError

    def export_elements(self, components: Components, trainable: int) -> int:
        """How many numbers the export holds (it is written in fp16, 2 bytes each), for the size of a run that is
        not saved. By default the `trainable` parameter count: an export of the trained weights only."""
        return trainable

    def memory_settings(self) -> list[tuple[bool, str]]:
        """(applies, protocol setting) pairs that would lower this method's memory, for out-of-memory advice."""
        return []

    def describe(self) -> str:
        """The method's settings as 'key=value, ...' for messages."""
        return ", ".join(f"{f.name}={_text(getattr(self.settings, f.name))}"
                         for f in dataclasses.fields(self.settings))


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


METHODS: Registry[type[Method]] = Registry("method", lazy={
    "dreambooth": "harness.methods.dreambooth:DreamBooth",
    "lora": "harness.methods.lora:LoRA",
    "custom_diffusion": "harness.methods.custom_diffusion:CustomDiffusion",
})


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def setting_owners(key: str) -> list[str]:
    """The registered methods that have a setting named `key`."""
    return [name for name, cls in METHODS.items()
            if key in {f.name for f in dataclasses.fields(cls.settings_type)}]


def settings_identity(method: type[Method], settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(legacy fields, other fields) of the settings that belong to the run identity.

    Legacy fields are always included (they were common training fields once, and today's run keys hold them);
    any other field is included only away from its default, so adding a setting never changes an existing key.
    """
    legacy, other = {}, {}
    for f in dataclasses.fields(settings):
        if not f.metadata.get("identity", True):
            continue
        value = getattr(settings, f.name)
        if f.name in method.legacy_identity:
            legacy[f.name] = value
        elif value != f.default:
            other[f.name] = value
    return legacy, other
