"""The markdown report from fabricated results: links resolve, the pipeline-check banner, best values and ties,
the verdict, failed runs, and image grids that put each image in its cell."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from harness.config import load_protocol
from harness.report import BANNER, LABEL_WIDTH, PAD, TIED, TILE, compose_grid, write_report
from harness.results import load_records, write_results
from tests.fake_records import fabricate_study, metric_value, smoke_like

LINK = re.compile(r"!?\[[^\]]*\]\(([^)]+)\)")


def _report(protocol, tmp_path: Path, **kwargs) -> tuple[str, Path]:
    study = fabricate_study(protocol, tmp_path, **kwargs)
    records = load_records(study.run_folders, study.score_files)
    results = write_results(protocol, study.runs, records, tmp_path / "results" / protocol.name)
    path = write_report(protocol, results, tmp_path / "reports" / protocol.name)
    return path.read_text(), path.parent


@pytest.fixture
def tiny(write_protocol):
    return load_protocol(write_protocol(smoke_like()))


@pytest.fixture
def real(write_protocol):
    return load_protocol(write_protocol(smoke_like(name="study", tiny=False), name="real.yaml"))


@pytest.fixture(autouse=True)
def figures_left_undrawn(request, monkeypatch):
    """Drawing the report's figures into PNGs is most of a report's time, and most tests read only its text or the
    Figure objects; those get a one-pixel PNG in each figure's place. Tests that ask for `rendered` draw them."""
    if "rendered" in request.fixturenames:
        return
    import harness.report.figures as figures

    def placeholder(figure, path: Path) -> Path:
        Image.new("RGB", (1, 1)).save(path)
        return path

    monkeypatch.setattr(figures, "_save", placeholder)


@pytest.fixture
def rendered():
    """Asks figures_left_undrawn to leave the figures' real drawing in place."""


def _row(text: str, label: str, step: int) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {label} | {step} |"))


def test_every_linked_plot_and_grid_exists_and_links_are_relative(tiny, tmp_path, rendered):
    text, folder = _report(tiny, tmp_path)
    links = LINK.findall(text)
    images = [link for link in links if link.endswith(".png")]
    names = {Path(link).name for link in images}
    assert names == {"dog_metrics_vs_steps.png", "dog_frontier.png", "dog_diversity.png", "dog_grid_subject.png",
                     "dog_grid_class.png"}
    for link in links:
        assert not Path(link).is_absolute() and (folder / link).is_file(), link
    for link in images:
        with Image.open(folder / link) as image:
            assert image.width >= 600 and image.height >= 300


def test_banner_for_tiny_models_and_none_for_real_ones(tiny, real, tmp_path):
    text, _ = _report(tiny, tmp_path / "tiny")
    assert text.splitlines()[2].startswith(f"> **{BANNER}.**")
    text, _ = _report(real, tmp_path / "real", tiny_backbones=False)
    assert BANNER not in text and "random weights" not in text
    assert "`open_clip:ViT-B-32/openai`" in text


def test_tiny_backbones_alone_bring_the_banner(write_protocol, tmp_path):
    protocol = load_protocol(write_protocol(smoke_like(tiny=False).replace("backbones: real", "backbones: tiny")))
    text, _ = _report(protocol, tmp_path)
    assert BANNER in text and "metric backbones are tiny random networks" in text


def test_the_best_value_is_bold_and_ties_are_said(tiny, tmp_path):
    text, _ = _report(tiny, tmp_path)
    best = metric_value("dino", 0.0, 0, 1.0)  # no prior, last step: the highest DINO of the fabricated grid
    assert f"**{best[0]:.3f} [{best[1]:.3f}, {best[2]:.3f}]**" in _row(text, "w=0", 4)
    tied = metric_value("dino", 1.0, 4, 1.0)
    assert f"{tied[0]:.3f} [{tied[1]:.3f}, {tied[2]:.3f}] ≈" in _row(text, "w=1, n=4", 4)
    assert f"- DINO: best w=0 @ 4 ({best[0]:.3f} [{best[1]:.3f}, {best[2]:.3f}]), {TIED} with " in text
    assert "w=1, n=4 @ 4" in next(line for line in text.splitlines() if line.startswith("- DINO: best"))
    assert "*real images*" in text.splitlines()[text.splitlines().index(
        next(line for line in text.splitlines() if line.startswith("| configuration | step |"))) + 2]


