"""The toy world as a model backend (`model.id: toyworld`): the shipped pretrained toy text-to-image model.

Resolving fills in the weights' revision (a digest of their manifest, so retrained weights never reuse old runs);
checking the protocol refuses what the toy model cannot do (another resolution than 64, words outside its
vocabulary in a prompt or in a method setting that names a token, DreamBench's prompts) before anything runs.

What this module does not hold: the models and their weights (models.py), the renderer (world.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from harness.backends import ModelBackend, Resolved
from harness.config.schema import ModelSpec, Protocol, SubjectSpec
from harness.methods import METHODS
from harness.toyworld.models import (
    SCOPE_NOTE,
    ToyWorldWeightsError,
    load_toyworld_components,
    unknown_words,
    weights_revision,
)
from harness.toyworld.world import IMAGE_SIZE, RARE_TOKENS, vocabulary

if TYPE_CHECKING:
    import torch

    from harness.models import Components

class ToyWorldBackend(ModelBackend):
    scope_note = SCOPE_NOTE
    plan_note = "pretrained toy model: the numbers are about the toy world"

    def resolve(self, model: ModelSpec, protocol_dir: Path) -> Resolved:
        try:
            revision = weights_revision()
        except ToyWorldWeightsError as error:
            return Resolved(model, problems=[("id", str(error))])
        out = Resolved(replace(model, revision=revision))
        if model.revision is not None and model.revision != revision:
            out.problems.append(("revision", f"{model.revision!r} does not match the shipped toy-world weights "
                                             f"({revision!r}); remove model.revision (it is filled in from the "
                                             "weights' manifest)."))
        return out

    def check_protocol(self, protocol: Protocol) -> list[tuple[tuple, str]]:
        """The toy model draws 64x64 images and knows only its world's words: anything else is an error up front."""
        problems: list[tuple[tuple, str]] = []
        resolutions = dict(protocol.grid).get("resolution", (protocol.train.resolution,))
        if any(r != IMAGE_SIZE for r in resolutions):
            problems.append((("train", "resolution"), f"the toy-world model was trained at {IMAGE_SIZE}x{IMAGE_SIZE};"
                                                      f" set train.resolution: {IMAGE_SIZE}."))
        known = "Its words are: " + " ".join(vocabulary()) + "."

        def check(at: tuple, template: str, subject: SubjectSpec) -> None:
            unknown = unknown_words(subject.fill(template))
            if unknown:
                problems.append((at, f"{template!r} has words the toy world does not know: {', '.join(unknown)}. "
                                     f"{known}"))

        for i, subject in enumerate(protocol.subjects):
            check(("subjects", i, "instance_prompt"), subject.instance_prompt, subject)
            check(("subjects", i, "class_prompt"), subject.class_prompt, subject)
            if subject.eval_prompts is None:
                problems.append((("subjects", i, "eval_prompts"),
                                 "is needed with model.id: toyworld: DreamBench's prompts name things the toy world "
                                 "has never seen. List prompts in its words, e.g. 'a {identifier} {class} on grass'."))
            for j, template in enumerate(subject.eval_prompts or ()):
                check(("subjects", i, "eval_prompts", j), template, subject)
            for j, template in enumerate(protocol.eval.class_prompts):
                check(("eval", "class_prompts", j), template, subject)
        for name, settings in protocol.methods:
            for key, word in METHODS.get(name).vocabulary_words(settings):
                if unknown_words(word):
                    problems.append(((name, key), f"{word!r} is not a word of the toy world. {known}"))
        return problems

    def identifier_problem(self, model: ModelSpec, identifier: str) -> str | None:
        """The toy world's tokenizer is its vocabulary: the identifier must be one of its rare tokens, which no
        caption uses; any other word of the vocabulary already means something to the model."""
        if identifier.lower() in RARE_TOKENS:
            return None
        known = "a word of the toy world's captions" if identifier.lower() in vocabulary() else \
            "not in the toy world's vocabulary"
        return (f"{identifier!r} is {known}; the identifier must be one of the world's rare tokens, which no caption "
                f"uses: {', '.join(RARE_TOKENS)}.")

    def load(self, model: ModelSpec, dtype: torch.dtype | None) -> Components:
        return load_toyworld_components(dtype)


BACKEND = ToyWorldBackend()
