"""The command line: what a user can type ends with a message and the README's exit status, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import __version__
from run_experiment import main
from tests.conftest import REPO


@pytest.fixture
def study(tmp_path, monkeypatch) -> Path:
    """An empty study folder holding the example subjects and the smoke protocol, as the working directory."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "protocols").mkdir()
    shutil.copy(REPO / "protocols" / "smoke.yaml", tmp_path / "protocols" / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0)


def test_help_lists_every_exit_status(capsys):
    assert _exit(["--help"]) == 0
    out = capsys.readouterr().out
    for status, meaning in (("0", "succeeded"), ("1", "a run failed"), ("2", "setup error"), ("130", "interrupted")):
        assert any(line.split()[:1] == [status] and meaning in line for line in out.splitlines()), (status, out)


def test_version(capsys):
    assert _exit(["--version"]) == 0
    assert capsys.readouterr().out.strip().endswith(__version__)


def test_a_misspelt_device_is_refused_before_anything_is_read(study, capsys):
    assert _exit(["protocols/smoke.yaml", "--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus' is not a device name" in err and "cuda:N" in err
    assert sorted(p.name for p in study.iterdir()) == ["examples", "protocols"]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_setup_error_before_any_work(study, capsys, monkeypatch, device):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["protocols/smoke.yaml", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: torch sees no CUDA GPU" in err and "--device cpu" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in study.iterdir()) == ["examples", "protocols"]  # no cache, no run folder


def test_a_gpu_number_beyond_the_machine_is_a_setup_error(study, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert main(["protocols/smoke.yaml", "--device", "cuda:2"]) == 2
    assert "there is no GPU number 2: torch sees 2 (cuda:0 to cuda:1)" in capsys.readouterr().err


def test_dry_run_checks_the_only_keys(study, capsys):
    assert main(["protocols/smoke.yaml", "--dry-run", "--only", "zzz"]) == 2
    captured = capsys.readouterr()
    assert "--only zzz: no such run key in protocol 'smoke'" in captured.err
    assert "Runs (" not in captured.out  # the plan is not printed as if the key were fine


def test_dry_run_with_a_known_only_key_prints_the_plan(study, capsys):
    from harness.config import load_protocol
    from harness.grid import expand

    key = expand(load_protocol(study / "protocols" / "smoke.yaml"))[0].run_key
    assert main(["protocols/smoke.yaml", "--dry-run", "--only", key]) == 0
    assert key in capsys.readouterr().out


def test_a_near_miss_only_key_gets_a_suggestion(study, capsys):
    from harness.config import load_protocol
    from harness.grid import expand

    key = expand(load_protocol(study / "protocols" / "smoke.yaml"))[0].run_key
    assert main(["protocols/smoke.yaml", "--dry-run", "--only", key[:-1] + "x"]) == 2
    assert f"did you mean {key}?" in capsys.readouterr().err


def test_a_binary_file_as_the_protocol(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main([str(binary), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{binary}: 1 problem(s)" in err and "is not a text file (it is not UTF-8)" in err
    assert "Traceback" not in err


def test_a_folder_as_the_protocol(tmp_path, capsys):
    assert main([str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a protocol file" in err and "not found" not in err


def test_a_missing_protocol_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "protocol file not found" in capsys.readouterr().err


@pytest.fixture
def gif_study(tmp_path, monkeypatch) -> Path:
    """A study whose subject has three photos and an animated GIF."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "subject"
    folder.mkdir()
    for seed in range(3):
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{seed}.jpg")
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue", "green")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (tmp_path / "p.yaml").write_text(
        "model: {id: tiny}\nsubjects:\n  - {name: dog, instance_dir: subject, class_noun: dog}\n"
        "train: {resolution: 32}\neval: {backbones: tiny}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _gif_notes(capsys, caplog) -> int:
    captured = capsys.readouterr()
    return sum(text.count("has 3 frames") for text in (captured.out, captured.err, caplog.text))


def test_the_animated_gif_note_is_shown_once_by_the_dry_run(gif_study, capsys, caplog):
    assert main(["p.yaml", "--dry-run"]) == 0
    assert _gif_notes(capsys, caplog) == 1


def test_the_animated_gif_note_is_shown_once_by_a_run(gif_study, capsys, caplog, monkeypatch):
    import harness.execute as execute
    import harness.prepare as prepare

    for stage in ("grow_pool", "score_real_images", "score_base_model"):  # no model: the images are prepared
        monkeypatch.setattr(prepare, stage, lambda *args, **kwargs: None)
    monkeypatch.setattr(execute, "execute_run", lambda study, run: (execute.DONE, f"{run.run_key}: skipped"))
    assert main(["p.yaml"]) == 1  # the stubbed run trained nothing: it is reported as unfinished
    assert (gif_study / "cache" / "instances").is_dir()  # the images were prepared (checked a second time)
    assert _gif_notes(capsys, caplog) == 1


def test_two_protocol_files_with_one_name_never_share_outputs(study, capsys):
    original = (study / "protocols" / "smoke.yaml").read_text()
    (study / "protocols" / "copy.yaml").write_text(original)  # `name: smoke` kept
    assert main(["protocols/smoke.yaml", "--report-only"]) == 0
    written = {p: p.read_bytes() for p in (study / "results" / "smoke").iterdir()}
    capsys.readouterr()
    for extra in (["--dry-run"], ["--report-only"], []):
        assert main(["protocols/copy.yaml", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert f"'smoke' is also the name of {study / 'protocols' / 'smoke.yaml'}" in err
        assert "Give this protocol another name" in err
    assert {p: p.read_bytes() for p in (study / "results" / "smoke").iterdir()} == written
    (study / "protocols" / "copy.yaml").write_text(original.replace("name: smoke", "name: smoke_copy"))
    assert main(["protocols/copy.yaml", "--dry-run"]) == 0


def test_a_moved_study_or_a_renamed_protocol_keeps_its_outputs(study, tmp_path, monkeypatch):
    assert main(["protocols/smoke.yaml", "--report-only"]) == 0
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(study, moved)
    monkeypatch.chdir(moved)
    assert main(["protocols/smoke.yaml", "--report-only"]) == 0  # the record resolves relative to the folder
    (moved / "protocols" / "smoke.yaml").rename(moved / "protocols" / "renamed.yaml")
    assert main(["protocols/renamed.yaml", "--report-only"]) == 0  # the old file is gone: no conflict
    owner = json.loads((moved / "results" / "smoke" / "owner.json").read_text())
    assert owner["protocol_file"] == "../../protocols/renamed.yaml"
