"""Executors: the execution settings and their checks, the local executor's workers (two give the CSVs of one; a
killed worker and Ctrl-C leave a study the next invocation finishes), and two invocations on one study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.config import ExecutionSpec, ProtocolError, load_protocol, override_execution
from harness.executors import ExecutionError
from harness.executors.local import Slot, worker_slots
from harness.progress import read_status
from harness.results.columns import TIMING_COLUMNS
from run_experiment import main
from tests.conftest import MINIMAL, REPO

CSVS = ("runs.csv", "images.csv", "references.csv")


# --------------------------------------------------------------------------------------------------------------
# Settings


def test_the_execution_section_is_typed_and_checked(write_protocol):
    protocol = load_protocol(write_protocol(MINIMAL + "execution: {gpus: [0, 1], time_limit: 30}\n"))
    assert protocol.execution == ExecutionSpec(gpus=(0, 1), time_limit=30)
    bad = MINIMAL + "execution: {executor: slurn, gpus: [1, 1], sbatch: [qos=high], time_limit: 0}\n"
    with pytest.raises(ProtocolError) as caught:
        load_protocol(write_protocol(bad, name="bad.yaml"))
    text = str(caught.value)
    assert "execution.executor: unknown executor 'slurn'; did you mean 'slurm'?" in text
    assert "execution.gpus: has repeated GPUs [1, 1]" in text
    assert "execution.sbatch: 'qos=high' is not an sbatch option" in text
    assert "execution.time_limit: must be at least 1" in text


def test_a_deterministic_study_asks_torch_for_deterministic_kernels(write_protocol, monkeypatch):
    import torch

    from harness.devices import set_cudnn_autotuning
    from harness.study import Study

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    protocol = load_protocol(write_protocol(MINIMAL + "execution: {deterministic: true}\n"))
    assert protocol.execution.deterministic and not load_protocol(write_protocol(MINIMAL)).execution.deterministic
    try:
        Study.open(protocol, "cpu")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_cudnn_autotuning(True)  # what a compiled sampler or a long training run asks for
        assert not torch.backends.cudnn.benchmark
    finally:  # process-wide settings: the other tests run without them
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False


def test_command_line_overrides_are_checked_like_the_protocol(write_protocol):
    protocol = load_protocol(write_protocol(MINIMAL))
    assert override_execution(protocol, {"workers": 2, "gpus": [0]}).execution.workers == 2
    assert override_execution(protocol, {"deterministic": True}).execution.deterministic
    with pytest.raises(ExecutionError) as caught:
        override_execution(protocol, {"time_limt": 5, "workers": 0, "executor": "nope"})
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("--execution time_limt: unknown setting; did you mean 'time_limit'?")
    assert "--execution workers: must be at least 1" in lines[1]
    assert lines[2].startswith("--execution executor: unknown executor 'nope'")


def test_bad_execution_flags_exit_2_before_any_work(capsys):
    smoke = str(REPO / "protocols" / "smoke.yaml")
    assert main([smoke, "--dry-run", "--execution", "time_limit=abc"]) == 2
    assert "--execution time_limit: expected an integer, got 'abc'" in capsys.readouterr().err
    assert main([smoke, "--dry-run", "--execution", "partition"]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def fake_gpus(monkeypatch, count: int, visible: str | None = None) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_one_worker_per_gpu_each_pinned_to_its_own(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert worker_slots(ExecutionSpec(), None) == [Slot("gpu0", "cuda:0", "0"), Slot("gpu1", "cuda:0", "1")]
    fake_gpus(monkeypatch, 4, visible="3,5,6,7")  # indices are as this process sees them
    assert worker_slots(ExecutionSpec(gpus=(0, 2)), None) == [Slot("gpu0", "cuda:0", "3"),
                                                             Slot("gpu2", "cuda:0", "6")]
    assert [s.name for s in worker_slots(ExecutionSpec(gpus=(1,), workers=2), None)] == ["gpu1.1", "gpu1.2"]


def test_workers_sharing_the_cpu_get_sleeping_openmp_threads(monkeypatch):
    from harness.executors.local import worker_environment

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    slot = Slot("gpu1", "cuda:0", "1")
    assert worker_environment(slot, 2) == {"CUDA_VISIBLE_DEVICES": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert worker_environment(slot, 1) == {"CUDA_VISIBLE_DEVICES": "1", "OMP_WAIT_POLICY": None}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    assert worker_environment(slot, 2)["OMP_WAIT_POLICY"] is None


def test_one_gpu_or_none_runs_in_this_process(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert worker_slots(ExecutionSpec(), None) == [Slot("gpu0", "cuda")]
    fake_gpus(monkeypatch, 0)
    assert worker_slots(ExecutionSpec(), None) == [Slot("cpu", "cpu")]
    assert worker_slots(ExecutionSpec(workers=2), None) == [Slot("cpu0", "cpu"), Slot("cpu1", "cpu")]
    assert worker_slots(ExecutionSpec(), "cuda:1") == [Slot("cuda1", "cuda:1")]


def test_gpus_that_do_not_exist_and_device_with_workers_are_refused(monkeypatch):
    fake_gpus(monkeypatch, 2)
    with pytest.raises(ExecutionError, match=r"GPU 2 does not exist; this machine shows GPUs 0-1"):
        worker_slots(ExecutionSpec(gpus=(0, 2)), None)
    with pytest.raises(ExecutionError, match="--device runs one worker in this process"):
        worker_slots(ExecutionSpec(workers=2), "cuda:0")


# --------------------------------------------------------------------------------------------------------------
# Whole studies


def make_study(root: Path) -> Path:
    shutil.copytree(REPO / "examples" / "subjects" / "dog", root / "examples" / "subjects" / "dog")
    (root / "protocols").mkdir(parents=True)
    shutil.copy(REPO / "protocols" / "smoke.yaml", root / "protocols" / "smoke.yaml")
    return root


def tables(root: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in CSVS:
        table = pd.read_csv(root / "results" / "smoke" / name)
        out[name] = table.drop(columns=[c for c in TIMING_COLUMNS if c in table.columns])
    return out


def assert_same_tables(root: Path, reference: dict[str, pd.DataFrame]) -> None:
    for name, table in tables(root).items():
        pd.testing.assert_frame_equal(table, reference[name], check_exact=True, obj=name)


def command(root: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "run_experiment.py"), "protocols/smoke.yaml", *flags],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The smoke study with one worker in this process: the reference every other way of running must match."""
    root = make_study(tmp_path_factory.mktemp("one_worker"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["protocols/smoke.yaml"]) == 0
    return tables(root)


@pytest.mark.slow
def test_two_workers_give_the_csvs_of_one(one_worker, tmp_path):
    root = make_study(tmp_path)
    process = command(root, "--workers", "2")
    out, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, out
    assert "3 run(s) on 2 workers (cpu0, cpu1)" in out
    assert {line.split(": started on ")[1] for line in out.splitlines() if ": started on " in line} == {"cpu0",
                                                                                                     "cpu1"}
    assert_same_tables(root, one_worker)
    assert not list((root / "runs" / ".workers").glob("*/*"))  # status files of a clean invocation are removed


def wait_for(condition, timeout: float = 600.0, every: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out")


def worker_statuses(root: Path) -> list:
    return [s for p in (root / "runs" / ".workers").glob("*/*.json") if (s := read_status(p)) is not None]


@pytest.mark.slow
def test_a_killed_worker_and_ctrl_c_leave_a_study_the_next_invocation_finishes(one_worker, tmp_path):
    root = make_study(tmp_path)
    process = command(root, "--workers", "2")
    # Kill a worker while it samples its run's last snapshot: a snapshot is done, training has not ended.
    victim = wait_for(lambda: next((s for s in worker_statuses(root) if s.activity == "sample step 4"), None))
    os.kill(victim.pid, signal.SIGKILL)
    error_file = root / "runs" / victim.run_key / "error.json"
    wait_for(error_file.is_file)  # the command noticed, recorded the run as failed, started another worker
    # Then Ctrl-C the command while a worker is busy.
    wait_for(lambda: any(s.pid != victim.pid and s.state != "finished" and s.run_key
                         for s in worker_statuses(root)))
    os.kill(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 130, out
    assert "interrupted: finished work is kept; run the same command again to resume." in out
    assert f"(pid {victim.pid}) died (killed by SIGKILL" in out
    error = json.loads(error_file.read_text())
    assert error["phase"] == "sample" and "resumes from its last snapshot" in error["message"]
    pids = [s.pid for s in worker_statuses(root)]
    time.sleep(1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "a worker outlived the command"
    assert not leftovers(root, but=victim.run_key), "Ctrl-C left half-written files"
    resumed = command(root)
    out, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, out
    assert not error_file.exists() and not leftovers(root)
    assert_same_tables(root, one_worker)


def test_workers_get_ready_while_the_study_is_prepared_and_stop_if_preparing_fails(tmp_path, monkeypatch):
    import harness.prepare
    from harness.executors import local

    root = make_study(tmp_path)
    monkeypatch.chdir(root)
    ready, views = [], []
    monkeypatch.setattr(local, "_view", lambda job, make=local._view: views.append(make(job)) or views[-1])

    def both_waiting():
        found = worker_statuses(root)
        return len(found) == 2 and all(s.activity == "waiting for the preparation" for s in found) and found

    def failing_prepare(plan, study, runs):
        # Both workers have loaded the model and wait on the queue before the preparation has ended; the view,
        # fed by the preparation's own status, shows them meanwhile.
        def publishing():
            study.reporter.activity("preparing")
            return both_waiting() and {"cpu0", "cpu1"} <= set(views[0].workers) and both_waiting()

        ready.extend(wait_for(publishing, timeout=600, every=0.3))
        raise RuntimeError("the preparation failed")

    monkeypatch.setattr(harness.prepare, "prepare", failing_prepare)
    with pytest.raises(RuntimeError, match="the preparation failed"):
        main(["protocols/smoke.yaml", "--workers", "2"])
    assert sorted(s.worker for s in ready) == ["cpu0", "cpu1"]
    assert views[0].workers["cpu1"].activity == "waiting for the preparation"
    assert all("load model" in s.timings for s in ready)  # loaded ahead, before any run was handed out
    assert not [s.pid for s in ready if Path(f"/proc/{s.pid}").exists()], "a worker outlived the command"
    assert not list(root.glob("runs/*/train.json"))


def test_only_the_workers_on_the_preparing_gpu_wait_for_the_preparation(monkeypatch):
    from harness.executors.local import WorkerPool

    started = []

    class Process:
        def __init__(self, target, args, name, daemon):
            started.append(args[0])

        def start(self):
            pass

    class Job:
        runs = ()
        plan = type("Plan", (), {"protocol": None})()

    gpus = [Slot("gpu3", "cuda:0", "3"), Slot("gpu5", "cuda:0", "5")]
    for preparing, shared, slots, waiting in (
            ("3", False, gpus, {"gpu3"}),
            ("3", True, gpus, set()),  # the preparing GPU has room for a worker too
            (None, False, [Slot("cpu0", "cpu"), Slot("cpu1", "cpu")], {"cpu0", "cpu1"})):
        started.clear()
        pool = WorkerPool(Job(), slots, Path("."), view=None, preparing=preparing, shared=shared)
        monkeypatch.setattr(pool.context, "Process", Process)
        for slot in slots:
            pool.start(slot)
        assert {o.slot.name for o in started if o.after_preparation} == waiting
        pool.close()


def test_the_preparing_gpu_takes_a_worker_only_where_no_sampling_batch_changes():
    from harness.executors.local import SHARING_RESERVE_BYTES, room_to_share
    from harness.sampling import MAX_BATCH, batch_for_memory

    gib = 2**30
    assert batch_for_memory(79 * gib, 512) == MAX_BATCH
    assert room_to_share(79 * gib, [512])  # an 80 GB card: the batch of 32 stays with a worker's 32 GiB taken
    assert not room_to_share(79 * gib, [512, 768])  # 768 px: 32 images need more than what would be left
    assert batch_for_memory(79 * gib - SHARING_RESERVE_BYTES, 768) < batch_for_memory(79 * gib, 768)
    assert not room_to_share(23 * gib, [512])  # a 24 GB card: the batch is already below 32
    assert not room_to_share(47 * gib, [512])  # a 48 GB card: 32 images alone, fewer beside a worker
    assert batch_for_memory(47 * gib, 512) == MAX_BATCH
    assert room_to_share(70 * gib, [256, 512])


def test_workers_starting_during_the_preparation_get_runs_without_class_images_first():
    from harness.class_images import pool_for
    from harness.executors.local import preparation_order
    from harness.grid import expand

    runs = expand(load_protocol(REPO / "protocols" / "smoke.yaml"))
    with_pool = [r for r in runs if pool_for(r) is not None]
    without = [r for r in runs if pool_for(r) is None]
    assert len(with_pool) == 2 and len(without) == 1
    given = [with_pool[0], *without, with_pool[1]]
    assert preparation_order(given, 0) == given
    assert preparation_order(given, 1) == [*without, *with_pool]
    assert preparation_order(given, 2) == [*without, *with_pool]  # no more runs without class images
    assert preparation_order(with_pool, 2) == with_pool


def leftovers(root: Path, but: str | None = None) -> list[Path]:
    """Temporary files of interrupted writers in the run folders (the hidden files, locks aside)."""
    return [p for p in (root / "runs").glob("*/**/.*") if p.is_file() and p.name != ".lock"
            and p.relative_to(root / "runs").parts[0] not in (but, ".workers")]


@pytest.mark.slow
def test_two_invocations_together_finish_alike_and_train_each_run_once(one_worker, tmp_path):
    root = make_study(tmp_path)
    first, second = command(root), command(root)
    outs = [p.communicate(timeout=1200)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    assert not list(root.glob("runs/*/error.json"))
    trained = [line.split()[1] for out in outs for line in out.splitlines() if ": trained" in line]
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 3, outs  # each run trained by one of them
    assert_same_tables(root, one_worker)


# --------------------------------------------------------------------------------------------------------------
# Slurm


def test_slurm_refuses_folders_the_nodes_cannot_see(write_protocol, tmp_path, monkeypatch):
    from harness.executors.slurm import EXECUTOR

    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    protocol = load_protocol(write_protocol(MINIMAL + f"output: {{runs_dir: {tmp_path}/runs}}\n"))
    problems = EXECUTOR.check(protocol)
    assert any(p.startswith(f"output.runs_dir: {tmp_path}/runs is under /tmp, a folder each machine has for itself;")
               and "every node mounts at the same path" in p for p in problems), problems
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert any("sbatch is not on PATH" in p for p in EXECUTOR.check(protocol))


def test_the_dry_run_shows_the_sbatch_settings_and_the_array(capsys):
    smoke = str(REPO / "protocols" / "smoke.yaml")
    assert main([smoke, "--dry-run", "--executor", "slurm", "--execution", "partition=gpu", "--execution",
                 "slurm_array_parallelism=2", "--execution", "sbatch=[--qos=high]"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --qos=high", "#SBATCH --time=240",
                 "#SBATCH --array=0-2%2", "#SBATCH --dependency=afterok:<prepare>", "task 0: "):
        assert line in out, line
    collect = out[out.index("collect (CSVs and report)"):]
    assert "--gpus-per-task" not in collect  # collect needs no GPU
    assert "Deterministic kernels" not in out
    assert main([smoke, "--dry-run", "--execution", "deterministic=true"]) == 0
    assert "Deterministic kernels (execution.deterministic): slower" in capsys.readouterr().out


@pytest.mark.slow
def test_the_slurm_executor_gives_the_csvs_of_a_local_run(one_worker):
    if shutil.which("sbatch") is None:
        if os.environ.get("HARNESS_TEST_SLURM") == "1":
            pytest.fail("HARNESS_TEST_SLURM=1 but sbatch is not on PATH; .ci/slurm-up.sh starts a cluster")
        pytest.skip("no Slurm here (sbatch is not on PATH); .ci/slurm-up.sh starts a one-node cluster, as CI does")
    # Not under /tmp: the executor refuses folders the nodes could not see.
    root = make_study(Path.home() / ".cache" / "harness-test-slurm" / f"study-{os.getpid()}")
    try:
        flags = ("--executor", "slurm", "--execution", "gpus_per_task=0", "--execution", "time_limit=30")
        process = command(root, *flags)
        out, _ = process.communicate(timeout=1800)
        assert process.returncode == 0, out
        assert "3 run(s) to execute as Slurm jobs: prepare " in out and ", array " in out
        assert_same_tables(root, one_worker)
        again = command(root, *flags)
        out, _ = again.communicate(timeout=600)
        assert again.returncode == 0 and "every run is complete; collecting here, without a job" in out, out
    finally:
        shutil.rmtree(root, ignore_errors=True)
