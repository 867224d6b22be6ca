"""Shared fixtures: tiny image folders and protocol files written into tmp_path."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def write_images(folder: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """`n` small random JPEGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


@pytest.fixture
def subject_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "subject")


@pytest.fixture
def write_protocol(tmp_path: Path, subject_dir: Path):
    """Writes a protocol YAML (dedented) into tmp_path; `{subject_dir}` is replaced by the image folder."""

    def write(text: str, name: str = "p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).replace("{subject_dir}", str(subject_dir)))
        return path

    return write


MINIMAL = """
model: {id: tiny}
subjects:
  - name: dog
    instance_dir: {subject_dir}
    class_noun: dog
train:
  resolution: 32
"""
