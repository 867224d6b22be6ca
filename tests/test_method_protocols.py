"""Methods in a protocol: misplaced settings name their owner, a method's own training values and defaults, the
token Custom Diffusion names the subject with, the dry run; and class images from a folder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.class_images import ClassImageError, PoolSpec, ensure_pool, plan_pools, pool_for
from harness.config import ClassImageSpec, ModelSpec, ProtocolError, load_protocol
from harness.data import prepare_image
from harness.grid import expand
from harness.metrics import clip_t_texts
from harness.plan import format_plan, make_plan
from harness.sampling import eval_requests
from tests.conftest import MINIMAL, REPO, write_images

FIXED = {"dog": "0" * 64}


def problems(path: Path) -> str:
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    return str(info.value)


METHODS_GRID = MINIMAL + "grid:\n  method: [dreambooth, lora, custom_diffusion]\n  prior_loss_weight: [0, 1]\n"


# --------------------------------------------------------------------------------------------------------------
# Misplaced method keys


def test_a_method_setting_used_with_another_method_names_its_owner(write_protocol):
    msg = problems(write_protocol(MINIMAL + "lora: {rank: 8}\n"))
    assert "lora: is the settings section of method 'lora', which this study does not train" in msg
    msg = problems(write_protocol(MINIMAL + "  rank: 8\n"))
    assert "train.rank: is a setting of method lora, but this study trains dreambooth" in msg
    msg = problems(write_protocol(MINIMAL + "grid:\n  lora.rank: [4, 8]\n"))
    assert "grid.lora.rank: is a setting of method lora, which this study does not train" in msg
    msg = problems(write_protocol(MINIMAL + "  method: custom_diffusion\ncustom_diffusion: {rank: 4}\n"))
    assert "custom_diffusion.rank: unknown key" in msg
    msg = problems(write_protocol(MINIMAL + "  method: lora\nlora: {method: dreambooth, learning_rate: 2}\n"))
    assert "lora.method: cannot be set in a method's section" in msg
    assert "lora.learning_rate: must be at most 0.01, got 2.0" in msg


def test_a_bare_setting_axis_varies_only_the_methods_that_have_it(write_protocol):
    protocol = load_protocol(write_protocol(MINIMAL + "grid:\n  method: [dreambooth, lora]\n  rank: [4, 16]\n"))
    runs = expand(protocol, FIXED)
    assert sorted((r.train.method, getattr(r.method, "rank", None)) for r in runs) == [
        ("dreambooth", None), ("lora", 4), ("lora", 16)]  # dreambooth has no rank: one run, not two


# --------------------------------------------------------------------------------------------------------------
# Training values per method


def test_each_method_gets_its_own_training_values_and_defaults(write_protocol):
    text = METHODS_GRID.replace("  resolution: 32\n", "  resolution: 32\n  batch_size: 2\n")
    protocol = load_protocol(write_protocol(text + "lora: {learning_rate: 3.0e-4, rank: 8}\n"))
    rates = {(r.train.method, r.train.prior_loss_weight): r.train.learning_rate for r in expand(protocol, FIXED)}
    assert rates == {
        ("dreambooth", 0.0): 5e-6, ("dreambooth", 1.0): 5e-6,  # TrainSpec's default
        ("lora", 0.0): 3e-4, ("lora", 1.0): 3e-4,  # its own section
        # the paper's 1e-5 per image: x batch 2, x2 again with class images
        ("custom_diffusion", 0.0): 2e-5, ("custom_diffusion", 1.0): 4e-5,
    }
    plan = format_plan(make_plan(protocol))
    for rate in ("5e-06", "0.0003", "2e-05", "4e-05"):
        assert f" {rate} " in plan
    # train: sets every method's rate; a grid value wins over a method's section.
    protocol = load_protocol(write_protocol(text.replace("batch_size: 2", "learning_rate: 1.0e-6")
                                            + "  learning_rate: [2.0e-6]\nlora: {learning_rate: 3.0e-4}\n", "g.yaml"))
    assert {r.train.learning_rate for r in expand(protocol, FIXED)} == {2e-6}
    protocol = load_protocol(write_protocol(text.replace("batch_size: 2", "learning_rate: 1.0e-6"), "t.yaml"))
    assert {r.train.learning_rate for r in expand(protocol, FIXED)} == {1e-6}


def test_custom_diffusion_names_the_subject_with_its_modifier_token(write_protocol):
    protocol = load_protocol(write_protocol(METHODS_GRID + "custom_diffusion: {modifier_token: '<v1>'}\n"))
    runs = {r.train.method: r for r in expand(protocol, FIXED) if r.train.prior_loss_weight == 1.0}
    cd = runs["custom_diffusion"]
    assert cd.subject.identifier == "<v1>" and cd.subject.instance_text == "a <v1> dog"
    assert cd.method.initializer_token == "sks"  # starts from the subject's identifier
    assert runs["lora"].subject.identifier == "sks" and runs["dreambooth"].subject.instance_text == "a sks dog"
    prompts = [r.prompt for r in eval_requests(cd.subject, protocol.eval) if r.prompt_kind == "subject"]
    assert prompts and all("<v1>" in p and "sks" not in p for p in prompts)
    # CLIP-T scores each image against its prompt without the run's token: the same text for every method.
    kinds = ["subject"] * len(prompts)
    sks_prompts = [r.prompt for r in eval_requests(runs["lora"].subject, protocol.eval) if r.prompt_kind == "subject"]
    assert clip_t_texts(prompts, kinds, cd.subject.identifier) == clip_t_texts(sks_prompts, kinds, "sks")
    assert "custom_diffusion runs name subject 'dog' with '<v1>' instead of 'sks'" in format_plan(make_plan(protocol))


def test_custom_diffusion_token_settings_are_checked(write_protocol):
    text = MINIMAL + "  method: custom_diffusion\ncustom_diffusion: {modifier_token: 'a b', initializer_token: ''}\n"
    msg = problems(write_protocol(text))
    assert "custom_diffusion.modifier_token: 'a b' must be one word without spaces" in msg
    assert "custom_diffusion.initializer_token: '' must be one word" in msg
    toy = (REPO / "protocols" / "toy_prior_ablation.yaml").read_text().replace(
        "../examples", str(REPO / "examples")).replace("train:\n", "train:\n  method: custom_diffusion\n").replace(
        "  train_text_encoder: [false, true]\n", "").replace("grid:\n", "custom_diffusion: {initializer_token: ktn}\n"
                                                                      "grid:\n")
    msg = problems(write_protocol(toy, "toy.yaml"))
    assert "custom_diffusion.initializer_token: 'ktn' is not a word of the toy world. Its words are:" in msg


def test_existing_dreambooth_run_keys_do_not_move_when_methods_join_the_grid(write_protocol):
    alone = {r.run_key for r in expand(load_protocol(write_protocol(MINIMAL + "grid:\n  prior_loss_weight: [0, 1]\n")),
                                       FIXED)}
    together = {r.run_key: r for r in expand(load_protocol(write_protocol(METHODS_GRID, "m.yaml")), FIXED)}
    assert alone == {k for k, r in together.items() if r.train.method == "dreambooth"}
    assert len(together) == 6


# --------------------------------------------------------------------------------------------------------------
# Class images from a folder


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "dogs", n=5, size=48, seed=7)


def folder_protocol(write_protocol, class_dir: Path, extra: str = "", name: str = "f.yaml"):
    text = (MINIMAL + "  num_class_images: 3\ngrid:\n  num_class_images: [2, 3]\n"
            f"class_images: {{source: folder, dir: {class_dir}{extra}}}\n")
    return write_protocol(text, name)


def test_class_folder_settings_are_checked(write_protocol, class_dir, tmp_path):
    msg = problems(write_protocol(MINIMAL + "class_images: {source: folder}\n"))
    assert "class_images.source: is folder but dir is missing; add dir: PATH" in msg
    msg = problems(write_protocol(MINIMAL + "class_images: {source: folder, dir: nowhere}\n"))
    assert f"class_images.dir: folder {tmp_path / 'nowhere'} does not exist" in msg
    msg = problems(folder_protocol(write_protocol, class_dir, ", steps: 20, sampler: ddim"))
    assert "class_images.sampler: describes generated class images and has no effect with source: folder" in msg
    assert "class_images.steps: describes generated class images" in msg
    msg = problems(write_protocol(MINIMAL + f"class_images: {{dir: {class_dir}}}\n"))
    assert "class_images.dir: is only read with source: folder" in msg


def test_a_folder_pool_is_its_photos_prepared_like_instance_images_in_name_order(write_protocol, class_dir,
                                                                                 tmp_path):
    protocol = load_protocol(folder_protocol(write_protocol, class_dir))
    runs = expand(protocol, FIXED)
    pools = plan_pools(runs)
    assert len(pools) == 1 and list(pools.values()) == [3]
    pool = next(iter(pools))
    assert {pool_for(r) for r in runs} == {pool} and pool.from_folder
    paths = ensure_pool(pool, 3, tmp_path / "cache", lambda: pytest.fail("a folder pool loads no model"), "cpu")
    sources = sorted(class_dir.iterdir())
    for path, source in zip(paths, sources, strict=False):
        with Image.open(path) as image:
            assert image.size == (32, 32)
            assert np.array_equal(np.asarray(image), np.asarray(prepare_image(source, 32)))
    assert ensure_pool(pool, 2, tmp_path / "cache", None, "cpu") == paths[:2]  # nested prefixes
    text = format_plan(make_plan(protocol))
    assert f"the photos in {class_dir} (file-name order), prepared at 32 px: 3 images" in text
    assert "images to generate: 0 class" in text


def test_the_pool_and_run_keys_follow_the_folders_content_not_its_place(write_protocol, class_dir, tmp_path):
    first = expand(load_protocol(folder_protocol(write_protocol, class_dir)), FIXED)
    moved = class_dir.rename(tmp_path / "elsewhere")
    second = expand(load_protocol(folder_protocol(write_protocol, moved, name="g.yaml")), FIXED)
    assert [r.run_key for r in first] == [r.run_key for r in second]
    assert pool_for(first[0]).key == pool_for(second[0]).key
    write_images(moved, n=1, size=48, seed=99)  # other pixels in 00.jpg
    third = expand(load_protocol(folder_protocol(write_protocol, moved, name="h.yaml")), FIXED)
    assert not {r.run_key for r in third} & {r.run_key for r in first}
    assert pool_for(third[0]).key != pool_for(first[0]).key


def test_bad_class_photos_are_all_named_and_too_few_is_an_error(write_protocol, class_dir):
    (class_dir / "05.png").write_bytes(b"")
    (class_dir / "06.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ClassImageError) as info:
        make_plan(load_protocol(folder_protocol(write_protocol, class_dir)))
    message = str(info.value)
    assert "class_images.dir: 2 image(s)" in message and "05.png: is empty" in message and "06.jpg" in message
    (class_dir / "05.png").unlink()
    (class_dir / "06.jpg").unlink()
    text = MINIMAL + f"  num_class_images: 9\nclass_images: {{source: folder, dir: {class_dir}}}\n"
    with pytest.raises(ClassImageError, match=re.escape("holds 5 image(s), but a run uses 9")):
        make_plan(load_protocol(write_protocol(text, "nine.yaml")))


def test_generated_pools_keep_their_keys():
    # Pinned before class folders existed: a generated pool's key must not move (its images would be orphaned).
    pool = PoolSpec(model=ModelSpec(id="tiny"), prompt="a dog", resolution=32, sampler=ClassImageSpec(steps=2))
    assert pool.key == "126b54da4ff3"
