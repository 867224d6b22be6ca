"""Results CSVs from fabricated records: columns, one row per snapshot, round trips, byte-identical rewrites,
corrupt records named, failed runs, references and metadata."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from harness import __version__
from harness.config import load_protocol
from harness.metrics import metric_names
from harness.records import RecordError
from harness.results import (
    Records,
    columns_markdown,
    load_records,
    runs_columns,
    runs_columns_doc,
    train_columns,
    write_results,
)
from tests.fake_records import (
    BASE_VALUES,
    SCORES_NAME,
    TRAINABLE,
    fabricate_study,
    metric_value,
    smoke_like,
    write_references,
)


@pytest.fixture
def protocol(write_protocol):
    return load_protocol(write_protocol(smoke_like()))


def _write(protocol, tmp_path: Path, **kwargs) -> tuple[Path, object]:
    study = fabricate_study(protocol, tmp_path, **kwargs)
    records = load_records(study.run_folders, study.score_files)
    return write_results(protocol, study.runs, records, tmp_path / "results", timings={"train": 12.5}), study


# The headers of a study's CSVs: users' notebooks read these columns, so they change only on purpose.
RUNS_HEADER = [
    'protocol', 'subject', 'class_noun', 'identifier', 'run_key', 'method', 'step', 'run_steps', 'varied',
    'learning_rate', 'lr_schedule', 'lr_warmup_steps', 'batch_size', 'resolution', 'seed', 'prior_loss_weight',
    'num_class_images', 'mixed_precision', 'gradient_checkpointing', 'optimizer', 'adam_beta1', 'adam_beta2',
    'adam_weight_decay', 'adam_epsilon', 'max_grad_norm', 'train_text_encoder', 'rank', 'alpha', 'target_modules',
    'dropout', 'modifier_token', 'initializer_token', 'freeze_model', 'memory_mode', 'snr_gamma', 'offset_noise',
    'checkpoint_every', 'save', 'dino', 'dino_ci_low', 'dino_ci_high', 'dino_n', 'clip_i', 'clip_i_ci_low',
    'clip_i_ci_high', 'clip_i_n', 'clip_t', 'clip_t_ci_low', 'clip_t_ci_high', 'clip_t_n', 'pres', 'pres_ci_low',
    'pres_ci_high', 'pres_n', 'div_subject', 'div_subject_ci_low', 'div_subject_ci_high', 'div_subject_n',
    'div_class', 'div_class_ci_low', 'div_class_ci_high', 'div_class_n', 'div_lpips', 'div_lpips_ci_low',
    'div_lpips_ci_high', 'div_lpips_n', 'div_lpips_class', 'div_lpips_class_ci_low', 'div_lpips_class_ci_high',
    'div_lpips_class_n', 'clip_t_clipscore', 'clip_t_clipscore_ci_low', 'clip_t_clipscore_ci_high',
    'clip_t_clipscore_n', 'clip_t_x100', 'clip_t_x100_ci_low', 'clip_t_x100_ci_high', 'clip_t_x100_n', 'status',
    'error', 'error_phase', 'train_seconds', 'seconds_per_step', 'sampling_seconds', 'scoring_seconds',
    'peak_memory_gib', 'trainable_params', 'artifact_bytes', 'device', 'optimizer_used', 'clip_backbone',
    'dino_backbone', 'lpips_backbone', 'eval_sampler', 'eval_steps', 'eval_guidance_scale', 'eval_resolution',
    'eval_seeds', 'model_id', 'model_revision', 'harness_version',
]
IMAGES_HEADER = [
    'source', 'protocol', 'subject', 'run_key', 'step', 'prompt', 'prompt_kind', 'seed', 'path', 'dino', 'clip_i',
    'clip_t', 'pres', 'div_subject', 'div_class', 'div_lpips', 'div_lpips_class', 'clip_t_clipscore', 'clip_t_x100',
]
REFERENCES_HEADER = [
    'reference', 'protocol', 'subject', 'class_noun', 'step', 'dino', 'dino_ci_low', 'dino_ci_high', 'dino_n',
    'clip_i', 'clip_i_ci_low', 'clip_i_ci_high', 'clip_i_n', 'clip_t', 'clip_t_ci_low', 'clip_t_ci_high', 'clip_t_n',
    'pres', 'pres_ci_low', 'pres_ci_high', 'pres_n', 'div_subject', 'div_subject_ci_low', 'div_subject_ci_high',
    'div_subject_n', 'div_class', 'div_class_ci_low', 'div_class_ci_high', 'div_class_n', 'div_lpips',
    'div_lpips_ci_low', 'div_lpips_ci_high', 'div_lpips_n', 'div_lpips_class', 'div_lpips_class_ci_low',
    'div_lpips_class_ci_high', 'div_lpips_class_n', 'clip_t_clipscore', 'clip_t_clipscore_ci_low',
    'clip_t_clipscore_ci_high', 'clip_t_clipscore_n', 'clip_t_x100', 'clip_t_x100_ci_low', 'clip_t_x100_ci_high',
    'clip_t_x100_n', 'sampling_seconds', 'scoring_seconds', 'clip_backbone', 'dino_backbone', 'lpips_backbone',
    'eval_sampler', 'eval_steps', 'eval_guidance_scale', 'eval_resolution', 'eval_seeds', 'model_id',
    'model_revision', 'harness_version',
]


def test_runs_csv_has_the_documented_columns_and_one_row_per_run_and_snapshot(protocol, tmp_path):
    folder, study = _write(protocol, tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    assert list(runs.columns) == RUNS_HEADER
    assert len(study.runs) == 3 and len(runs) == 6  # 3 runs x snapshots 2 and 4
    assert sorted(zip(runs["run_key"], runs["step"], strict=True)) == sorted(
        (r.run_key, s) for r in study.runs for s in r.snapshot_steps)
    assert list(pd.read_csv(folder / "images.csv").columns) == IMAGES_HEADER
    assert list(pd.read_csv(folder / "references.csv").columns) == REFERENCES_HEADER


def test_values_round_trip_through_read_csv(protocol, tmp_path):
    folder, study = _write(protocol, tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    assert runs["step"].dtype.kind == "i" and runs["num_class_images"].dtype.kind == "i"
    assert runs["learning_rate"].dtype.kind == "f" and runs["gradient_checkpointing"].dtype == bool
    for run in study.runs:
        row = runs[(runs["run_key"] == run.run_key) & (runs["step"] == 4)].iloc[0]
        mean, low, high = metric_value("dino", run.train.prior_loss_weight, run.train.num_class_images, 1.0)
        assert (row["dino"], row["dino_ci_low"], row["dino_ci_high"], row["dino_n"]) == (mean, low, high, 8)
        assert row["prior_loss_weight"] == run.train.prior_loss_weight
        assert row["num_class_images"] == run.train.num_class_images
        assert row["run_steps"] == 4 and row["learning_rate"] == 1e-4 and row["seed"] == 0
        assert row["varied"] == "prior_loss_weight,num_class_images"
        assert row["status"] == "ok" and pd.isna(row["error"])
        assert row["peak_memory_gib"] == 9.5 and row["seconds_per_step"] == 0.25 and row["train_seconds"] == 4.0
        assert row["trainable_params"] == TRAINABLE["dreambooth"] and row["identifier"] == "sks"
        assert row["artifact_bytes"] == 2 * TRAINABLE["dreambooth"] and pd.isna(row["rank"])
        assert (row["sampling_seconds"], row["scoring_seconds"]) == (1.5, 0.25)
        assert row["clip_backbone"] == "tiny-clip-0 (random weights)"
        assert (row["model_id"], row["eval_seeds"], row["harness_version"]) == ("tiny", "0 1", __version__)
        assert pd.isna(row["div_lpips"]) and pd.isna(row["div_lpips_n"])  # unavailable: empty, not 0


def test_a_second_write_is_byte_identical_and_rebuilt_not_appended(protocol, tmp_path):
    study = fabricate_study(protocol, tmp_path)
    records = load_records(study.run_folders, study.score_files)
    first = write_results(protocol, study.runs, records, tmp_path / "a")
    shuffled_runs = random.Random(1).sample(study.runs, len(study.runs))
    shuffled = Records(scores=tuple(random.Random(2).sample(records.scores, len(records.scores))), runs=records.runs)
    second = write_results(protocol, shuffled_runs, shuffled, tmp_path / "b")
    for name in ("runs.csv", "images.csv", "references.csv", "metadata.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    write_results(protocol, study.runs[:1], records, first)
    assert len(pd.read_csv(first / "runs.csv")) == 2  # the folder is rebuilt from what is given, never appended
    assert not list(first.glob("*.tmp")) and not list(first.glob(".*"))


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda d: "{ not json", "is not valid JSON"),
    (lambda d: json.dumps({**d, "kind": "snapshots"}), "kind must be one of"),
    (lambda d: json.dumps({**d, "metrics": {"dino": {"mean": 0.5}}}), "metrics.dino lacks ci_low, ci_high, n"),
    (lambda d: json.dumps({**d, "metrics": {"dino": {**d["metrics"]["dino"], "mean": "high"}}}),
     "metrics.dino.mean must be a finite number"),
    (lambda d: json.dumps({**d, "schema": 7}), "has schema 7"),
])
def test_a_corrupt_record_raises_an_error_naming_the_file(protocol, tmp_path, damage, expected):
    study = fabricate_study(protocol, tmp_path)
    target = study.score_files[1]
    target.write_text(damage(json.loads(target.read_text())))
    with pytest.raises(RecordError) as caught:
        load_records(study.run_folders, study.score_files)
    assert str(target) in str(caught.value) and expected in str(caught.value)
    assert caught.value.path == target.resolve()
    assert "run the protocol again" in str(caught.value)


def test_a_corrupt_train_record_is_named(protocol, tmp_path):
    study = fabricate_study(protocol, tmp_path)
    train = study.run_folders[0] / "train.json"
    train.write_text('{"wall_seconds": "slow"}')
    with pytest.raises(RecordError, match=r"train\.json: wall_seconds must be a finite number"):
        load_records(study.run_folders, study.score_files)


def test_a_failed_run_keeps_its_scored_snapshots_and_shows_its_error(protocol, tmp_path):
    folder, study = _write(protocol, tmp_path, fail_run=2)
    runs = pd.read_csv(folder / "runs.csv")
    failed = runs[runs["run_key"] == study.runs[2].run_key].set_index("step")
    assert failed.loc[2, "status"] == "ok" and not pd.isna(failed.loc[2, "dino"])
    assert failed.loc[4, "status"] == "failed" and pd.isna(failed.loc[4, "dino"])
    assert failed.loc[4, "error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failed.loc[4, "error_phase"] == "train"
    assert pd.isna(failed.loc[4, "train_seconds"])  # no train.json for a run that raised
    assert (runs[runs["run_key"] != study.runs[2].run_key]["status"] == "ok").all()


def test_a_run_without_records_is_missing(protocol, tmp_path):
    study = fabricate_study(protocol, tmp_path)
    records = load_records(study.run_folders[:2], [f for f in study.score_files if study.runs[2].run_key not in
                                                   str(f)])
    runs = pd.read_csv(write_results(protocol, study.runs, records, tmp_path / "out") / "runs.csv")
    assert list(runs[runs["run_key"] == study.runs[2].run_key]["status"]) == ["missing", "missing"]


def test_images_csv_has_one_row_per_image_with_relative_paths_and_scores(protocol, tmp_path):
    folder, study = _write(protocol, tmp_path, fail_run=2)
    images = pd.read_csv(folder / "images.csv")
    per_snapshot = (2 + 2) * 2  # (subject + class prompts) x seeds
    assert (images["source"] == "snapshot").sum() == 5 * per_snapshot  # one snapshot of the failed run missing
    assert (images["source"] == "base_model").sum() == per_snapshot
    assert (images["source"] == "real_images").sum() == 4
    assert list(images["source"].drop_duplicates()) == ["real_images", "base_model", "snapshot"]
    assert all(not Path(p).is_absolute() and (folder / p).is_file() for p in images["path"])
    snap = images[(images["source"] == "snapshot") & (images["run_key"] == study.runs[0].run_key)
                  & (images["step"] == 4)]
    subject_rows = snap[snap["prompt_kind"] == "subject"]
    assert set(subject_rows["prompt"]) == {"a sks dog in the jungle", "a sks dog in the snow"}
    assert set(subject_rows["seed"]) == {0, 1}
    assert (subject_rows["dino"] == metric_value("dino", 0.0, 0, 1.0)[0]).all()
    assert snap[snap["prompt_kind"] == "class"]["dino"].isna().all()
    assert snap[snap["prompt_kind"] == "class"]["pres"].notna().all()


def test_references_csv_has_real_images_then_base_model(protocol, tmp_path):
    folder, _ = _write(protocol, tmp_path)
    refs = pd.read_csv(folder / "references.csv")
    assert list(refs["reference"]) == ["real_images", "base_model"]
    base = refs.iloc[1]
    assert (base["pres"], base["pres_ci_low"], base["pres_ci_high"]) == BASE_VALUES["pres"]
    assert base["step"] == 0 and pd.isna(refs.iloc[0]["step"]) and pd.isna(refs.iloc[0]["clip_t"])


def test_this_protocols_reference_wins_and_duplicates_are_named(protocol, tmp_path):
    study = fabricate_study(protocol, tmp_path)
    foreign = write_references(protocol, "dog", tmp_path / "foreign", {
        "clip": {"backbone": "x"}, "dino": {"backbone": "y"}}, {"pres": (0.9, 0.8, 1.0)})
    record = json.loads(foreign[0].read_text())
    foreign[0].write_text(json.dumps({**record, "protocol": "another_protocol"}))
    records = load_records(study.run_folders, [*study.score_files, foreign[0]])
    refs = pd.read_csv(write_results(protocol, study.runs, records, tmp_path / "out") / "references.csv")
    assert refs[refs["reference"] == "base_model"]["pres"].item() == BASE_VALUES["pres"][0]
    duplicate = tmp_path / "dup" / SCORES_NAME
    duplicate.parent.mkdir()
    duplicate.write_text(json.dumps({**record, "protocol": protocol.name}))
    records = load_records(study.run_folders, [*study.score_files, duplicate])
    with pytest.raises(RecordError, match="second reference record") as caught:
        write_results(protocol, study.runs, records, tmp_path / "out")
    assert "base_model" in str(caught.value) and str(tmp_path) in str(caught.value)


def test_metadata_records_backbones_scales_versions_and_timings(protocol, tmp_path):
    folder, _ = _write(protocol, tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["harness_version"] == __version__ and meta["protocol"] == "smoke"
    assert meta["pipeline_check_only"] is True and "tiny" in meta["pipeline_check_reason"]
    assert meta["backbones"]["dino"]["label"] == "tiny-dino-0 (random weights)"
    assert meta["metrics"]["dino"]["scale"] == "raw cosine" and meta["metrics"]["pres"]["higher_is_better"] is False
    assert meta["metrics"]["div_lpips"]["notes"] == ["LPIPS weights are not available offline"]
    assert meta["grid"] == [["prior_loss_weight", [0.0, 1.0]], ["steps", [2, 4]], ["num_class_images", [2, 4]]]
    assert meta["timings"] == {"train": 12.5} and meta["devices"] == ["NVIDIA H100 80GB HBM3"]
    assert meta["columns"]["runs.csv"] == runs_columns() == RUNS_HEADER


def test_metadata_says_how_every_metric_is_computed(protocol, tmp_path):
    folder, _ = _write(protocol, tmp_path)
    metrics = json.loads((folder / "metadata.json").read_text())["metrics"]
    assert set(metrics) == set(metric_names())
    clip_t, dino, clipscore = metrics["clip_t"], metrics["dino"], metrics["clip_t_clipscore"]
    assert (clip_t["pairing"], clip_t["negative_cosines"], clip_t["identifier"], clip_t["backbone_role"]) == (
        "one to one: each subject-prompt image with its own prompt", "kept", "removed before encoding", "clip")
    assert clip_t["backbone"] == "tiny-clip-0 (random weights)"
    assert clip_t["backbone_details"] == {"backbone": "tiny-clip-0", "pretrained": "random (tiny, pipeline check only)"}
    assert dino["real_images_row"].startswith("leave-one-out") and dino["identifier"] == "no prompt text"
    assert clipscore["negative_cosines"] == "clipped to 0: max(cos, 0)" and clipscore["scale"].startswith("2.5 x")
    assert clipscore["notes"] == ["not in eval.metrics; add it there to compute it"]
    assert metrics["div_lpips"]["backbone_role"] == "lpips" and metrics["div_lpips"]["negative_cosines"] == \
        "not a cosine"


def test_real_model_and_backbones_are_not_a_pipeline_check(write_protocol, tmp_path):
    real = load_protocol(write_protocol(smoke_like(tiny=False)))
    folder, _ = _write(real, tmp_path, tiny_backbones=False)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["pipeline_check_only"] is False and meta["pipeline_check_reason"] is None
    assert pd.read_csv(folder / "runs.csv")["dino_backbone"].iloc[0] == "timm:vit_small_patch16_224.dino"


def test_columns_markdown_lists_every_documented_column():
    doc = runs_columns_doc()
    table = columns_markdown(doc)
    assert table.startswith("| column | meaning |\n|---|---|\n")
    for column in doc:
        assert f"`{column}`" in table
    assert table.count("\n") == len(doc) - len(train_columns()) + 1 + 2


def test_relative_image_paths_resolve_beside_the_record_or_from_the_working_directory(protocol, tmp_path,
                                                                                       monkeypatch):
    study = fabricate_study(protocol, tmp_path)
    record_path = study.score_files[0]
    record = json.loads(record_path.read_text())
    first, second = record["images"][0], record["images"][1]
    first["path"] = str(Path(first["path"]).relative_to(record_path.parent))
    second["path"] = str(Path(second["path"]).relative_to(tmp_path))
    record_path.write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    loaded = load_records([], [record_path]).scores[0]
    assert loaded.images[0].path.is_file() and loaded.images[1].path.is_file()
    assert loaded.images[1].path == (tmp_path / second["path"]).resolve()


def test_every_method_fills_its_own_setting_columns_and_leaves_the_others_empty(write_protocol, tmp_path):
    text = smoke_like().replace("grid:\n", "grid:\n  method: [dreambooth, lora, custom_diffusion]\n")
    protocol = load_protocol(write_protocol(text + "lora: {rank: 8}\n"))
    folder, _ = _write(protocol, tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    rows = {m: runs[(runs["method"] == m) & (runs["step"] == 4)].iloc[0] for m in ("dreambooth", "lora",
                                                                                    "custom_diffusion")}
    assert rows["lora"]["rank"] == 8 and rows["lora"]["target_modules"] == "to_q to_k to_v to_out.0"
    assert pd.isna(rows["lora"]["modifier_token"]) and pd.isna(rows["dreambooth"]["rank"])
    cd = rows["custom_diffusion"]
    assert (cd["modifier_token"], cd["initializer_token"], cd["identifier"]) == ("<new1>", "sks", "<new1>")
    assert pd.isna(cd["train_text_encoder"]) and pd.isna(cd["rank"])
    assert {m: rows[m]["trainable_params"] for m in rows} == TRAINABLE
    assert runs["varied"].iloc[0] == "method,prior_loss_weight,num_class_images"
    images = pd.read_csv(folder / "images.csv")
    snapshot = images[(images["run_key"] == cd["run_key"]) & (images["prompt_kind"] == "subject")]
    assert len(snapshot) and snapshot["prompt"].str.contains("<new1>").all()
