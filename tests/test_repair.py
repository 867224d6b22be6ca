"""Damaged derived files: each is recognised when read, named in one log line, made again from its inputs (images
pixel for pixel), and the study goes on to the same CSVs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.config import load_protocol
from harness.embedders import EmbeddingCache, as_rgb, content_hash
from harness.grid import expand
from harness.records import usable_scores
from harness.results.columns import TIMING_COLUMNS
from harness.store import png_problem
from run_experiment import main
from tests.conftest import REPO


def untimed(csv: Path) -> pd.DataFrame:
    table = pd.read_csv(csv)
    return table.drop(columns=[c for c in TIMING_COLUMNS if c in table.columns])


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_png_problem_catches_a_cut_short_or_resized_png(tmp_path):
    from PIL import Image

    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(png)
    size = png.stat().st_size
    assert png_problem(png, size) is None and png_problem(png) is None
    assert png_problem(png, size + 1) == f"has {size} bytes where {size + 1} were written"
    cut(png)
    assert png_problem(png) == "is cut short (no PNG end marker)"
    assert png_problem(tmp_path / "b.png") == "is missing"


def test_a_damaged_scores_record_is_named_and_removed(tmp_path, caplog):
    record = tmp_path / "scores-x.json"
    record.write_text('{"schema": 1, "kind": "snap')
    with caplog.at_level("WARNING"):
        assert usable_scores(record) is None
    assert not record.exists()
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{record} is not valid JSON (") and message.endswith("; it will be made again.")


@pytest.mark.slow
def test_every_kind_of_damaged_file_is_made_again_and_the_csvs_do_not_change(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "examples" / "subjects" / "dog", tmp_path / "examples" / "subjects" / "dog")
    (tmp_path / "protocols").mkdir()
    shutil.copy(REPO / "protocols" / "smoke.yaml", tmp_path / "protocols" / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["protocols/smoke.yaml"]) == 0
    results = tmp_path / "results" / "smoke"
    before = {name: untimed(results / name) for name in ("runs.csv", "images.csv", "references.csv")}
    runs = expand(load_protocol(tmp_path / "protocols" / "smoke.yaml"))
    by_prior = {(r.train.prior_loss_weight, r.train.num_class_images): r.run_key for r in runs}
    no_prior, two, four = by_prior[(0.0, 0)], by_prior[(1.0, 2)], by_prior[(1.0, 4)]
    cache, run_dir = Path("cache"), Path("runs")

    def one(pattern: str) -> Path:
        found = sorted(Path().glob(pattern))
        assert found, pattern
        return found[0]

    # The table of damages: (file, what is done to it), each in a place the next invocation reads.
    snapshot_scores = one(f"runs/{no_prior}/samples/*/step-000004/scores-*.json")
    reference_scores = one("cache/references/real-*/scores-*.json")
    deleted_sample = one(f"runs/{no_prior}/samples/*/step-000002/subject-00-seed0.png")
    cut_sample = one(f"runs/{two}/samples/*/step-000004/class-00-seed0.png")
    class_image = one("cache/class_images/*/000001.png")
    instance_png = one("cache/instances/*/00.png")
    latent = one("cache/latents/*.safetensors")
    text = one("cache/text/*.safetensors")
    real_photo = sorted((tmp_path / "examples" / "subjects" / "dog").glob("*.jpg"))[0]
    embedding = EmbeddingCache(cache).path("tiny-random:dino", content_hash(as_rgb(real_photo)))
    train_json = run_dir / two / "train.json"
    spec_json = run_dir / no_prior / "spec.json"
    originals = {p: p.read_bytes() for p in (deleted_sample, cut_sample, class_image, instance_png)}

    for path in (snapshot_scores, reference_scores, cut_sample, class_image, instance_png, latent, text, embedding,
                 train_json, spec_json):
        cut(path)
    deleted_sample.unlink()
    shutil.rmtree(run_dir / four)  # this run trains again: it reads the latents, class images and instance images
    capsys.readouterr()

    assert main(["protocols/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    for path in (snapshot_scores, reference_scores, deleted_sample, cut_sample, class_image, instance_png, latent,
                 text, embedding, train_json, spec_json):
        assert out.count(str(path)) == 1, (path, out)
    for path, data in originals.items():
        assert path.read_bytes() == data, f"{path} was not rendered again pixel for pixel"
    for path in (snapshot_scores, reference_scores):
        assert usable_scores(path) is not None
    for name, table in before.items():
        pd.testing.assert_frame_equal(untimed(results / name), table, check_exact=True, obj=name)
    assert "run(s) failed" not in out
