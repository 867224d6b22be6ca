"""The device a study runs on: the `--device` name checked before any work.

`check_device_name` checks the spelling without importing torch (the command line and the dry run use it);
`resolve_device` picks the default (a CUDA GPU when torch sees one, else the CPU) or checks that the named device
exists, raising `DeviceError` (a setup error: exit status 2) with the ways out.

`use_deterministic_kernels` is `execution.deterministic`: the settings under which a GPU gives the same numbers in
every process; `set_cudnn_autotuning` respects it.

What this module does not hold: placing modules on a device (models.placed) or anything that runs there.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
DEVICE_CHOICES = "cpu, cuda, cuda:N (the N-th GPU), mps (Apple) or xpu[:N] (Intel)"


class DeviceError(ValueError):
    """The --device named is misspelt or not present on this machine."""


def check_device_name(name: str) -> str:
    """`name` when it spells a device the harness can run on; DeviceError otherwise. No torch import."""
    if not DEVICE_PATTERN.match(name.strip()):
        raise DeviceError(f"{name!r} is not a device name; use {DEVICE_CHOICES}, or leave --device out to "
                          "use the GPU when there is one and the CPU otherwise.")
    return name.strip()


def resolve_device(name: str | None) -> torch.device:
    """The torch device of `--device` (None: cuda when available, else cpu), checked to exist on this machine."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(check_device_name(name))
    except DeviceError as e:
        raise DeviceError(f"--device {e}") from None
    problem = _absence(device)
    if problem:
        raise DeviceError(f"--device {name}: {problem} Leave --device out (the GPU when there is one, else the "
                          "CPU) or use --device cpu.")
    return device


def _absence(device: torch.device) -> str | None:
    """Why `device` cannot be used on this machine, or None when it can."""
    import torch

    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return f"torch sees no CUDA GPU here (torch {torch.__version__} is {build}; no GPU or driver was found)."
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"there is no GPU number {device.index}: torch sees {count} (cuda:0 to cuda:{count - 1})."
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no Apple GPU (MPS) torch can use."
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return "torch sees no Intel GPU (XPU) here."
    if device.index is not None and device.index >= xpu.device_count():
        return f"there is no XPU number {device.index}: torch sees {xpu.device_count()}."
    return None


def use_deterministic_kernels() -> None:
    """Asks this process's GPU for the same numbers in every process and every run, at a cost in speed: torch's
    deterministic algorithms (an operation that has none warns once and runs as it is), cuDNN's deterministic
    convolutions without autotuning (timing picks algorithms, and different algorithms round differently), and
    cuBLAS's fixed workspace (read when cuBLAS starts: this runs before any matrix product). Without them, training
    on a GPU adds gradients in whatever order its atomic operations finish, so the same run trained in two
    processes differs in the last bits of its weights and then in its images' scores."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def deterministic_kernels() -> bool:
    """Whether this process asked for deterministic kernels (then nothing turns cuDNN autotuning on)."""
    import torch

    return torch.are_deterministic_algorithms_enabled()


def set_cudnn_autotuning(on: bool) -> None:
    """Lets cuDNN time its algorithms for each new input shape, or not (a process-wide setting): the one place that
    turns it on, so it stays off under deterministic kernels whoever asks."""
    import torch

    torch.backends.cudnn.benchmark = on and not deterministic_kernels()
