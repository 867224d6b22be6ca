"""LPIPS distances between images (the DreamBooth paper's DIV), through the `lpips` package.

LPIPS (Zhang et al., 2018) compares two images through a trunk network's feature maps at several depths: each map
is unit-normalised along its channels, the two images' maps are subtracted and squared, weighted per channel by a
learned 1x1 layer, averaged over positions and summed over depths. `LpipsNetwork` holds such a network and gives
the distance matrix of a group of images. It computes each image's features once and uses the package's own
layers and normalisation for the rest: the package's `forward` takes one pair at a time, so it would compute an
image's features once per pair.

Builders, one per backbone set; `net` is `eval.lpips_net`:
- `load_lpips(net)`: the `lpips` package's v0.1 network. `alex` (AlexNet) is the default: the LPIPS authors
  recommend it for a distance. `vgg` (VGG16) is the other choice. The learned linear layers ship inside the
  package. The trunk's ImageNet weights come from torchvision and download once into the torch hub cache; offline
  they raise `BackboneUnavailableError`.
- `tiny_lpips(net)`: the same network with a random trunk and the package's linear layers: a pipeline check only.
- The toy world's network (harness/toyworld/models.py) is an `LpipsNetwork` over the toy VAE encoder.

Images are compared at their own resolution (no resize, no crop), with pixels scaled to [-1, 1]. The package's
networks then apply its ScalingLayer (ImageNet statistics in [-1, 1] units). A distance is >= 0, and 0 for two
identical images.

What this module does not hold: which pairs are compared and the cache of distances (evaluator.py), the DIV
metrics (builtin_metrics.py). It imports torch and the package only when a network is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from harness.backbones import LPIPS_NETS, TINY_SOURCE, BackboneUnavailableError, offline_message, seeded
from harness.data import to_rgb8

if TYPE_CHECKING:
    import torch

LPIPS_VERSION = "0.1"
LPIPS_SCALE = "LPIPS distance (>= 0; 0 for identical images)"
NO_RESIZE = "none: each image at its own resolution"
UNIT_RANGE = "pixels scaled to [-1, 1]"
PACKAGE_SCALING = (f"{UNIT_RANGE}, then the lpips package's ScalingLayer: (x - shift) / scale with shift "
                   "(-0.030, -0.088, -0.188), scale (0.458, 0.448, 0.450) (ImageNet statistics in [-1, 1] units)")
# The smallest image side each trunk's pooling layers accept (AlexNet's stride-4 stem and two 3x3/2 max-pools).
MIN_SIDE = {"alex": 32, "vgg": 16}
TRUNKS = {"alex": "AlexNet (torchvision, ImageNet)", "vgg": "VGG16 (torchvision, ImageNet)"}
DEFAULT_BATCH_SIZE = 16


class LpipsNetwork:
    """A perceptual distance of LPIPS's form on one device: `distance_matrix(images)` -> (N, N) float64.

    `stages` run one after the other on (B, 3, H, W) pixels in [-1, 1]; the output of each stage is one feature map.
    `weights` holds one 1x1 layer per feature map (LPIPS's learned linear layers), or is None for uniform weights
    (the sum over channels: the LPIPS paper's baseline without learned weights).
    """

    def __init__(self, stages: torch.nn.ModuleList, weights: torch.nn.ModuleList | None, *, tag: str, model_id: str,
                 source: str, normalisation: str, layer_weights: str, min_side: int, device: str | torch.device,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if weights is not None and len(weights) != len(stages):
            raise ValueError(f"LPIPS network {tag}: {len(weights)} layer weights for {len(stages)} feature maps.")
        self.stages = stages.to(device).eval().requires_grad_(False)
        self.weights = weights.to(device).eval().requires_grad_(False) if weights is not None else None
        self.tag = tag
        self.model_id = model_id
        self.source = source
        self.normalisation = normalisation
        self.layer_weights = layer_weights
        self.min_side = min_side
        self.device = device
        self.batch_size = batch_size

    @property
    def is_tiny(self) -> bool:
        return self.source == TINY_SOURCE

    def describe(self) -> dict[str, Any]:
        """Metadata for CSVs and reports: which network, weights, preprocessing and scale produced the numbers."""
        return {
            "backbone": self.tag,
            "model_id": self.model_id,
            "pretrained": self.source,
            "preprocessing": f"no resize, no crop; {self.normalisation}",
            "resize": NO_RESIZE,
            "crop": "none",
            "interpolation": "none",
            "normalisation": self.normalisation,
            "layer_weights": self.layer_weights,
            "metric_scale": LPIPS_SCALE,
        }

    def distance_matrix(self, images: Sequence[Image.Image]) -> np.ndarray:
        """LPIPS distance of every pair of `images` (one size), symmetric with a zero diagonal."""
        import torch

        self._check_sizes(images)
        features = self._features(images)
        count = len(images)
        matrix = np.zeros((count, count), dtype=np.float64)
        with torch.inference_mode():
            for i in range(count - 1):
                total = sum(self._layer_distance(layer, (maps[i:i + 1] - maps[i + 1:]) ** 2)
                            for layer, maps in enumerate(features))
                matrix[i, i + 1:] = total.double().cpu().numpy()
        return matrix + matrix.T

    def _check_sizes(self, images: Sequence[Image.Image]) -> None:
        sizes = sorted({image.size for image in images})
        if len(sizes) > 1:
            raise ValueError(f"LPIPS compares images of one size; got {' and '.join(f'{w}x{h}' for w, h in sizes)}. "
                             "Generate every evaluation image of a prompt at one resolution.")
        if sizes and min(sizes[0]) < self.min_side:
            raise ValueError(f"LPIPS ({self.tag}) needs images of at least {self.min_side} px on each side; these "
                             f"are {sizes[0][0]}x{sizes[0][1]}. Evaluate at a larger train.resolution, or leave "
                             "div_lpips and div_lpips_class out of eval.metrics.")

    def _features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Per depth, the (N, C, H, W) feature maps of the images, unit-normalised along channels."""
        import torch
        from lpips import normalize_tensor

        per_batch = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = torch.stack([pixels_in_unit_range(im) for im in images[start:start + self.batch_size]])
                per_batch.append([normalize_tensor(maps.float()) for maps in self._stage_outputs(pixels)])
        return [torch.cat(maps) for maps in zip(*per_batch, strict=True)]

    def _stage_outputs(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        outputs, hidden = [], pixels.to(self.device)
        for stage in self.stages:
            hidden = stage(hidden)
            outputs.append(hidden)
        return outputs

    def _layer_distance(self, layer: int, squared: torch.Tensor) -> torch.Tensor:
        """(P, C, H, W) squared differences -> (P,) spatial mean of their weighted channel sum."""
        weighted = self.weights[layer](squared) if self.weights is not None else squared.sum(dim=1, keepdim=True)
        return weighted.mean(dim=(1, 2, 3))


def pixels_in_unit_range(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 pixels of an RGB image, scaled from [0, 255] to [-1, 1]."""
    import torch

    rgb = np.asarray(image if image.mode == "RGB" else to_rgb8(image), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def package_stages(model: Any) -> torch.nn.ModuleList:
    """The `lpips` package network's trunk slices (its ScalingLayer first), whose outputs its forward compares."""
    import torch

    slices = [getattr(model.net, f"slice{i}") for i in range(1, model.net.N_slices + 1)]
    return torch.nn.ModuleList([torch.nn.Sequential(model.scaling_layer, slices[0]), *slices[1:]])


def _check_net(net: str) -> None:
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS network {net!r}; use one of {', '.join(LPIPS_NETS)} (eval.lpips_net).")


def _package_model(net: str, random_trunk: bool) -> Any:
    """The package's LPIPS v0.1 module: its shipped linear layers, the trunk from torchvision (random or ImageNet)."""
    try:
        import lpips
    except ImportError as e:
        raise BackboneUnavailableError("the LPIPS metrics (div_lpips, div_lpips_class) need the `lpips` package: "
                                       "`pip install -r requirements.txt`, or leave them out of eval.metrics.") from e

    with warnings.catch_warnings():
        # The package passes torchvision's deprecated `pretrained=` argument; the weights it selects are the same.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(net=net, version=LPIPS_VERSION, pretrained=True, pnet_rand=random_trunk, verbose=False)


def _package_network(model: Any, net: str, trunk: str, *, tag: str, source: str, device: str | torch.device,
                     batch_size: int) -> LpipsNetwork:
    return LpipsNetwork(
        package_stages(model), model.lins, tag=tag, source=source, normalisation=PACKAGE_SCALING,
        model_id=f"lpips v{LPIPS_VERSION} {net}: {trunk} trunk, {len(model.lins)} feature depths",
        layer_weights=f"learned: the lpips package's v{LPIPS_VERSION} linear layers for {net}",
        min_side=MIN_SIDE[net], device=device, batch_size=batch_size,
    )


def load_lpips(device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, net: str = "alex"
               ) -> LpipsNetwork:
    """LPIPS v0.1 with the ImageNet trunk `net` (alex or vgg), downloaded once by torchvision."""
    _check_net(net)
    try:
        model = _package_model(net, random_trunk=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a damaged cached file a RuntimeError
        raise BackboneUnavailableError(offline_message(f"LPIPS {net} (lpips v{LPIPS_VERSION})", "torchvision", e,
                                                       source="download.pytorch.org (torchvision)")) from e
    return _package_network(model, net, TRUNKS[net], tag=f"lpips:{net}/v{LPIPS_VERSION}", device=device,
                            batch_size=batch_size,
                            source=f"lpips package linear layers v{LPIPS_VERSION}; {TRUNKS[net]} trunk weights")


def tiny_lpips(device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, net: str = "alex",
               seed: int = 0) -> LpipsNetwork:
    """The package's network with a random trunk fixed by `seed` (no download): every code path of the real one."""
    _check_net(net)
    model = seeded(seed, lambda: _package_model(net, random_trunk=True))
    tag = f"tiny-random:lpips-{net}" + (f":seed{seed}" if seed else "")
    return _package_network(model, net, f"random {TRUNKS[net].split(' ')[0]}-shaped", tag=tag, source=TINY_SOURCE,
                            device=device, batch_size=batch_size)
