"""The toy world: renderer, captions, tokenizer, shipped weights, caption following, and a CI-sized toy study."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from harness.config import ProtocolError, load_protocol
from harness.toyworld import models as tm
from harness.toyworld import pretrain
from harness.toyworld.subject import DEFAULT_FOLDER, SUBJECT_VIEWS, view_name
from harness.toyworld.world import (
    COLOURS,
    NOUNS,
    PATTERNS,
    SETTING_PHRASES,
    SUBJECT,
    Scene,
    caption,
    is_base_world,
    render_array,
    sample_caption,
    sample_scene,
    vocabulary,
)
from run_experiment import main
from tests.conftest import REPO

TOY_PROTOCOL = REPO / "protocols" / "toy_prior_ablation.yaml"


# --------------------------------------------------------------------------------------------------------------
# Renderer and captions


def test_render_is_a_pure_function_of_the_scene():
    scene = Scene(noun="cone", colour="green", pattern="dotted", pattern_colour="black", size="big", seed=7)
    first, second = render_array(scene), render_array(scene)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert not np.array_equal(first, render_array(replace(scene, seed=8)))  # the seed moves texture and jitter
    assert not np.array_equal(first, render_array(replace(scene, colour="red")))


def test_render_draws_the_colour_and_the_setting():
    red_ball = render_array(Scene(noun="ball", colour="red", setting="snow", size="big", seed=1)).astype(float)
    centre, corner = red_ball[28:36, 28:36].mean(axis=(0, 1)), red_ball[:6, :6].mean(axis=(0, 1))
    assert centre[0] > 150 and centre[1] < 90  # red object in the middle
    assert corner.min() > 200  # snow in the corner
    grass = render_array(Scene(noun="ring", colour="blue", setting="grass", size="small", seed=1)).astype(float)
    assert grass[:6, :6].mean(axis=(0, 1)).argmax() == 1  # green dominates


def test_shipped_subject_images_are_what_the_renderer_draws():
    files = sorted(DEFAULT_FOLDER.glob("*.png"))
    assert [f.name for f in files] == [view_name(i, s) for i, s in enumerate(SUBJECT_VIEWS)]
    for path, scene in zip(files, SUBJECT_VIEWS, strict=True):
        assert scene.look == SUBJECT.look
        shipped = np.asarray(Image.open(path).convert("RGB")).astype(int)
        # One level of tolerance: CPUs' vectorised sine can differ in the last bit and flip a rounding.
        assert np.abs(shipped - render_array(scene).astype(int)).max() <= 1, path.name


def test_full_captions_name_every_said_attribute():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, "open")
        words = caption(scene)
        assert words.startswith("a ")
        assert f" {scene.colour} {scene.pattern} {scene.noun}" in words
        assert words.endswith(SETTING_PHRASES[scene.setting])
        assert ("small" in words.split()) == (scene.size == "small")
        assert ("left" in words.split()) == (scene.position == "left")


def test_sampled_captions_only_say_true_things():
    rng = np.random.default_rng(1)
    bare = 0
    for _ in range(500):
        scene = sample_scene(rng, "base")
        words = sample_caption(scene, rng).split()
        assert scene.noun in words and not (set(words) & set(NOUNS)) - {scene.noun}
        assert not (set(words) & set(COLOURS)) - {scene.colour}
        assert not (set(words) & set(PATTERNS)) - {scene.pattern}
        assert set(words) <= set(vocabulary())
        bare += words == ["a", scene.noun]
    assert 30 < bare < 120  # "a <noun>" alone is common enough for class prompts to be in the language


def test_base_world_never_shows_the_subjects_look_and_the_open_world_can():
    rng = np.random.default_rng(2)
    base = [sample_scene(rng, "base") for _ in range(3000)]
    assert all(is_base_world(s) for s in base)
    assert not any(s.look[:3] == SUBJECT.look[:3] for s in base)
    assert all(s.pattern_colour in ("white", "black") and s.stripe_angle in (0, 90) for s in base)
    assert not is_base_world(SUBJECT)
    open_looks = {s.look[:3] for s in (sample_scene(rng, "open") for _ in range(3000))}
    assert SUBJECT.look[:3] in open_looks


def test_scene_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"Scene\.colour: 'teal'"):
        Scene(noun="box", colour="teal")


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_fast_tokenize_matches_the_pipeline_tokenizer():
    texts = ["a big red striped box on the left on sand", "", "a sks box, on Sand!", "a dog",
             "a " + "big " * 20 + "box"]
    expected = tm.world_tokenizer()(texts, padding="max_length", max_length=tm.MAX_TOKENS, truncation=True,
                                    return_tensors="pt").input_ids
    assert torch.equal(tm.tokenize(texts), expected)
    ids = tm.tokenize(["a dog"])[0].tolist()
    assert ids[:4] == [2, tm.token_list().index("a"), 1, len(tm.token_list()) - 1]  # <start> a <unk> <end>


def test_unknown_words_lists_what_the_world_cannot_say():
    assert tm.unknown_words("a sks box on the beach") == ["beach"]
    assert tm.unknown_words("a big blue striped box by a brick wall") == []


# --------------------------------------------------------------------------------------------------------------
# Shipped weights


def test_shipped_weights_match_their_manifest():
    manifest = tm.read_manifest()
    assert tm.verify_weights() == tm.weights_revision()
    assert manifest["vocabulary"] == tm.token_list()
    assert set(manifest["stages"]) == set(pretrain.STAGES)
    assert manifest["config"] == json.loads(json.dumps(pretrain.asdict(replace(pretrain.PretrainConfig(), workers=0))))
    sizes = {name: (tm.WEIGHTS_DIR / name).stat().st_size for name in manifest["files"]}
    assert sum(sizes.values()) < 40 * 2**20


def test_an_altered_weight_file_is_refused_with_the_way_out(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(tm.WEIGHTS_DIR, folder)
    target = folder / tm.DINO_FILE
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    expected = r"(?s)dino\.safetensors has sha256 .*harness\.toyworld\.pretrain"
    with pytest.raises(tm.ToyWorldWeightsError, match=expected):
        tm.verify_weights(folder)
    (folder / tm.MANIFEST).unlink()
    with pytest.raises(tm.ToyWorldWeightsError, match=r"manifest\.json is missing"):
        tm.verify_weights(folder)


@pytest.fixture(scope="module")
def toy_components():
    return tm.load_toyworld_components()


def test_toy_components_load_as_a_stable_diffusion_model(toy_components):
    assert toy_components.identity == f"toyworld@{tm.weights_revision()}"
    assert toy_components.vae_scale_factor == 4
    assert toy_components.unet.dtype == torch.float32
    assert toy_components.unet.config.cross_attention_dim == toy_components.text_encoder.config.hidden_size


def _sample(components, prompts: list[str], seed: int = 0, steps: int = 20) -> list[Image.Image]:
    from harness.models import make_pipeline

    pipe = make_pipeline(components, "dpmsolver++")
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return pipe(prompts, height=64, width=64, num_inference_steps=steps, guidance_scale=5.0,
                    generator=generator).images


def _random_toy_components():
    from harness.models import Components, sd15_scheduler_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae, unet, text = tm.build_vae(), tm.build_unet(), tm.build_text_encoder()
    vae.register_to_config(scaling_factor=1.0)
    return Components(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tm.world_tokenizer(),
                      scheduler_config=sd15_scheduler_config(), identity="toy-random")


@pytest.mark.slow
def test_the_pretrained_model_follows_held_out_captions(toy_components):
    """CLIP-T (toy CLIP) of images from fresh full captions: matched captions beat shuffled ones and a random model.

    Margins: the pretrained model's mean matched cosine is at least 0.30 above the random-weight model's, and at
    least 0.30 above its own images scored against other images' captions (measured: 0.71 against -0.07 and -0.03).
    """
    rng = np.random.default_rng(12345)  # scenes no test or training stream uses
    captions = [caption(sample_scene(rng, "base"), {"colour", "pattern", "setting"}) for _ in range(12)]
    clip = tm.toy_clip()
    texts = clip.embed_texts(captions)
    trained = clip.embed_images(_sample(toy_components, captions))
    random = clip.embed_images(_sample(_random_toy_components(), captions))
    matched = float(np.mean(np.sum(trained * texts, axis=1)))
    shuffled = float(np.mean(np.sum(trained * np.roll(texts, 1, axis=0), axis=1)))
    baseline = float(np.mean(np.sum(random * texts, axis=1)))
    print(f"toy CLIP-T: pretrained {matched:.3f}, shuffled captions {shuffled:.3f}, random model {baseline:.3f}")
    assert matched - baseline >= 0.30, (matched, baseline)
    assert matched - shuffled >= 0.30, (matched, shuffled)


def test_toy_backbones_embed_into_unit_rows():
    images = [Image.fromarray(render_array(s)) for s in SUBJECT_VIEWS[:3]]
    clip, dino = tm.toy_clip(), tm.toy_dino()
    for embedder in (clip, dino):
        rows = embedder.embed_images(images)
        assert rows.shape == (3, embedder.dim) and rows.dtype == np.float32
        assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-4)
    assert clip.describe()["pretrained"] == tm.BACKBONE_SOURCE
    assert dino.tag.startswith("toyworld:dino@")


def test_the_toy_lpips_network_measures_how_much_renders_differ():
    """Distance 0 between a render and a copy of it, above 0 between the subject in two settings, symmetric; its
    uniform layer weights and its source are stated."""
    network = tm.toy_lpips()
    subject = [Image.fromarray(render_array(s)) for s in SUBJECT_VIEWS[:2]]
    other = Image.fromarray(render_array(sample_scene(np.random.default_rng(4), "base")))
    matrix = network.distance_matrix([subject[0], subject[0].copy(), subject[1], other])
    assert matrix[0, 1] == 0.0 and matrix[0, 2] > 0 and np.array_equal(matrix, matrix.T)
    described = network.describe()
    assert described["backbone"].startswith("toyworld:lpips-vae@") and described["pretrained"] == tm.LPIPS_SOURCE
    assert described["layer_weights"].startswith("uniform") and described["resize"].startswith("none")
    with pytest.raises(ValueError, match=r"one LPIPS network.*'vgg'.*eval\.lpips_net"):
        tm.toy_lpips(net="vgg")
    assert set(tm.TOY_BACKBONES.builders) == {"clip", "dino", "lpips"} and tm.TOY_BACKBONES.lpips_nets == ("alex",)


def test_the_dino_role_encoder_recognises_the_subject_across_settings():
    """Views of the subject are closer to each other than to boxes that differ only in stripe colour or angle."""
    dino = tm.toy_dino()
    views = dino.embed_images([Image.fromarray(render_array(s)) for s in SUBJECT_VIEWS])
    others = [replace(s, pattern_colour="white", stripe_angle=0) for s in SUBJECT_VIEWS]
    other = dino.embed_images([Image.fromarray(render_array(s)) for s in others])
    within = views @ views.T
    same = within[~np.eye(len(views), dtype=bool)].mean()
    across = float(np.mean(views @ other.T))
    print(f"toy DINO: subject views {same:.3f}, other stripes {across:.3f}")
    assert same - across > 0.2, (same, across)  # measured: 0.98 against 0.55


# --------------------------------------------------------------------------------------------------------------
# Pretraining script


@pytest.mark.slow
def test_pretraining_is_deterministic_and_its_output_loads(tmp_path):
    for name in ("a", "b"):
        assert pretrain.main(["--device", "cpu", "--scale", "ci", "--out", str(tmp_path / name)]) == 0
    first, second = (json.loads((tmp_path / n / tm.MANIFEST).read_text()) for n in ("a", "b"))
    assert first["files"] == second["files"]
    assert {"pipeline/unet/diffusion_pytorch_model.safetensors", tm.CLIP_FILE, tm.DINO_FILE} <= set(first["files"])
    assert first["stages"]["vae"]["latent_scaling_factor"] > 0
    assert first["config"]["unet"]["steps"] == pretrain.SCALES["ci"].unet.steps
    components = tm.load_toyworld_components(folder=tmp_path / "a")
    assert components.identity == f"toyworld@{tm.weights_revision(tmp_path / 'a')}"
    assert components.unet.dtype == torch.float32


def test_pretrain_rejects_unknown_stages():
    with pytest.raises(SystemExit):
        pretrain.main(["--stages", "vae,lora", "--scale", "ci"])
    with pytest.raises(SystemExit, match="STAGE=N"):
        pretrain.parse_steps(["unet:5"])


# --------------------------------------------------------------------------------------------------------------
# Protocol validation


def _toy_protocol(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(TOY_PROTOCOL.read_text())
    data["subjects"][0]["instance_dir"] = str(DEFAULT_FOLDER)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_toy_protocol_validates_with_the_weights_revision():
    protocol = load_protocol(TOY_PROTOCOL)
    assert protocol.model.id == "toyworld" and protocol.model.revision == tm.weights_revision()
    assert protocol.eval.backbones == "toyworld"


def test_words_outside_the_world_resolution_and_revision_are_errors(tmp_path):
    path = _toy_protocol(tmp_path, **{"train.resolution": 128, "model.revision": "abc",
                                      "eval.class_prompts": ["a {class} on the beach"]})
    with pytest.raises(ProtocolError) as error:
        load_protocol(path)
    text = str(error.value)
    assert "train.resolution" in text and "trained at 64x64" in text
    assert "model.revision" in text and "does not match the shipped toy-world weights" in text
    assert "eval.class_prompts[0]" in text and "does not know: beach" in text


def test_the_toy_model_needs_its_own_eval_prompts(tmp_path):
    path = _toy_protocol(tmp_path, **{"subjects.0.eval_prompts": None})
    with pytest.raises(ProtocolError, match=r"eval_prompts.*is needed with model.id: toyworld"):
        load_protocol(path)


# --------------------------------------------------------------------------------------------------------------
# The study, CI-sized


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    data = yaml.safe_load(TOY_PROTOCOL.read_text())
    data["name"] = "toy_ci"
    data["subjects"][0]["instance_dir"] = str(DEFAULT_FOLDER)
    data["subjects"][0]["eval_prompts"] = data["subjects"][0]["eval_prompts"][:2]
    data["class_images"]["steps"] = 4
    data["eval"].update(seeds=[0, 1], class_prompts=data["eval"]["class_prompts"][:2], steps=4,
                        bootstrap_samples=100)
    data["grid"] = {"prior_loss_weight": [0.0, 1.0], "train_text_encoder": [False, True], "steps": [2, 4],
                    "num_class_images": [4]}
    (root / "toy_ci.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main([str(root / "toy_ci.yaml")]) == 0
    return root


@pytest.mark.slow
def test_the_toy_study_runs_end_to_end_with_toy_backbones(toy_study):
    runs = pd.read_csv(toy_study / "results" / "toy_ci" / "runs.csv")
    assert len(runs) == 8 and set(runs["status"]) == {"ok"}
    for metric in ("dino", "clip_i", "clip_t", "pres", "div_class"):
        assert runs[metric].between(-1, 2).all(), metric
    assert (runs["div_lpips"] > 0).all() and (runs["div_lpips_class"] > 0).all()
    assert runs["dino_backbone"].str.startswith("toyworld:dino@").all()
    assert runs["lpips_backbone"].str.startswith("toyworld:lpips-vae@").all()
    meta = json.loads((toy_study / "results" / "toy_ci" / "metadata.json").read_text())
    assert meta["pipeline_check_only"] is False and "toy world" in meta["scope_note"]
    assert meta["model"]["revision"] == tm.weights_revision()
    report = (toy_study / "reports" / "toy_ci" / "report.md").read_text()
    assert "**Scope.** Toy world" in report and "pipeline check only" not in report.lower()
    images = pd.read_csv(toy_study / "results" / "toy_ci" / "images.csv")
    assert set(images["prompt_kind"]) == {"subject", "class", "real"}
    generated = images[images["prompt_kind"] != "real"]
    assert all(re.search(r"sks box|a box", p) for p in generated["prompt"])


@pytest.mark.slow
def test_the_verdict_pairs_prior_runs_with_the_run_that_differs_only_in_the_prior(toy_study):
    report = (toy_study / "reports" / "toy_ci" / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("## Setup")[0]
    sentences = [line for line in verdict.splitlines() if "prior preservation (" in line]
    assert len(sentences) == 2
    for encoder in ("False", "True"):
        label = f"train_text_encoder={encoder}"
        pair = next(s for s in sentences if f"(w=1, {label}, n=4)" in s)
        assert f"(w=0, {label})" in pair


@pytest.mark.parametrize(("identifier", "expected"), [
    ("box", "'box' is the class noun itself"),
    ("red", "'red' is a word of the toy world's captions; the identifier must be one of the world's rare tokens, "
            "which no caption uses: sks, zwx, qlv, vrn."),
])
def test_a_toy_identifier_must_be_one_of_the_worlds_rare_tokens(tmp_path, identifier, expected):
    with pytest.raises(ProtocolError) as error:
        load_protocol(_toy_protocol(tmp_path, **{"subjects.0.identifier": identifier}))
    assert expected in str(error.value)
    assert load_protocol(_toy_protocol(tmp_path, **{"subjects.0.identifier": "qlv"})).subjects[0].identifier == "qlv"
