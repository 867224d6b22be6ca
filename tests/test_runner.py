"""The smoke study end to end: CSVs, report, resumption without recomputation, and a failing run."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import harness.execute as execute
from harness.config import load_protocol
from harness.grid import expand
from run_experiment import main
from tests.conftest import REPO

METRIC_RANGES = {"dino": (-1, 1), "clip_i": (-1, 1), "clip_t": (-1, 1), "pres": (-1, 1), "div_subject": (0, 2),
                 "div_class": (0, 2)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke protocol run once in a scratch folder (outputs go to the working directory)."""
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(REPO / "examples", root / "examples")
    (root / "protocols").mkdir()
    shutil.copy(REPO / "protocols" / "smoke.yaml", root / "protocols" / "smoke.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["protocols/smoke.yaml"]) == 0
    return root


@pytest.mark.slow
def test_runs_csv_has_one_row_per_run_and_snapshot_with_finite_metrics(study):
    protocol = load_protocol(study / "protocols" / "smoke.yaml")
    runs = expand(protocol)
    table = pd.read_csv(study / "results" / "smoke" / "runs.csv")
    assert len(table) == sum(len(r.snapshot_steps) for r in runs) == 6
    assert set(zip(table.run_key, table.step, strict=True)) == {(r.run_key, s) for r in runs for s in r.snapshot_steps}
    assert (table.status == "ok").all()
    for metric, (low, high) in METRIC_RANGES.items():
        values = table[metric]
        assert values.map(math.isfinite).all(), metric
        assert values.between(low, high).all(), metric
        assert (table[f"{metric}_ci_low"] <= values + 1e-12).all()
        assert (values <= table[f"{metric}_ci_high"] + 1e-12).all()
    assert set(table.clip_backbone) == {"tiny-random:clip (random weights)"}
    assert set(table.prior_loss_weight) == {0.0, 1.0}


@pytest.mark.slow
def test_images_and_references_csv(study):
    images = pd.read_csv(study / "results" / "smoke" / "images.csv")
    # 3 runs x 2 snapshots x 8 images, 8 base-model images and the 5 real photos
    assert len(images) == 3 * 2 * 8 + 8 + 5
    generated = images[images.prompt_kind.isin(["subject", "class"])]
    assert {"run_key", "step", "prompt", "prompt_kind", "seed", "path"} <= set(images.columns)
    assert generated.prompt[generated.prompt_kind == "class"].str.contains("sks").sum() == 0
    references = pd.read_csv(study / "results" / "smoke" / "references.csv")
    assert sorted(references.reference) == ["base_model", "real_images"]


@pytest.mark.slow
def test_report_links_exist_and_carry_the_banner(study):
    report = study / "reports" / "smoke" / "report.md"
    text = report.read_text()
    assert "Pipeline check only" in text
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert len(links) >= 5
    for link in links:
        assert not Path(link).is_absolute()
        assert (report.parent / link).is_file(), link


@pytest.mark.slow
def test_second_invocation_computes_nothing_and_rebuilds_identical_csvs(study, monkeypatch):
    before = {name: (study / "results" / "smoke" / name).read_bytes() for name in ("runs.csv", "images.csv")}

    def forbidden(*args, **kwargs):
        raise AssertionError("work was redone")

    monkeypatch.chdir(study)
    monkeypatch.setattr(execute, "train", forbidden)
    monkeypatch.setattr(execute, "generate", forbidden)
    monkeypatch.setattr("harness.prepare.generate", forbidden)
    monkeypatch.setattr("harness.class_images.generate_images", forbidden)
    monkeypatch.setattr("harness.embedders.Embedder.embed_images", forbidden)
    assert main(["protocols/smoke.yaml"]) == 0
    after = {name: (study / "results" / "smoke" / name).read_bytes() for name in before}
    assert after == before


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_others_complete(tmp_path, monkeypatch):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "protocols").mkdir()
    text = (REPO / "protocols" / "smoke.yaml").read_text().replace("steps: [2, 4]", "steps: [2]")
    (tmp_path / "protocols" / "smoke.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    runs = expand(load_protocol(tmp_path / "protocols" / "smoke.yaml"))
    doomed = runs[1].run_key
    real_train = execute.train

    def train(run, *args, **kwargs):
        if run.run_key == doomed:
            raise RuntimeError("injected failure")
        return real_train(run, *args, **kwargs)

    monkeypatch.setattr(execute, "train", train)
    assert main(["protocols/smoke.yaml"]) == 1
    table = pd.read_csv(tmp_path / "results" / "smoke" / "runs.csv")
    status = dict(zip(table.run_key, table.status, strict=True))
    assert status.pop(doomed) == "failed"
    assert set(status.values()) == {"ok"} and len(status) == 2
    assert "injected failure" in table.loc[table.run_key == doomed, "error"].iloc[0]
    assert "injected failure" in (tmp_path / "runs" / doomed / "error.json").read_text()
    # The next invocation retries only the failed run.
    monkeypatch.setattr(execute, "train", real_train)
    assert main(["protocols/smoke.yaml"]) == 0
    assert not (tmp_path / "runs" / doomed / "error.json").exists()


def test_dry_run_and_bad_protocol_exit_codes(tmp_path, capsys):
    assert main([str(REPO / "protocols" / "smoke.yaml"), "--dry-run"]) == 0
    assert "3 training runs" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "protocols" / "smoke.yaml").read_text().replace("resolution: 32", "resolution: 30"))
    assert main([str(bad), "--dry-run"]) == 2
    assert "train.resolution: must be a positive multiple of 8" in capsys.readouterr().err


