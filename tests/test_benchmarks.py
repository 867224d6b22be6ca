"""The benchmark scripts' CPU checks: a script that no longer fits the harness fails here, not on a rented GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_study_runs_the_scaled_study_and_writes_every_phase(tmp_path):
    bench_study = load_script("bench_study")
    status = bench_study.main(["--tiny", "--compile", "auto", "--steps", "2, 4", "--workdir", str(tmp_path / "work"),
                               "--out", str(tmp_path / "out")])
    assert status == 0
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert study["exit_status"] == 0 and study["compile"] == "auto"
    phases = study["phases"]
    # 3 runs (prior weight 0, 0.5, 1) of 4 steps; 12 images per snapshot, 2 snapshots a run, and the base model's 12
    assert phases["training"]["work"] == {"steps": 12.0}
    assert phases["sampling"]["work"] == {"images": 84.0}
    assert phases["class images"]["work"] == {"images": 16.0}
    assert "images/s" in phases["sampling"]["rate"] and "s/step" in phases["training"]["rate"]
    assert all(p["seconds"] >= 0 for p in phases.values())
    runs = study["runs"]
    assert len(runs) == 3 and {r["steps"] for r in runs} == {4}
    assert all(r["compiled"] is None and r["seconds_per_step"] > 0 for r in runs)  # auto on a CPU: eager


def test_bench_throughput_measures_only_the_jobs_asked_for():
    bench_throughput = load_script("bench_throughput")
    jobs = bench_throughput.table_jobs("cpu", True, "aot_eager")
    picked = bench_throughput.chosen(jobs, "sampling compiled, train low_memory")
    assert [label for label, *_ in picked] == ["sampling compiled", "train low_memory checkpointing on",
                                               "train low_memory checkpointing eager"]
    assert bench_throughput.chosen(jobs, "") == jobs
    with pytest.raises(SystemExit, match="matches none of: train fast checkpointing on"):
        bench_throughput.chosen(jobs, "sampling fast")