def test_a_clear_winner_is_said_to_be_clear(tiny, tmp_path):
    text, _ = _report(tiny, tmp_path, overrides={(0, 4): {"dino": (0.95, 0.94, 0.96)}})
    assert "**0.950 [0.940, 0.960]**" in _row(text, "w=0", 4)
    assert "- DINO: best w=0 @ 4 (0.950 [0.940, 0.960]), clearly: its interval overlaps no other" in text
    assert "≈" not in "".join(line.split("|")[3] for line in text.splitlines() if line.startswith("| w="))


def test_verdict_picks_the_best_fidelity_within_the_base_models_drift(tiny, tmp_path):
    base = {"dino": (0.30, 0.27, 0.33), "clip_t": (0.32, 0.31, 0.33), "pres": (0.46, 0.44, 0.48)}
    text, _ = _report(tiny, tmp_path, base_values=base)
    verdict = text.split("## Verdict")[1].split("## Setup")[0]
    # Only the prior-preservation runs keep PRES <= 0.48; of those the 4-class-image run at step 4 has most DINO.
    assert "Best subject fidelity at acceptable drift" in verdict and "**w=1, n=4 @ 4**" in verdict
    assert f"On DINO it is {TIED} with w=1, n=2 @ 4" in verdict
    assert "The highest DINO overall, w=0 @ 4" in verdict and "pays for it with drift" in verdict
    assert "At step 4, prior preservation (w=1, n=4) lowers PRES" in verdict


def test_verdict_says_when_clip_t_falls(tiny, tmp_path):
    text, _ = _report(tiny, tmp_path, overrides={(0, 4): {"clip_t": (0.20, 0.19, 0.21)}})
    assert "- w=0: CLIP-T falls after step 2 (" in text and "0.200 [0.190, 0.210] at step 4" in text
    assert "- w=1, n=2: DINO keeps rising and CLIP-T holds up to step 4" in text


def test_a_failed_run_is_listed_with_its_error(tiny, tmp_path):
    text, _ = _report(tiny, tmp_path, fail_run=2)
    failures = text.split("## Failed runs")[1]
    assert "| w=1, n=4 | 4 | train | OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB |" in failures
    text, _ = _report(tiny, tmp_path / "ok")
    assert "All runs finished and were scored." in text.split("## Failed runs")[1]


def test_a_report_without_any_scored_snapshot_still_renders(tiny, tmp_path):
    study = fabricate_study(tiny, tmp_path)
    references = [f for f in study.score_files if "references" in f.parts]
    results = write_results(tiny, study.runs, load_records(study.run_folders, references), tmp_path / "results")
    text = write_report(tiny, results, tmp_path / "report").read_text()
    assert "Not scored yet (no result and no error)" in text
    assert "*base model (step 0)*" in text and not list((tmp_path / "report" / "figures").glob("*frontier*"))


def test_stale_figures_are_removed(tiny, tmp_path):
    _, folder = _report(tiny, tmp_path)
    stale = folder / "figures" / "old_subject_frontier.png"
    stale.write_bytes(b"")
    write_report(tiny, tmp_path / "results" / tiny.name, folder)
    assert not stale.exists() and (folder / "figures" / "dog_frontier.png").is_file()