@pytest.mark.slow
def test_report_only_rebuilds_outputs_without_models_or_backbones(study, monkeypatch):
    runs_csv = study / "results" / "smoke" / "runs.csv"
    before = runs_csv.read_bytes()
    runs_csv.unlink()
    (study / "reports" / "smoke" / "report.md").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("--report-only must not load models or backbones")

    monkeypatch.chdir(study)
    monkeypatch.setattr("harness.embedders.make_embedders", forbidden)
    monkeypatch.setattr("harness.study.load_components", forbidden)
    monkeypatch.setattr(execute, "training_components", forbidden)
    assert main(["protocols/smoke.yaml", "--report-only"]) == 0
    assert runs_csv.read_bytes() == before
    assert (study / "reports" / "smoke" / "report.md").is_file()


@pytest.mark.slow
def test_unknown_only_key_is_an_error(study, monkeypatch, capsys):
    monkeypatch.chdir(study)
    assert main(["protocols/smoke.yaml", "--only", "000000000000"]) == 2
    assert "no such run key" in capsys.readouterr().err


def test_an_unreachable_model_fails_with_the_ways_out(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "protocols").mkdir()
    text = (REPO / "protocols" / "smoke.yaml").read_text().replace("id: tiny ", "id: nobody/no-such-model ")
    (tmp_path / "protocols" / "smoke.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["protocols/smoke.yaml"]) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-model" in err and "tiny" in err


@pytest.mark.slow
def test_a_rerun_with_nothing_to_do_says_so_at_once_and_loads_nothing_heavy(study):
    """A finished study re-run: the first line comes before any library loads, and neither diffusers, the trainer
    nor a metric backbone is imported; the phase table shows CPU seconds beside the wall clock."""
    code = ("import sys; from run_experiment import main; status = main(['protocols/smoke.yaml']); "
            "heavy = [m for m in ('diffusers', 'transformers', 'harness.trainer', 'harness.caches', 'open_clip', "
            "'timm', 'bitsandbytes') if m in sys.modules]; print('HEAVY', heavy); "
            "import os; print('OMP', os.environ.get('OMP_WAIT_POLICY')); sys.exit(status)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=study, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "protocols/smoke.yaml: checking the protocol and the images"
    assert "HEAVY []" in lines
    assert "OMP None" in lines  # one process alone keeps OpenMP's default (spinning is faster when nobody waits)
    assert sum("already done" in line for line in lines) == 3
    assert any(line.startswith("Time per phase:") and line.split()[-2:] == ["wall", "CPU"] for line in lines)


@pytest.mark.slow
def test_the_readmes_pandas_example_runs_as_written_after_the_quick_start(study):
    """The README's CSV example, run where the quick start ran the smoke study, prints the DINO pivot."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("The CSVs load with a plain `pandas.read_csv`:")[1].split("```python\n")[1].split("```")[0]
    done = subprocess.run([sys.executable, "-c", block], cwd=study, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prior_loss_weight" in done.stdout and "num_class_images" in done.stdout


@pytest.mark.slow
def test_three_methods_on_one_grid_run_end_to_end_and_the_report_compares_them(tmp_path, monkeypatch):
    """DreamBooth, LoRA and Custom Diffusion through the command, on the tiny model: every run finishes, each row
    carries its method's settings and cost, Custom Diffusion's prompts name the subject with its token, and the
    report has the method comparison."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "protocols").mkdir()
    text = (REPO / "protocols" / "smoke.yaml").read_text()
    text = text.replace("steps: [2, 4]\n  num_class_images: [2, 4]",
                        "steps: [2]\n  method: [dreambooth, lora, custom_diffusion]")
    (tmp_path / "protocols" / "smoke.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["protocols/smoke.yaml"]) == 0
    runs = pd.read_csv(tmp_path / "results" / "smoke" / "runs.csv")
    assert sorted(runs["method"].unique()) == ["custom_diffusion", "dreambooth", "lora"]
    assert set(runs["status"]) == {"ok"} and len(runs) == 6  # 3 methods x prior {0, 1}
    by_method = runs.groupby("method")
    assert by_method["trainable_params"].nunique().eq(1).all()
    params = by_method["trainable_params"].first()
    assert params["lora"] < params["custom_diffusion"] < params["dreambooth"]
    assert runs.loc[runs.method == "lora", "rank"].eq(4).all() and runs.loc[runs.method != "lora", "rank"].isna().all()
    images = pd.read_csv(tmp_path / "results" / "smoke" / "images.csv")
    cd_keys = set(runs.loc[runs.method == "custom_diffusion", "run_key"])
    cd_prompts = images.loc[images.run_key.isin(cd_keys) & (images.prompt_kind == "subject"), "prompt"]
    assert len(cd_prompts) and cd_prompts.str.contains("<new1>").all()
    report = (tmp_path / "reports" / "smoke" / "report.md").read_text()
    assert "## Methods compared: dog" in report


@pytest.mark.slow
def test_eval_compile_reaches_every_evaluation_render(tmp_path, monkeypatch):
    """`eval.compile: false` (the way out of a failing compiled path) governs base-model and snapshot images."""
    import harness.execute as execute_module
    import harness.prepare as prepare_module

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "protocols").mkdir()
    text = (REPO / "protocols" / "smoke.yaml").read_text()
    text = text.replace("steps: [2, 4]\n  num_class_images: [2, 4]", "steps: [2]\n  num_class_images: [2]")
    text = text.replace("  bootstrap_samples: 200\n", "  bootstrap_samples: 200\n  compile: false\n")
    (tmp_path / "protocols" / "smoke.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    seen = []
    for module in (execute_module, prepare_module):
        real = module.generate

        def recording(*args, _real=real, **kwargs):
            seen.append(kwargs.get("compile", "auto"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "generate", recording)
    assert main(["protocols/smoke.yaml"]) == 0
    assert len(seen) == 3 and set(seen) == {False}  # the base model, then each run's snapshot at step 2
