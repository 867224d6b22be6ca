"""Protocol validation: every class of bad input gives an error that names the key, its line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import DEFAULT_MODEL, ProtocolError, load_protocol
from tests.conftest import MINIMAL, REPO


def problems(path: Path) -> str:
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    return str(info.value)


def test_minimal_protocol_gets_documented_defaults(write_protocol):
    p = load_protocol(write_protocol(MINIMAL))
    assert p.name == "p"
    assert p.train.learning_rate == 5e-6
    assert p.train.method == "dreambooth" and p.method_settings("dreambooth").train_text_encoder is False
    assert p.train.optimizer == "adamw8bit"
    assert p.train.gradient_checkpointing is True
    s = p.subjects[0]
    assert (s.instance_prompt, s.class_prompt) == ("a {identifier} {class}", "a {class}")
    assert (s.instance_text, s.class_text) == ("a sks dog", "a dog")
    assert s.live  # dogs use DreamBench's live-subject prompts


def test_unknown_key_suggests_the_nearest_valid_key_with_its_line(write_protocol):
    text = MINIMAL + "  learning_rte: 1.0e-5\n"
    msg = problems(write_protocol(text))
    assert "train.learning_rte: unknown key; did you mean 'learning_rate'?" in msg
    line = text.splitlines().index("  learning_rte: 1.0e-5")  # dedent keeps line numbers; 1-based below
    assert f"p.yaml:{line + 1}:" in msg


def test_unknown_top_level_and_subject_keys(write_protocol):
    msg = problems(write_protocol(MINIMAL.replace("train:", "trian:") + "\n"))
    assert "trian: unknown top-level key; did you mean 'train'?" in msg
    msg = problems(write_protocol(MINIMAL.replace("class_noun: dog", "class_nown: dog")))
    assert "subjects[0].class_nown: unknown key; did you mean 'class_noun'?" in msg


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("  steps: 0", "train.steps: must be at least 1, got 0"),
        ("  steps: many", "train.steps: expected an integer, got 'many'"),
        ("  prior_loss_weight: -0.5", "train.prior_loss_weight: must be 0 or more, got -0.5"),
        ("  mixed_precision: fp8", "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp8'"),
        ("  optimizer: adamw_8bit", "(did you mean 'adamw8bit'?)"),
        ("  gradient_checkpointing: sometimes", "expected true or false, got 'sometimes'"),
        ("  num_class_images: 0", "num_class_images: is 0 while prior_loss_weight is above 0"),
    ],
)
def test_wrong_types_and_impossible_values(write_protocol, line, expected):
    msg = problems(write_protocol(MINIMAL + line + "\n"))
    assert expected in msg


def test_resolution_not_divisible_by_8_names_the_fix(write_protocol):
    msg = problems(write_protocol(MINIMAL.replace("resolution: 32", "resolution: 500")))
    assert "train.resolution: must be a positive multiple of 8" in msg
    assert "use 496" in msg or "use 504" in msg


def test_all_problems_are_reported_together(write_protocol):
    msg = problems(write_protocol(MINIMAL + "  steps: 0\n  seed: -1\n  learning_rate: 0\n"))
    assert "3 problem(s)" in msg
    assert all(k in msg for k in ("train.steps", "train.seed", "train.learning_rate"))


def test_yaml_syntax_error_reports_its_line(write_protocol):
    path = write_protocol("model:\n  id: tiny\nsubjects:\n  - name: [dog\n")
    msg = problems(path)
    assert "YAML syntax error" in msg
    assert "p.yaml:" in msg.splitlines()[1]


def test_duplicate_keys_are_errors(write_protocol):
    msg = problems(write_protocol(MINIMAL + "  steps: 10\n  steps: 20\n"))
    assert "train.steps: appears twice" in msg


def test_missing_instance_folder(write_protocol, tmp_path):
    msg = problems(write_protocol(MINIMAL.replace("{subject_dir}", str(tmp_path / "nowhere"))))
    assert "subjects[0].instance_dir: folder" in msg
    assert "does not exist" in msg and "relative to the protocol file" in msg


def test_instance_folder_is_relative_to_the_protocol_file(tmp_path, subject_dir):
    (tmp_path / "protocols").mkdir()
    path = tmp_path / "protocols" / "x.yaml"
    path.write_text(MINIMAL.replace("{subject_dir}", "../subject"))
    assert load_protocol(path).subjects[0].instance_dir == subject_dir.resolve()


def test_prior_weight_without_class_noun_is_a_contradiction(write_protocol):
    text = MINIMAL.replace("    class_noun: dog\n", "    instance_prompt: 'a photo of {identifier}'\n")
    msg = problems(write_protocol(text))
    assert "subjects[0].class_noun" in msg and "prior_loss_weight is above 0" in msg
    # Without prior preservation the same subject is fine.
    ok = load_protocol(write_protocol(text + "  prior_loss_weight: 0\n", "ok.yaml"))
    assert ok.subjects[0].class_noun is None


def test_grid_axes_are_validated(write_protocol):
    msg = problems(write_protocol(MINIMAL + "grid:\n  prior_loss_weigth: [0, 1]\n"))
    assert "grid.prior_loss_weigth: is not a field that can be varied; did you mean 'prior_loss_weight'?" in msg
    msg = problems(write_protocol(MINIMAL + "grid:\n  steps: []\n"))
    assert "grid.steps: is an empty list" in msg
    msg = problems(write_protocol(MINIMAL + "grid:\n  steps: [100, 0]\n"))
    assert "grid.steps[1]: must be at least 1, got 0" in msg
    msg = problems(write_protocol(MINIMAL + "grid:\n  steps: 100\n"))
    assert "write [100] for a single value" in msg
    msg = problems(write_protocol(MINIMAL + "grid:\n  subject: [cat]\n"))
    assert "grid.subject[0]: 'cat' is not a subject of this protocol" in msg


def test_empty_file_and_missing_subjects(write_protocol):
    assert "the protocol file is empty" in problems(write_protocol("# nothing\n"))
    assert "subjects: is missing" in problems(write_protocol("model: {id: tiny}\n"))


def test_eval_metric_names_are_checked(write_protocol):
    msg = problems(write_protocol(MINIMAL + "eval:\n  metrics: [dino, cilp_i]\n"))
    assert "eval.metrics: unknown metric 'cilp_i'; did you mean 'clip_i'? Valid metrics: dino" in msg


def test_lpips_network_is_alex_by_default_vgg_on_request_and_checked(write_protocol):
    assert load_protocol(write_protocol(MINIMAL)).eval.lpips_net == "alex"
    vgg = load_protocol(write_protocol(MINIMAL + "eval:\n  backbones: real\n  lpips_net: vgg\n"))
    assert vgg.eval.lpips_net == "vgg" and "div_lpips" in vgg.eval.metrics
    msg = problems(write_protocol(MINIMAL + "eval:\n  lpips_net: squeeze\n"))
    assert "eval.lpips_net: expected one of 'alex', 'vgg', got 'squeeze'" in msg
    toy = MINIMAL.replace("{id: tiny}", "{id: toyworld}").replace("resolution: 32", "resolution: 64")
    msg = problems(write_protocol(toy + "eval:\n  backbones: toyworld\n  lpips_net: vgg\n"))
    assert "eval.lpips_net: the 'toyworld' backbone set has one LPIPS network of its own, so it cannot use 'vgg'" \
        in msg


def test_images_too_small_for_lpips_are_refused_before_training(write_protocol):
    msg = problems(write_protocol(MINIMAL + "grid:\n  resolution: [24, 64]\n"))
    assert ("grid.resolution: 24 px images are too small for LPIPS alex (div_lpips, div_lpips_class need at least "
            "32 px)") in msg
    without = "eval:\n  metrics: [dino, clip_t]\n"
    assert load_protocol(write_protocol(MINIMAL.replace("resolution: 32", "resolution: 24") + without))
    vgg = "eval:\n  lpips_net: vgg\n"
    assert load_protocol(write_protocol(MINIMAL.replace("resolution: 32", "resolution: 16") + vgg))


def test_moved_model_id_is_mapped_with_a_note(write_protocol):
    p = load_protocol(write_protocol(MINIMAL.replace("{id: tiny}", "{id: runwayml/stable-diffusion-v1-5}")))
    assert p.model.id == DEFAULT_MODEL
    assert any("removed from the Hugging Face hub" in n for n in p.notes)


def test_local_model_folder_must_be_a_diffusers_pipeline(write_protocol, tmp_path):
    (tmp_path / "weights").mkdir()
    msg = problems(write_protocol(MINIMAL.replace("{id: tiny}", "{id: ./weights}")))
    assert "has no model_index.json" in msg
    msg = problems(write_protocol(MINIMAL.replace("{id: tiny}", "{id: ./missing}")))
    assert "neither a hub id" in msg and "'tiny'" in msg


@pytest.mark.parametrize("name", ["smoke.yaml", "prior_ablation.yaml", "toy_prior_ablation.yaml", "toy_methods.yaml",
                                  "toy_methods_lr.yaml"])
def test_shipped_protocols_are_valid(name):
    p = load_protocol(REPO / "protocols" / name)
    assert p.subjects[0].instance_dir.is_dir()


def test_prior_ablation_has_the_paper_grid():
    grid = dict(load_protocol(REPO / "protocols" / "prior_ablation.yaml").grid)
    assert grid == {"prior_loss_weight": (0.0, 0.5, 1.0), "steps": (200, 400, 800, 1200),
                    "num_class_images": (50, 100, 200)}


def dreambench_copy(root: Path) -> Path:
    (root / "protocols").mkdir(parents=True)
    path = root / "protocols" / "dreambench.yaml"
    path.write_text((REPO / "protocols" / "dreambench.yaml").read_text())
    return path


def test_missing_dreambench_folders_are_one_problem_naming_the_download_command(tmp_path, monkeypatch):
    from dataclasses import replace

    from harness import datasets

    home = tmp_path / "data" / "dreambench"  # where the copied protocol's ../data/dreambench points
    monkeypatch.setitem(datasets.DATASETS, "dreambench", replace(datasets.DREAMBENCH, default_dest=home))
    path = dreambench_copy(tmp_path)
    msg = problems(path)
    assert "1 problem(s)" in msg
    assert (f"subjects[0].instance_dir: the instance folders of 30 subjects (backpack, backpack_dog, bear_plushie, "
            f"berry_bowl, can, candle and 24 more) do not exist under {home}. Run `python -m harness.datasets "
            f"dreambench` to download the 30 DreamBench subjects into {home}/, then run this command again.") in msg
    from tests.conftest import write_images

    for name in ("dog", "cat"):
        write_images(home / name, n=1)  # an incomplete copy: the command must be told to replace it
    msg = problems(path)
    assert "the instance folders of 28 subjects" in msg and "dreambench --force` to download" in msg
    assert "(the copy there is incomplete)" in msg


def test_dreambench_protocol_evaluates_as_the_paper(tmp_path):
    """25 prompts per subject from the object or live list, 4 images per prompt, the paper's backbones and
    metrics, and the reference rows (real images, base model) of every subject."""
    import yaml

    from harness.plan import make_plan
    from harness.prompts import subject_prompts
    from tests.conftest import write_images

    path = dreambench_copy(tmp_path)
    for i, s in enumerate(yaml.safe_load(path.read_text())["subjects"]):  # other photos: another run per subject
        write_images(tmp_path / "data" / "dreambench" / s["name"], n=1, size=256, seed=i)  # half of 512: usable
    p = load_protocol(path)
    live = {s.name for s in p.subjects if s.live}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    assert all(s.kind != "auto" for s in p.subjects)  # pinned, not guessed from the class noun
    prompts = {s.name: subject_prompts(s, p.eval) for s in p.subjects}
    assert {len(v) for v in prompts.values()} == {25}
    assert prompts["dog"][10] == "a sks dog wearing a red hat" and prompts["dog"][-1] == "a cube shaped sks dog"
    assert prompts["teapot"][12] == "a sks teapot with the Eiffel Tower in the background"
    shared = set(prompts["dog"]) & {t.replace("teapot", "dog") for t in prompts["teapot"]}
    assert len(shared) == 15  # 10 scenes and 5 property changes are common; 10 prompts differ by kind
    assert p.eval.seeds == (0, 1, 2, 3) and p.eval.max_subject_prompts is None
    assert p.eval.backbones == "real" and p.eval.lpips_net == "alex"
    assert {"dino", "clip_i", "clip_t", "pres", "div_lpips"} <= set(p.eval.metrics)
    plan = make_plan(p)
    assert plan.work.training_runs == 30
    assert plan.work.base_model_images == 30 * (25 + len(p.eval.class_prompts)) * 4
    assert plan.work.eval_images == plan.work.base_model_images  # one snapshot per subject, the same prompts


def test_dreambench_protocol_is_valid_once_its_data_is_in_place(tmp_path):
    from tests.conftest import write_images

    (tmp_path / "protocols").mkdir()
    path = tmp_path / "protocols" / "dreambench.yaml"
    path.write_text((REPO / "protocols" / "dreambench.yaml").read_text())
    msg = problems(path)
    assert "30 problem(s)" in msg and "data/dreambench/dog does not exist" in msg
    import yaml

    for s in yaml.safe_load(path.read_text())["subjects"]:
        write_images(tmp_path / "data" / "dreambench" / s["name"], n=1)
    p = load_protocol(path)
    assert len(p.subjects) == 30
    assert {s.class_noun for s in p.subjects} >= {"dog", "cat", "stuffed animal", "sneaker"}
    assert sum(s.live for s in p.subjects) == 9  # 2 cats and 7 dogs use the live-subject prompts


@pytest.mark.parametrize(("identifier", "expected"), [
    ("dog", "subjects[0].identifier: 'dog' is the class noun itself, so the instance prompt 'a dog dog' cannot tell "
            "the subject from its class. Use a rare token the model does not know as a word, e.g. 'sks'."),
    ("the", "subjects[0].identifier: 'the' is a common word for the model's tokenizer (whole word no. 7 of CLIP's "
            "48,894 BPE merges"),
    ("Photo", "'Photo' is a common word for the model's tokenizer"),
    ("x", "'x' is a common word for the model's tokenizer (a single character"),
])
def test_an_identifier_the_model_already_knows_is_refused_with_a_rare_one_suggested(write_protocol, identifier,
                                                                                       expected):
    msg = problems(write_protocol(MINIMAL.replace("class_noun: dog", f"class_noun: dog\n    identifier: {identifier}")))
    assert expected in msg
    assert "'sks'" in msg


def test_a_word_of_the_class_prompt_is_no_identifier(write_protocol):
    subject = "class_noun: dog\n    identifier: furry\n    class_prompt: a furry {class}"
    text = MINIMAL.replace("class_noun: dog", subject)
    assert "'furry' is a word of the class prompt 'a furry dog'" in problems(write_protocol(text))


@pytest.mark.parametrize("identifier", ["sks", "ohwx", "zwx", "teapotx"])
def test_rare_tokens_and_words_of_several_tokens_are_accepted(write_protocol, identifier):
    text = MINIMAL.replace("class_noun: dog", f"class_noun: dog\n    identifier: {identifier}")
    assert load_protocol(write_protocol(text)).subjects[0].identifier == identifier


def test_the_suggested_identifiers_are_rare_by_the_same_rule():
    from harness.backends.clip_vocab import COMMON_WORD_RANK, RARE_EXAMPLES, common_word_problem, whole_word_rank

    for word in RARE_EXAMPLES:
        assert whole_word_rank(word) > COMMON_WORD_RANK and common_word_problem(word) is None
    assert whole_word_rank("dog") < whole_word_rank("teapot") < whole_word_rank("sks")  # frequency order
    assert whole_word_rank("zwx") is None  # several tokens


def test_a_hub_model_is_checked_against_clips_vocabulary(write_protocol):
    text = MINIMAL.replace("{id: tiny}", "{id: stable-diffusion-v1-5/stable-diffusion-v1-5}").replace(
        "class_noun: dog", "class_noun: dog\n    identifier: cat")
    assert "'cat' is a common word for the model's tokenizer" in problems(write_protocol(text))