def test_grid_puts_each_image_in_its_row_and_column(tmp_path):
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "grey": (128, 128, 128)}
    paths = {}
    for name, colour in colours.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (8, 8), colour).save(paths[name])
    grid = compose_grid("title", ["base model (step 0)", "step 2"],
                        [("w=0", [paths["grey"], paths["red"]]), ("w=1, n=2", [paths["grey"], None])],
                        strip=("real images", [paths["blue"]]))
    assert grid.width == LABEL_WIDTH + 2 * (TILE + PAD) + PAD

    def centre(row: int, column: int) -> tuple[int, int, int]:
        top = grid.height - PAD - (2 - row) * (TILE + PAD)  # rows are laid out upwards from the bottom edge
        return grid.getpixel((LABEL_WIDTH + column * (TILE + PAD) + TILE // 2, top + TILE // 3))

    assert centre(0, 0) == colours["grey"] and centre(0, 1) == colours["red"]
    assert centre(1, 0) == colours["grey"] and centre(1, 1) == (225, 225, 225)  # a missing image: a grey tile


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures and the image grids' notices of the report, as they are saved."""
    import harness.report.figures as figures
    import harness.report.grids as grids

    seen: dict[str, list] = {"figures": [], "notices": []}
    save, compose = figures._save, grids.compose_grid

    def keep_figure(figure, path):
        seen["figures"].append(figure)
        return save(figure, path)

    def keep_notice(*args, **kwargs):
        seen["notices"].append(kwargs.get("notice"))
        return compose(*args, **kwargs)

    monkeypatch.setattr(figures, "_save", keep_figure)
    monkeypatch.setattr(grids, "compose_grid", keep_notice)
    return seen


def test_figures_and_grids_of_a_tiny_study_carry_the_notice_themselves(tiny, real, tmp_path, drawn):
    _report(tiny, tmp_path / "tiny")
    assert len(drawn["figures"]) == 3 and len(drawn["notices"]) == 2
    for figure in drawn["figures"]:
        assert any(BANNER.split(":")[0] in text.get_text() for text in figure.texts), figure.texts
    assert drawn["notices"] == [f"{BANNER}."] * 2
    drawn["figures"].clear()
    drawn["notices"].clear()
    _report(real, tmp_path / "real", tiny_backbones=False)
    assert not any(BANNER.split(":")[0] in t.get_text() for f in drawn["figures"] for t in f.texts)
    assert drawn["notices"] == [None, None]


def test_series_with_the_same_values_stay_visible(tiny, tmp_path, drawn):
    same = {"dino": (0.5, 0.47, 0.53), "pres": (0.5, 0.47, 0.53)}
    # Both prior-preservation runs (table order: w=0, w=1 n=2, w=1 n=4) give the same numbers at every step.
    _report(tiny, tmp_path, overrides={(i, s): same for i in (1, 2) for s in (2, 4)})
    metrics_figure = drawn["figures"][0]
    lines = [line for line in metrics_figure.axes[0].get_lines() if line.get_marker() != "None"]  # not references
    assert len(lines) == 3
    assert len({line.get_marker() for line in lines}) == 3
    assert len({tuple(line.get_xdata()) for line in lines}) == 3  # side by side, not on top of each other
    frontier = drawn["figures"][1]
    markers = {tuple(c.get_paths()[0].vertices.round(3).flatten()) for c in frontier.axes[0].collections
               if len(c.get_offsets()) == 2}
    assert len(markers) == 3


def test_the_setup_states_the_dtype_the_study_ran_in(tiny, tmp_path):
    text, _ = _report(tiny, tmp_path / "cpu", device="cpu")
    assert "- Model: `tiny` (random weights), fp32 (ran on the CPU, which computes in fp32; model.dtype fp16 " \
           "applies on a GPU)." in text
    text, _ = _report(tiny, tmp_path / "gpu")
    assert "- Model: `tiny` (random weights), fp16." in text


def test_a_prior_that_raises_drift_is_said_to_raise_it(tiny, tmp_path):
    higher = {(1, 4): {"pres": (0.80, 0.77, 0.83)}, (2, 4): {"pres": (0.85, 0.82, 0.88)}}
    text, _ = _report(tiny, tmp_path, overrides=higher)
    verdict = text.split("## Verdict")[1].split("## Setup")[0]
    assert "At step 4, prior preservation (w=1, n=2) raises PRES from 0.670 [0.640, 0.700] to 0.800 " \
           "[0.770, 0.830] (intervals apart)." in verdict
    assert "does not lower" not in verdict


# --------------------------------------------------------------------------------------------------------------
# How every number was computed, and the paper's Table 1


def test_metric_definitions_say_pairing_scale_cosines_identifier_and_backbone(tiny, tmp_path):
    text, _ = _report(tiny, tmp_path)
    metrics = text.split("### Metrics")[1].split("## Results")[0]
    clip_t = next(line for line in metrics.splitlines() if line.startswith("| CLIP-T (`clip_t`)"))
    assert "| raw cosine (not x100, not x2.5) | one to one: each subject-prompt image with its own prompt | kept | " \
           "removed before encoding | — | tiny-clip-0 (random weights) |" in clip_t
    dino = next(line for line in metrics.splitlines() if line.startswith("| DINO (`dino`)"))
    assert "all pairs of a subject-prompt image and a real image" in dino and "| leave-one-out |" in dino
    clipscore = next(line for line in metrics.splitlines() if "(`clip_t_clipscore`)" in line)
    assert "*not computed*: not in eval.metrics" in clipscore and "clipped to 0: max(cos, 0)" in clipscore
    assert "| backbone role | model | weights | resize | crop | interpolation | normalisation | output |" in metrics


def test_the_paper_comparison_needs_the_papers_backbones(tiny, real, tmp_path):
    text, _ = _report(tiny, tmp_path / "tiny")
    assert "## Comparison with the DreamBooth paper" not in text
    text, _ = _report(real, tmp_path / "real", tiny_backbones=False, fail_run=2)
    section = text.split("## Comparison with the DreamBooth paper")[1].split("## Results")[0]
    assert "| *DreamBooth, Stable Diffusion (paper)* | 0.668 | 0.803 | 0.305 | 30 |" in section
    assert "| *real images (paper)* | 0.774 | 0.885 | — | 30 |" in section
    assert "| real images (this study) | 0.770 [0.770, 0.770] | — | — | 1 |" in section  # leave-one-out per image
    assert "| base model, step 0 (this study) | 0.300 [0.300, 0.300] | 0.500 [0.500, 0.500] | 0.300 " in section
    for label, weight, count, step in (("w=0", 0.0, 0, 4), ("w=1, n=2", 1.0, 2, 4), ("w=1, n=4", 1.0, 4, 2)):
        dino = metric_value("dino", weight, count, step / 4)[0]  # every subject image of the fake scores this
        assert f"| {label} @ {step} (this study) | {dino:.3f} [{dino:.3f}, {dino:.3f}] | {dino + 0.2:.3f} " in section
    assert "w=1, n=4 @ 4" not in section  # the failed run has no step 4: not every subject was scored there


METHODS_STUDY = """
name: methods
model: {id: tiny}
subjects:
  - {name: dog, instance_dir: "{subject_dir}", class_noun: dog}
train: {resolution: 32}
eval: {backbones: tiny, seeds: [0, 1], class_prompts: ["a {class}"], max_subject_prompts: 2, bootstrap_samples: 200}
grid:
  method: [dreambooth, lora, custom_diffusion]
  prior_loss_weight: [0.0, 1.0]
  steps: [2, 4]
"""
# Table order of the runs: custom_diffusion, dreambooth, lora (by name), each w=0 then w=1.
ACCEPTABLE = {(1, 4): {"dino": (0.60, 0.57, 0.63), "pres": (0.41, 0.38, 0.44)},
              (5, 4): {"dino": (0.62, 0.59, 0.65), "pres": (0.42, 0.39, 0.45)},
              (3, 2): {"pres": (0.47, 0.44, 0.50)}}  # dreambooth drifts everywhere (its w=1 @ 4: PRES 0.445)


def test_the_method_comparison_appears_only_when_the_study_varies_the_method(tiny, write_protocol, tmp_path):
    text, _ = _report(tiny, tmp_path / "one")
    assert "## Methods compared" not in text
    protocol = load_protocol(write_protocol(METHODS_STUDY, "methods.yaml"))
    text, folder = _report(protocol, tmp_path / "three", overrides=ACCEPTABLE)
    section = text.split("## Methods compared: dog")[1].split("## Results: dog")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and "@" in line]
    assert [line.split(" | ")[0] for line in table] == ["| dreambooth", "| lora", "| custom_diffusion"]
    assert "| lora | w=1 @ 4 | 4 | 0.620 [0.590, 0.650] |" in section
    assert "| custom_diffusion | w=1 @ 4 | 4 | 0.600 [0.570, 0.630] |" in section
    assert "| dreambooth | *w=1 @ 4* | 4 |" in section  # every snapshot drifts: its least drifting one, in italics
    assert ("- Best subject fidelity at acceptable drift: **lora** (DINO 0.620 [0.590, 0.650]); "
            f"{TIED} with custom_diffusion (0.600 [0.570, 0.630]): this data does not rank them.") in section
    assert "- dreambooth: every snapshot drifts beyond the base model's PRES interval." in section
    assert "| lora | 2 | 0.25 | 9.5 GiB | 1.59 MB * | 797 k |" in section
    assert "| dreambooth | 2 | 0.25 | 9.5 GiB | 1.72 GB * | 860 M |" in section
    for name in ("dog_methods_frontier.png", "dog_methods_grid_subject.png", "dog_methods_grid_class.png"):
        assert f"figures/{name}" in section and (folder / "figures" / name).is_file()


def test_prompts_line_up_across_methods_that_name_the_subject_differently(write_protocol, tmp_path):
    from harness.report import load_results
    from harness.report.tables import prompt_templates

    protocol = load_protocol(write_protocol(METHODS_STUDY, "methods.yaml"))
    study = fabricate_study(protocol, tmp_path)
    results = write_results(protocol, study.runs, load_records(study.run_folders, study.score_files),
                            tmp_path / "results")
    tables = load_results(results)
    images = tables.images[tables.images["prompt_kind"] == "subject"]
    templates = prompt_templates(tables, images)
    cd = tables.runs[tables.runs["method"] == "custom_diffusion"]["run_key"].iloc[0]
    ours = set(templates[images["run_key"] == cd])
    base = set(templates[images["source"] == "base_model"])
    assert ours == base and all("{identifier}" in t for t in ours)
    assert images[images["run_key"] == cd]["prompt"].str.contains("<new1>").all()
