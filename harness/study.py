"""What the phases of one study share: the protocol, the device, the run store, the caches, the timings and the
lazily loaded models, and where each shared record lives.

`Study` is built by whoever runs a phase (the command's own process, a worker process, a Slurm task); it loads the
base model and the evaluation backbones only on first use, so a phase that finds its work done loads nothing.
The prepared instance images are verified and, if damaged, prepared again under a lock (`instance_paths`).
`shared_lock` is the one way phases take a lock on something several processes could build at once (a class-image
pool, a reference row, a cache): the first builds it, the others wait and then find it built.

What this module does not hold: what any phase does (prepare.py, execute.py, collect.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.backends import load_components
from harness.config import Protocol, SubjectSpec
from harness.data import folder_digest, list_instance_files, prepare_instances
from harness.devices import resolve_device, use_deterministic_kernels
from harness.evaluator import Scorer, record_name
from harness.progress import Reporter
from harness.records import snapshot_dir as record_snapshot_dir
from harness.sampling import SamplerSettings, base_samples_key, sampler_settings, samples_key
from harness.store import RunFolder, RunStore, lock_file
from harness.timings import Timings

if TYPE_CHECKING:
    import torch

    from harness.models import Components

log = logging.getLogger(__name__)


@dataclass
class Study:
    """One protocol's shared state in one process."""

    protocol: Protocol
    device: torch.device
    store: RunStore
    cache_dir: Path
    timings: Timings = field(default_factory=Timings)
    reporter: Reporter = field(default_factory=Reporter)
    _scorer: Scorer | None = None
    _base: Components | None = None
    _instances: dict[tuple[str, int], list[Path]] = field(default_factory=dict)

    @classmethod
    def open(cls, protocol: Protocol, device: torch.device | str | None = None,
             reporter: Reporter | None = None) -> Study:
        if protocol.execution.deterministic:
            use_deterministic_kernels()
        return cls(protocol=protocol, device=resolve_device(str(device) if device is not None else None),
                   store=RunStore(protocol.output.runs_dir), cache_dir=Path(protocol.output.cache_dir),
                   reporter=reporter or Reporter())

    # -- models, loaded on first use ---------------------------------------------------------------------------

    def base_components(self) -> Components:
        """The untrained model, loaded once for class images and base-model samples."""
        if self._base is None:
            self.reporter.activity("load model")
            with self.timings.phase("load model"):
                self._base = load_components(self.protocol.model, dtype=self.inference_dtype)
        return self._base

    @property
    def inference_dtype(self) -> torch.dtype | None:
        import torch

        return None if self.device.type == "cuda" else torch.float32

    def scorer(self) -> Scorer:
        """The evaluation backbones with their embedding cache, loaded on first use."""
        if self._scorer is None:
            from harness.embedders import EmbeddingCache, make_embedders
            from harness.metrics import roles_for

            self.reporter.activity("load backbones")
            with self.timings.phase("load backbones"):
                spec = self.protocol.eval
                embedders = make_embedders(spec.backbones, self.device, roles=roles_for(spec.metrics),
                                           lpips_net=spec.lpips_net)
                self._scorer = Scorer(embedders, EmbeddingCache(self.cache_dir), spec)
        return self._scorer

    def release_models(self) -> None:
        """Drops the base model and the backbones (the command's process hands the GPU to its workers)."""
        self._base = None
        self._scorer = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    # -- inputs ------------------------------------------------------------------------------------------------

    def instance_paths(self, subject: SubjectSpec, resolution: int) -> list[Path]:
        """The subject's prepared (square, resized) instance PNGs, prepared once under a lock."""
        key = (subject.name, resolution)
        if key not in self._instances:
            target = self.cache_dir / "instances" / f"{folder_digest(subject.instance_dir)[:16]}-{resolution}"
            with self.timings.phase("prepare instance images"), \
                    shared_lock(target, f"the instance images of {subject.name}", self.reporter):
                prepared = prepare_instances(subject, resolution, self.cache_dir)
            self._instances[key] = [p.path for p in prepared]
        return self._instances[key]

    def real_paths(self, subject: SubjectSpec) -> list[Path]:
        return list_instance_files(subject.instance_dir)

    def settings(self, resolution: int) -> SamplerSettings:
        return sampler_settings(self.protocol.eval, resolution)

    # -- where the shared records live -------------------------------------------------------------------------

    @property
    def record_name(self) -> str:
        return record_name(self.protocol.eval)

    def real_record_path(self, subject: SubjectSpec) -> Path:
        digest = folder_digest(subject.instance_dir)[:12]
        return self.cache_dir / "references" / f"real-{digest}" / self.record_name

    def base_samples_dir(self, subject: SubjectSpec, resolution: int) -> Path:
        key = base_samples_key(self.protocol.model, subject, self.protocol.eval, self.settings(resolution))
        return self.cache_dir / "base_samples" / key

    def base_record_path(self, subject: SubjectSpec, resolution: int) -> Path:
        return self.base_samples_dir(subject, resolution) / self.record_name

    def snapshot_dir(self, folder: RunFolder, step: int) -> Path:
        run = folder.spec
        key = samples_key(run.subject, self.protocol.eval, self.settings(run.train.resolution))
        return record_snapshot_dir(folder.path, key, step)

    def snapshot_record_path(self, folder: RunFolder, step: int) -> Path:
        return self.snapshot_dir(folder, step) / self.record_name

    def sampler_json(self, resolution: int) -> dict[str, Any]:
        s = self.settings(resolution)
        return {"name": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale, "resolution": s.resolution}


@contextlib.contextmanager
def shared_lock(target: Path, what: str, reporter: Reporter | None = None) -> Iterator[None]:
    """Exclusive use of `target` (a folder or file several processes may build) among processes and machines that
    share its filesystem; waits, saying so, while another process holds it."""
    with lock_file(Path(f"{target}.lock"), on_wait=lambda: _say_waiting(what, reporter)):
        yield


def _say_waiting(what: str, reporter: Reporter | None) -> None:
    text = f"waiting for {what}: another process is preparing them"
    if reporter is not None:
        reporter.activity(text)
    log.info("%s", text)
