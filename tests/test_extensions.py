"""Extending the harness from outside the package: a method, a metric and a model backend registered here, in this
file alone, and a smoke study run with them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from harness.backends import MODEL_BACKENDS, ModelBackend
from harness.backends.tiny import build_tiny_components
from harness.config import ProtocolError, load_protocol
from harness.methods import METHODS, Method
from harness.metrics import METRICS, PerImageScores, register
from run_experiment import main
from tests.conftest import REPO


@dataclass(frozen=True)
class BiasSettings:
    include_norms: bool = False


class BiasOnly(Method):
    """Trains only the UNet's biases (and, with include_norms, its normalisation weights): a BitFit-like method."""

    name = "bias_only"
    settings_type = BiasSettings
    train_defaults: ClassVar[dict[str, float]] = {"learning_rate": 1e-3}
    prepared = 0

    def prepare(self, components, device):
        BiasOnly.prepared += 1
        unet = components.unet.to(device=device, dtype=torch.float32).train()
        unet.requires_grad_(False)
        params = [p for name, p in unet.named_parameters()
                  if name.endswith("bias") or (self.settings.include_norms and "norm" in name)]
        for p in params:
            p.requires_grad_(True)
        components.vae.requires_grad_(False).eval()
        components.text_encoder.requires_grad_(False).eval()
        return params

    def state_dict(self, components):
        return {n: p.detach().clone() for n, p in components.unet.named_parameters() if p.requires_grad}

    def load_state_dict(self, components, state):
        components.unet.load_state_dict(state, strict=False)

    def export(self, components, folder: Path) -> Path:
        raise NotImplementedError


def farthest_real(images):
    """Per subject image: its lowest DINO cosine to a real image (a pessimistic fidelity)."""
    idx = images.indices("subject")
    scores = np.full(len(images), np.nan)
    scores[idx] = (images.dino[idx].astype(np.float64) @ images.real_dino.astype(np.float64).T).min(axis=1)
    return PerImageScores(scores, tuple(zip(images.prompts, images.seeds, strict=True)))


class TinyOtherSeed(ModelBackend):
    random_weights = True

    def load(self, model, dtype):
        return build_tiny_components(seed=3)


@pytest.fixture
def registered():
    METHODS.register("bias_only", BiasOnly)
    register("dino_min", higher_is_better=True, backbone="dino", features=("dino",), label="DINO (min)",
             scale="raw cosine", pairing="each subject-prompt image with its farthest real image",
             description="lowest DINO cosine of a subject image to a real image")(farthest_real)
    MODEL_BACKENDS.register("tiny3", TinyOtherSeed())
    yield
    METHODS.unregister("bias_only")
    METRICS.unregister("dino_min")
    MODEL_BACKENDS.unregister("tiny3")


PROTOCOL = """
name: extended
model: {id: tiny3}
subjects:
  - {name: dog, instance_dir: ../examples/subjects/dog, class_noun: dog}
train: {method: bias_only, resolution: 32, mixed_precision: "no", gradient_checkpointing: false}
bias_only: {include_norms: true}
class_images: {sampler: ddim, steps: 2}
eval:
  backbones: tiny
  seeds: [0, 1]
  class_prompts: ["a {class}"]
  max_subject_prompts: 1
  sampler: ddim
  steps: 2
  bootstrap_samples: 100
  metrics: [dino, dino_min, pres]
grid:
  prior_loss_weight: [0.0, 1.0]
  num_class_images: [2]
  steps: [1, 2]
"""


@pytest.mark.slow
def test_a_method_a_metric_and_a_backend_registered_from_a_test_run_a_study(registered, tmp_path, monkeypatch):
    (tmp_path / "protocols").mkdir()
    shutil.copytree(REPO / "examples" / "subjects" / "dog", tmp_path / "examples" / "subjects" / "dog")
    path = tmp_path / "protocols" / "extended.yaml"
    path.write_text(PROTOCOL)
    protocol = load_protocol(path)
    assert protocol.train.learning_rate == 1e-3  # the method's own default
    assert protocol.method_settings("bias_only") == BiasSettings(include_norms=True)
    monkeypatch.chdir(tmp_path)
    assert main([str(path)]) == 0
    runs = pd.read_csv(tmp_path / "results" / "extended" / "runs.csv")
    assert len(runs) == 4 and set(runs.method) == {"bias_only"} and (runs.status == "ok").all()
    assert runs.dino_min.between(-1, 1).all() and (runs.dino_min <= runs.dino + 1e-9).all()
    assert set(runs.include_norms) == {True} and set(runs.model_id) == {"tiny3"}
    assert BiasOnly.prepared == 2
    assert "DINO (min)" in (tmp_path / "reports" / "extended" / "report.md").read_text()


def test_a_misplaced_method_section_names_its_owner(registered, write_protocol):
    text = ("model: {id: tiny}\nsubjects:\n  - {name: dog, instance_dir: '{subject_dir}', class_noun: dog}\n"
            "bias_only: {include_norms: true}\n")
    with pytest.raises(ProtocolError) as caught:
        load_protocol(write_protocol(text))
    assert "bias_only: is the settings section of method 'bias_only', which this study does not train" in str(
        caught.value)
    with pytest.raises(ProtocolError) as caught:
        load_protocol(write_protocol(text.replace("bias_only: {include_norms: true}", "train: {include_norms: true}")))
    assert "train.include_norms: is a setting of method bias_only, but this study trains dreambooth" in str(
        caught.value)
