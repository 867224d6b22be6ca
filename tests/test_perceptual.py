"""LPIPS distances: the harness's matrix against the `lpips` package's own forward, pair by pair; the toy world's
network against its formula written out; sizes, symmetry, the offline error and what the networks say of
themselves."""

from __future__ import annotations

import warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from harness.backbones import BackboneUnavailableError, seeded
from harness.perceptual import LpipsNetwork, load_lpips, tiny_lpips

TOLERANCE = 1e-6


def random_images(count: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def in_unit_range(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1], written out here rather than taken from the module under test."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return torch.tensor(array * 2.0 - 1.0, dtype=torch.float32).permute(2, 0, 1)[None]


def package_distances(net: str, images: list[Image.Image], seed: int = 0) -> np.ndarray:
    """Every pair through the package's LPIPS.forward, with the same random trunk as tiny_lpips(seed)."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's note on the package's `pretrained=` argument
        model = seeded(seed, lambda: lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True,
                                                 verbose=False)).eval()
    with torch.no_grad():
        return np.array([[model(in_unit_range(a), in_unit_range(b)).item() for b in images] for a in images])


@pytest.mark.parametrize(("net", "size"), [("alex", (40, 48)),
                                           pytest.param("vgg", (24, 16), marks=pytest.mark.slow)])  # VGG16: 138 M
def test_distance_matrix_equals_the_package_forward_pair_by_pair(net, size):
    images = random_images(4, size)
    network = tiny_lpips(net=net, batch_size=3)  # batches of 3 and 1: features stacked across batches
    matrix = network.distance_matrix(images)
    expected = package_distances(net, images)
    assert matrix.shape == (4, 4) and np.abs(matrix - expected).max() < TOLERANCE
    assert np.array_equal(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    assert np.all(matrix[~np.eye(4, dtype=bool)] > 0)


def test_identical_images_are_at_distance_zero_and_a_changed_one_is_not():
    image = random_images(1)[0]
    changed = image.copy()
    changed.putpixel((3, 3), (0, 0, 0))
    matrix = tiny_lpips().distance_matrix([image, image.copy(), changed])
    assert matrix[0, 1] == 0.0 and matrix[0, 2] > 0 and matrix[0, 2] == pytest.approx(matrix[1, 2], abs=1e-12)


def test_images_of_two_sizes_or_too_small_are_refused_with_the_fix():
    network = tiny_lpips()
    with pytest.raises(ValueError, match=r"one size; got 40x40 and 48x40"):
        network.distance_matrix([*random_images(1, (40, 40)), *random_images(1, (40, 48))])
    with pytest.raises(ValueError, match=r"at least 32 px.*16x16.*div_lpips"):
        network.distance_matrix(random_images(2, (16, 16)))
    with pytest.raises(ValueError, match=r"unknown LPIPS network 'squeeze'.*alex, vgg.*eval\.lpips_net"):
        tiny_lpips(net="squeeze")


def test_uniform_weights_are_the_channel_sum_written_out():
    """An LpipsNetwork without layer weights (the toy world's kind): sum over depths of the spatial mean of the
    channel-summed squared difference of channel-normalised maps."""
    stages = seeded(1, lambda: torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, padding=1),
                                                    torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3,
                                                                                                         stride=2))]))
    network = LpipsNetwork(stages, None, tag="test", model_id="test", source="test", normalisation="[-1, 1]",
                           layer_weights="uniform", min_side=8, device="cpu")
    images = random_images(3, (12, 10), seed=5)
    matrix = network.distance_matrix(images)

    def maps(image: Image.Image) -> list[np.ndarray]:
        with torch.no_grad():
            first = stages[0](in_unit_range(image))
            second = stages[1](first)
        out = []
        for m in (first, second):
            array = m[0].double().numpy()
            out.append(array / (np.sqrt((array ** 2).sum(axis=0, keepdims=True)) + 1e-10))
        return out

    for i in range(3):
        for j in range(3):
            expected = sum(((a - b) ** 2).sum(axis=0).mean() for a, b in zip(maps(images[i]), maps(images[j]),
                                                                                strict=True))
            assert abs(matrix[i, j] - expected) < TOLERANCE


def test_networks_describe_weights_preprocessing_and_scale():
    described = tiny_lpips(net="alex", seed=2).describe()
    assert described["backbone"] == "tiny-random:lpips-alex:seed2"
    assert described["pretrained"] == "random (tiny, pipeline check only)"
    assert "AlexNet-shaped" in described["model_id"] and "5 feature depths" in described["model_id"]
    assert described["resize"].startswith("none") and described["crop"] == "none"
    assert "[-1, 1]" in described["normalisation"] and "ScalingLayer" in described["normalisation"]
    assert described["layer_weights"] == "learned: the lpips package's v0.1 linear layers for alex"
    assert described["metric_scale"].startswith("LPIPS distance")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_lpips_offline_says_how_to_run_without_it(net, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # a cached copy must not be found

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneUnavailableError) as error:
        load_lpips(net=net)
    message = str(error.value)
    assert f"LPIPS {net}" in message and "torchvision" in message and "Name or service not known" in message
    assert "eval.backbones: tiny" in message and "cached" in message
