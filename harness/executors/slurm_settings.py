"""The slurm executor's settings: the folders every node must see and the checks on them, and the sbatch settings
of each job, from the protocol's `execution:` section.

Nothing here submits anything or imports submitit; the dry run shows what is computed here.
"""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LOCAL_ONLY_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")
WAIT_POLL_SECONDS = 2.0


def absolute_outputs(protocol: Any) -> Any:
    """The protocol with its output folders and the log folder made absolute (relative paths are relative to the
    working directory of the command, which a job on another node does not share)."""
    output = protocol.output
    output = replace(output, **{name: Path(getattr(output, name)).absolute()
                                for name in ("runs_dir", "cache_dir", "results_dir", "reports_dir")})
    execution = replace(protocol.execution, log_dir=Path(protocol.execution.log_dir).absolute())
    return replace(protocol, output=output, execution=execution)


def shared_folders(protocol: Any) -> dict[str, Path]:
    """What the jobs read or write, by the setting that names it."""
    protocol = absolute_outputs(protocol)
    folders = {f"output.{name}": getattr(protocol.output, name)
               for name in ("runs_dir", "cache_dir", "results_dir", "reports_dir")}
    folders["execution.log_dir"] = protocol.execution.log_dir
    for i, subject in enumerate(protocol.subjects):
        folders[f"subjects[{i}].instance_dir"] = Path(subject.instance_dir)
    return folders


def local_only_reason(path: Path) -> str | None:
    """Why `path` cannot be shared with other machines, or None when nothing says so."""
    path = path.resolve()
    temporary = {Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path(tempfile.gettempdir()).resolve()}
    for root in sorted(temporary):
        if path == root or root in path.parents:
            return f"is under {root}, a folder each machine has for itself"
    kind = filesystem_type(path)
    if kind in LOCAL_ONLY_FILESYSTEMS:
        return f"is on a {kind} filesystem, which lives in one machine's memory"
    return None


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (Linux: the longest mount point of /proc/mounts above it)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best, kind = "", None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def sbatch_parameters(spec: Any, phase: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters of one phase's jobs (collect takes no GPU)."""
    params: dict[str, Any] = {"time": spec.time_limit, "partition": spec.partition, "account": spec.account,
                              "cpus_per_task": spec.cpus_per_task,
                              "mem": f"{spec.mem_gb:g}GB" if spec.mem_gb else None,
                              "gpus_per_task": spec.gpus_per_task if phase != "collect" and spec.gpus_per_task
                              else None}
    extra = {}
    for option in spec.sbatch:
        key, sep, value = option.removeprefix("--").partition("=")
        extra[key] = value if sep else True
    if phase == "execute":
        extra["kill-on-invalid-dep"] = "yes"  # prepare failed: the array goes instead of pending forever
    params["additional_parameters"] = extra
    return {k: v for k, v in params.items() if v is not None and v != {}}


def sbatch_lines(params: dict[str, Any], dependency: str | None = None, array: str | None = None) -> list[str]:
    """The #SBATCH lines of a job's settings, as sbatch reads them."""
    flags = {k: v for k, v in params.items() if k != "additional_parameters"}
    flags |= params.get("additional_parameters", {})
    if dependency:
        flags["dependency"] = dependency
    if array:
        flags["array"] = array
    return [f"#SBATCH --{key.replace('_', '-')}" + ("" if flags[key] is True else f"={flags[key]}")
            for key in sorted(flags)]


def setup_lines(spec: Any) -> list[str]:
    """Shell lines each job runs before Python: the harness importable wherever the job starts, then the user's."""
    return [f'export PYTHONPATH={shlex.quote(str(REPO))}"${{PYTHONPATH:+:$PYTHONPATH}}"', *spec.setup]
