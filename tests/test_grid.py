"""Grid expansion: counts, the three deduplication rules, and the stability of run keys."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.class_images import plan_pools
from harness.config import ProtocolError, load_protocol
from harness.grid import expand, grid_points, run_identity, run_key
from harness.methods.dreambooth import DreamBoothSettings
from harness.plan import format_plan, make_plan
from tests.conftest import MINIMAL, REPO, write_images

FIXED = {"dog": "0" * 64}  # pins the instance digest so keys do not depend on the random test images


def test_smoke_grid_dedups_prior_weight_zero_and_shares_snapshots():
    protocol = load_protocol(REPO / "protocols" / "smoke.yaml")
    runs = expand(protocol)
    # weight 0: one run whatever the class count; weight 1: one run per class count; steps are snapshots.
    assert len(runs) == 3
    assert [(r.train.prior_loss_weight, r.train.num_class_images) for r in runs] == [(0.0, 0), (1.0, 2), (1.0, 4)]
    assert all(r.snapshot_steps == (2, 4) and r.train.steps == 4 for r in runs)
    assert runs[0].class_images is None and runs[1].class_images is not None


def test_prior_ablation_counts():
    runs = expand(load_protocol(REPO / "protocols" / "prior_ablation.yaml"))
    assert len(runs) == 1 + 3 + 3
    assert {r.snapshot_steps for r in runs} == {(200, 400, 800, 1200)}
    pools = plan_pools(runs)
    assert len(pools) == 1 and list(pools.values()) == [200]  # one pool, nested prefixes of 50/100/200


def test_schedule_that_depends_on_length_makes_steps_separate_runs(write_protocol):
    p = load_protocol(write_protocol(MINIMAL + "  lr_schedule: linear\ngrid:\n  steps: [10, 20, 30]\n"))
    runs = expand(p, FIXED)
    assert [(r.train.steps, r.snapshot_steps) for r in runs] == [(10, (10,)), (20, (20,)), (30, (30,))]
    assert len({r.run_key for r in runs}) == 3


def test_run_keys_do_not_depend_on_yaml_key_order(write_protocol):
    a = write_protocol(MINIMAL + "  seed: 3\n  learning_rate: 1.0e-5\ngrid:\n  steps: [5, 10]\n"
                       "  prior_loss_weight: [0, 1]\n", "a.yaml")
    b = write_protocol("""
        train: {learning_rate: 0.00001, resolution: 32, seed: 3}
        grid:
          prior_loss_weight: [0.0, 1]
          steps: [10, 5]
        subjects:
          - {class_noun: dog, instance_dir: "{subject_dir}", name: dog}
        model: {id: tiny}
        """, "b.yaml")
    keys_a = sorted(r.run_key for r in expand(load_protocol(a), FIXED))
    keys_b = sorted(r.run_key for r in expand(load_protocol(b), FIXED))
    assert keys_a == keys_b and len(keys_a) == 2


def test_golden_keys(write_protocol):
    # Changing these keys orphans every stored run: only change them on purpose (bump IDENTITY_VERSION).
    protocol = load_protocol(write_protocol(MINIMAL + "grid:\n  prior_loss_weight: [0, 1]\n  steps: [2, 4]\n"
                                            "  num_class_images: [2, 4]\n"))
    assert [r.run_key for r in expand(protocol, FIXED)] == GOLDEN_KEYS


GOLDEN_KEYS = ["kogtutzpb6eq", "7lybake3klly", "pdppienw5w2j"]

# The keys of the shipped protocols' runs: the run folders of every study made so far are found under them.
SHIPPED_KEYS = {
    "smoke": ["7geocivp4jzs", "lvb2r7wjtdlb", "obdoxgohyc6y"],
    "prior_ablation": ["22udk56f54d2", "bdqzdld3a5a5", "jz7lucgag5bz", "lxml3ojwcenm", "m3gtjc4bs3kn",
                       "qkjnydaabn6r", "uy27ikvua3vo"],
    "toy_prior_ablation": ["3xgpyl2uat2c", "muz5qqrslo7g", "nrk7fvcygilm", "nt2wtiv7qi3a"],
    # DreamBooth's runs are the toy prior ablation's; LoRA's and Custom Diffusion's w=0 runs are the ladder's own.
    "toy_methods": ["2elj2zpbpmfj", "d7r5k4s4rjnl", "ll7p5igecx4s", "nrk7fvcygilm", "nt2wtiv7qi3a", "nudzmu45wk2r"],
}


def test_shipped_protocols_keep_their_run_keys():
    for name, keys in SHIPPED_KEYS.items():
        assert sorted(r.run_key for r in expand(load_protocol(REPO / "protocols" / f"{name}.yaml"))) == keys, name


def test_a_new_field_at_its_default_leaves_every_key_alone(write_protocol, monkeypatch):
    """Adding a training field (or a method setting) with a default must not orphan stored runs."""
    import dataclasses

    from harness.config import TrainSpec

    p = load_protocol(write_protocol(MINIMAL))
    before = _key(p)

    @dataclasses.dataclass(frozen=True)
    class Extended(DreamBoothSettings):
        new_setting: int = 3

    assert _key(p, method=Extended()) == before
    assert _key(p, method=Extended(new_setting=4)) != before

    @dataclasses.dataclass(frozen=True)
    class NewTrainSpec(TrainSpec):
        new_field: float = 0.5

    def key_with(train) -> str:
        return run_key(run_identity(p.subjects[0], p.model, train, DreamBoothSettings(), p.class_images, "0" * 64))

    assert key_with(NewTrainSpec(**dataclasses.asdict(p.train))) == before
    assert key_with(NewTrainSpec(**dataclasses.asdict(p.train), new_field=0.7)) != before


def _key(protocol, method=None, **train_changes) -> str:
    subject = protocol.subjects[0]
    train = replace(protocol.train, **train_changes)
    spec = protocol.class_images if train.uses_prior else None
    settings = method or protocol.method_settings(train.method)
    return run_key(run_identity(subject, protocol.model, train, settings, spec, "0" * 64))


def test_keys_change_with_what_changes_the_weights(write_protocol):
    p = load_protocol(write_protocol(MINIMAL))
    base = _key(p)
    for change in [{"learning_rate": 1e-6}, {"seed": 1}, {"prior_loss_weight": 0.5}, {"num_class_images": 7},
                   {"resolution": 64}, {"mixed_precision": "fp16"},
                   {"max_grad_norm": None}, {"memory_mode": "low_memory"}]:
        assert _key(p, **change) != base, change
    assert _key(p, method=DreamBoothSettings(train_text_encoder=True)) != base
    other_model = replace(p, model=replace(p.model, revision="abc"))
    assert _key(other_model) != base
    other_subject = replace(p, subjects=(replace(p.subjects[0], identifier="zwx"),))
    assert _key(other_subject) != base
    digest = run_key(run_identity(p.subjects[0], p.model, p.train, DreamBoothSettings(), p.class_images, "1" * 64))
    assert digest != base


def test_keys_ignore_what_does_not_change_the_weights(write_protocol, tmp_path):
    p = load_protocol(write_protocol(MINIMAL))
    base = _key(p)
    assert _key(p, gradient_checkpointing=False) == base
    assert _key(p, save="final", checkpoint_every=50) == base
    assert _key(p, steps=9999) == base  # constant schedule: steps are snapshots
    renamed = replace(p, subjects=(replace(p.subjects[0], name="rex"),))
    assert _key(renamed) == base
    elsewhere = load_protocol(write_protocol(MINIMAL + "output: {runs_dir: /elsewhere/runs}\neval: {seeds: [7]}\n",
                                             "q.yaml"))
    assert _key(elsewhere) == base
    # Without prior preservation, class-image settings are irrelevant.
    no_prior = replace(p, class_images=replace(p.class_images, steps=99))
    assert _key(no_prior, prior_loss_weight=0.0, num_class_images=0) == _key(p, prior_loss_weight=0.0,
                                                                              num_class_images=0)


def test_instance_bytes_change_the_key(write_protocol, subject_dir):
    p = load_protocol(write_protocol(MINIMAL))
    before = expand(p)[0].run_key
    write_images(subject_dir, n=1, seed=42)  # overwrites 00.jpg with other pixels
    assert expand(p)[0].run_key != before


def test_dry_run_plan_lists_runs_pools_and_work():
    plan = make_plan(load_protocol(REPO / "protocols" / "prior_ablation.yaml"))
    text = format_plan(plan)
    assert "7 training runs" in text
    assert "200, 400, 800, 1200" in text
    assert "class-image pool" in text and "200 images" in text
    assert f"optimizer steps {7 * 1200}" in text
    # 25 live prompts + 6 class prompts, 4 seeds, 4 snapshots per run, 7 runs; 200 class images; base model once.
    eval_images = 7 * 4 * (25 + 6) * 4
    assert f"{200} class + {eval_images} evaluation + {(25 + 6) * 4} base model" in text


SIX_AXES_OF_TEN = """
grid:
  learning_rate: [1.0e-6, 2.0e-6, 3.0e-6, 4.0e-6, 5.0e-6, 6.0e-6, 7.0e-6, 8.0e-6, 9.0e-6, 1.0e-5]
  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  num_class_images: [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
  adam_beta1: [0.80, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.87, 0.88, 0.89]
  adam_beta2: [0.990, 0.991, 0.992, 0.993, 0.994, 0.995, 0.996, 0.997, 0.998, 0.999]
  adam_weight_decay: [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]
"""


def test_a_grid_above_the_cap_is_refused_before_it_is_expanded(write_protocol, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a refused grid must not be expanded")

    monkeypatch.setattr("harness.grid.itertools.product", forbidden)
    path = write_protocol(MINIMAL + SIX_AXES_OF_TEN)
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    message = str(info.value)
    assert "grid: has 1,000,000 points (1 subject(s) x 10 learning_rate x 10 seed" in message
    assert "more than the cap of 10,000 (limits.max_grid_points)" in message
    assert "`limits: {max_grid_points: 1000000}`" in message
    assert f"{path}:{path.read_text().splitlines().index('grid:') + 1}: grid: has" in message


def test_the_cap_is_raised_in_the_protocol_and_the_grid_expands_lazily(write_protocol):
    three_axes = MINIMAL + "\n".join(SIX_AXES_OF_TEN.splitlines()[:5]) + "\n"
    with pytest.raises(ProtocolError, match="has 1,000 points"):
        load_protocol(write_protocol(three_axes + "limits:\n  max_grid_points: 999\n"))
    protocol = load_protocol(write_protocol(three_axes + "limits:\n  max_grid_points: 1000\n"))
    assert protocol.grid_size == 1000
    points = grid_points(protocol)
    assert not isinstance(points, list)
    first = next(points)
    assert first[0].name == "dog" and first[1] == {"learning_rate": 1e-6, "seed": 0, "num_class_images": 10}
    assert len(expand(protocol)) == 1000


def test_the_cap_must_be_a_positive_integer(write_protocol):
    with pytest.raises(ProtocolError, match=r"limits\.max_grid_points: must be at least 1, got 0"):
        load_protocol(write_protocol(MINIMAL + "limits:\n  max_grid_points: 0\n"))
