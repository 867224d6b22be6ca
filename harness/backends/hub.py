"""The hub backend: Stable Diffusion from a Hugging Face hub id or a local diffusers folder.

Resolving maps ids that tutorials still use but that were removed from the hub to where the weights live now (with
a note), and checks that a local folder is a diffusers pipeline. Loading downloads once (then the libraries'
cache serves) and turns every hub, network or missing-file error into `ModelUnavailableError` with the ways out.

What this module does not hold: the offline models (tiny.py, harness/toyworld).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from harness.backends import ModelBackend, ModelUnavailableError, Resolved
from harness.backends.clip_vocab import common_word_problem
from harness.config.schema import DEFAULT_MODEL, ModelSpec

if TYPE_CHECKING:
    import torch

    from harness.models import Components

# Hub ids that tutorials still use but that no longer resolve, mapped to where the weights live now.
MOVED_MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": DEFAULT_MODEL,
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}


def _looks_local(model_id: str, protocol_dir: Path) -> bool:
    return model_id.startswith((".", "/", "~")) or (protocol_dir / model_id).is_dir() or model_id.count("/") != 1


class HubBackend(ModelBackend):
    def resolve(self, model: ModelSpec, protocol_dir: Path) -> Resolved:
        mid = model.id.strip()
        out = Resolved(model)
        if mid in MOVED_MODEL_IDS:
            new = MOVED_MODEL_IDS[mid]
            out.notes.append(f"model.id {mid!r} was removed from the Hugging Face hub in 2024 (it gives a 404); "
                             f"using its copy {new!r} instead. Write that id in the protocol to silence this note.")
            mid = new
        if _looks_local(mid, protocol_dir):
            given = Path(mid).expanduser()
            folder = given if given.is_absolute() else (protocol_dir / given).resolve()
            if not folder.is_dir():
                out.problems.append(("id", f"{mid!r} is neither a hub id (owner/name) nor an existing folder "
                                           f"(looked for {folder}). Give a hub id such as {DEFAULT_MODEL!r}, a "
                                           "diffusers folder, 'toyworld' for the pretrained toy model, or 'tiny' "
                                           "for the offline test model."))
            elif not (folder / "model_index.json").is_file():
                out.problems.append(("id", f"the folder {folder} has no model_index.json, so it is not a "
                                           "diffusers pipeline; save one with pipeline.save_pretrained(folder)."))
            mid = str(folder)
        out.model = replace(model, id=mid)
        return out

    def identifier_problem(self, model: ModelSpec, identifier: str) -> str | None:
        """Checked against CLIP's vocabulary, which every SD 1.x and 2.x tokenizer ships: the model's own tokenizer
        is only known once it is downloaded, and a model with another vocabulary is not checked beyond that."""
        return common_word_problem(identifier)

    def load(self, model: ModelSpec, dtype: torch.dtype | None) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from harness.models import Components, torch_dtype, transformers_dtype

        dtype = dtype or torch_dtype(model.dtype)
        source = dict(pretrained_model_name_or_path=model.id, revision=model.revision)
        try:
            # The scheduler config is the smallest file: an unreachable model fails here before any large download.
            scheduler_config = dict(DDPMScheduler.load_config(subfolder="scheduler", **source))
            tokenizer = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **source)
            text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", **source,
                                                         **transformers_dtype(dtype))
            vae = AutoencoderKL.from_pretrained(subfolder="vae", torch_dtype=dtype, **source)
            unet = UNet2DConditionModel.from_pretrained(subfolder="unet", torch_dtype=dtype, **source)
        except (OSError, ValueError) as error:  # hub, HTTP, validation and missing-file errors all derive from these
            raise ModelUnavailableError(unavailable_message(model, error)) from error
        return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler_config=scheduler_config, identity=f"{model.id}@{model.revision or 'main'}")


BACKEND = HubBackend()


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
