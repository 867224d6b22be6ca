"""What the benchmarks share: SD 1.5-sized models with random weights, GPU memory as nvidia-smi sees it, workers
that run one measurement each in their own process under a time limit, and where a figure comes from.

Random weights have the shapes and FLOPs of the real ones: honest for time and memory, never for image quality.
A worker prints its records on one line (`BENCH_RECORDS [...]`); a worker that fails or runs past its limit gives
an error record instead, and the other measurements go on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1024**3
RECORDS_PREFIX = "BENCH_RECORDS "
SMI_QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


# --------------------------------------------------------------------------------------------------------------
# Full-size SD 1.5 architecture with random weights


def sd15_unet_config() -> dict[str, Any]:
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def sd_vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def clip_vit_l_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_sd15_components(device: str, dtype):
    """SD 1.5-architecture components with random weights; the UNet is created directly on `device`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from harness.backends.tiny import build_clip_tokenizer
    from harness.models import Components, sd15_scheduler_config

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd15_unet_config())
    vae = AutoencoderKL(**sd_vae_config())
    text_encoder = CLIPTextModel(clip_vit_l_text_config(tokenizer))
    for module in (unet, vae, text_encoder):
        if dtype != torch.float32:
            module.to(dtype=dtype)
        module.eval()
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler_config=sd15_scheduler_config(), identity="bench-random-sd15")


def build_components(tiny: bool, device: str, dtype):
    """The SD 1.5 architecture, or the harness's tiny model for a CPU check of a script."""
    from harness.backends.tiny import build_tiny_components

    if not tiny:
        return build_sd15_components(device, dtype)
    components = build_tiny_components()
    for module in (components.unet, components.vae, components.text_encoder):
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return components


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------
# Memory as nvidia-smi sees it


class MemorySampler(threading.Thread):
    """Samples this process's GPU memory (nvidia-smi) and the device's used memory every `period` seconds."""

    def __init__(self, device_index: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.device_index, self.period = device_index, period
        self.peak_smi_mib: float | None = None
        self.smi_source = "unavailable"
        self.peak_device_used: int | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        import torch

        while not self._stop_event.is_set():
            self._sample_smi()
            free, total = torch.cuda.mem_get_info(self.device_index)
            self.peak_device_used = max(self.peak_device_used or 0, total - free)
            self._stop_event.wait(self.period)

    def _sample_smi(self) -> None:
        try:
            out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return
        rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
        rows = [(int(pid), float(mib)) for pid, mib in rows if mib.strip().replace(".", "").isdigit()]
        mine = [mib for pid, mib in rows if pid == os.getpid()]
        if mine:
            self.smi_source = "pid"
        elif len(rows) == 1:  # inside a container the pid namespace differs; a lone process is this one
            mine, self.smi_source = [rows[0][1]], "only process"
        if mine:
            self.peak_smi_mib = max(self.peak_smi_mib or 0.0, mine[0])

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def summary(self) -> dict[str, Any]:
        return {"nvidia_smi_gib": self.peak_smi_mib / 1024 if self.peak_smi_mib else None,
                "nvidia_smi_source": self.smi_source,
                "device_used_gib": self.peak_device_used / GIB if self.peak_device_used else None}


# --------------------------------------------------------------------------------------------------------------
# Workers: one measurement per process, under a time limit


def profile_steps(step, steps: int, device) -> dict[str, Any]:
    """Runs `step()` `steps` times under torch.profiler: wall and GPU-kernel seconds per step, kernel launches per
    step, and the operators with the most CPU time of their own (where a launch-bound step spends its host time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall = (time.perf_counter() - began) / steps
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_seconds = sum(e.device_time_total for e in kernels) / 1e6 / steps if kernels else None
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    by_kernel: dict[str, list[float]] = {}
    for e in kernels:
        by_kernel.setdefault(e.name[:120], []).append(e.device_time_total)
    heavy = sorted(by_kernel.items(), key=lambda kv: sum(kv[1]), reverse=True)[:25]
    return {
        "profiled_steps": steps, "profiled_seconds_per_step": round(wall, 4),
        "kernel_seconds_per_step": None if kernel_seconds is None else round(kernel_seconds, 4),
        "kernel_launches_per_step": round(len(kernels) / steps),
        "top_cpu_ops": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                         "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2)} for e in top],
        "top_kernels": [{"kernel": name, "calls_per_step": round(len(times) / steps, 1),
                         "ms_per_step": round(sum(times) / 1e3 / steps, 2)} for name, times in heavy],
    }


STUDY_CSVS = ("runs.csv", "images.csv", "references.csv")


def compare_csvs(a: Path, b: Path) -> dict[str, Any]:
    """Whether two studies' CSVs (results folders `a` and `b`) agree row for row apart from the timing columns,
    and by how much each column that differs differs."""
    import pandas as pd

    from harness.results.columns import TIMING_COLUMNS

    differences: dict[str, dict[str, float | str]] = {}
    for name in STUDY_CSVS:
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        if list(x.columns) != list(y.columns) or len(x) != len(y):
            differences[name] = {"shape": f"{x.shape} against {y.shape}"}
            continue
        for column in x.columns:
            if column in TIMING_COLUMNS or x[column].equals(y[column]):
                continue
            if x[column].dtype.kind == "f" and y[column].dtype.kind == "f":
                differences.setdefault(name, {})[column] = float((x[column] - y[column]).abs().max())
            else:
                differences.setdefault(name, {})[column] = "differs"
    return {"rows_agree": not differences, "differences": differences}


def emit(records: list[dict[str, Any]]) -> None:
    """What a worker prints last: its records, on one line."""
    print(RECORDS_PREFIX + json.dumps(records), flush=True)


def run_job(script: Path, opts: dict[str, Any], timeout: float, label: str) -> list[dict[str, Any]]:
    """Runs `script --worker OPTS` in its own process group, echoing its output as it comes; its records, or one
    error record when it fails or runs past `timeout` seconds (then the whole group is killed)."""
    command = [sys.executable, str(script), "--worker", json.dumps(opts)]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True)
    timer = threading.Timer(max(1.0, timeout), _kill_group, [process])
    timer.start()
    records = None
    try:
        for line in process.stdout:
            if line.startswith(RECORDS_PREFIX):
                records = json.loads(line[len(RECORDS_PREFIX):])
            else:
                print(f"    {line.rstrip()[:300]}", flush=True)
        process.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - began
    if records is not None and process.returncode == 0:
        for record in records:
            record.setdefault("job_seconds", seconds)
        return records
    why = (f"timed out after {timeout:.0f} s" if seconds >= timeout - 1 else f"failed (exit {process.returncode})")
    return [{"kind": opts.get("measure"), "job": label, "error": f"{label} {why}; see its output above",
             "job_seconds": seconds, **{k: opts[k] for k in ("mode", "variant", "recipe") if k in opts}}]


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------
# Where a figure comes from


def provenance(command: str) -> dict[str, Any]:
    """The commit (with -dirty for uncommitted changes), the date, the libraries, the GPU and the command."""
    import diffusers
    import torch

    info: dict[str, Any] = {
        "commit": _git(["rev-parse", "--short", "HEAD"]) or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "command": command,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
    }
    if _git(["status", "--porcelain", "--untracked-files=no"]):
        info["commit"] += "-dirty"
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def _git(args: list[str]) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all (a kill mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def out_dir(given: Path | None) -> Path:
    """The folder for results: the argument, else $OUT, else results/benchmarks (ignored by git)."""
    if given is not None:
        return given
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "results" / "benchmarks"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    return "\n".join(out + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows])
