"""The fast paths' rules and bookkeeping: when `compile: auto` compiles, the throughput table and the dry run's
estimate, the time and work per phase, losses read in batches, the step clock, and components reused in place.
The compiled paths themselves (slow: they trace the model) are in tests/test_compiled.py."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness import fastpath, throughput
from harness.backends.tiny import build_tiny_components
from harness.config import ModelSpec, load_protocol
from harness.fastpath import Payback, decide
from harness.grid import WorkEstimate
from harness.plan import make_plan
from harness.timings import Timings, count
from harness.trainer import loop as trainer
from harness.trainer import reuse, session
from tests.conftest import write_images
from tests.test_trainer import Recorder, make_run, open_folder, start, synthetic_data

PAYBACK = Payback(eager_seconds=0.27, compiled_seconds=0.131, compile_seconds=150.0, source="test")


# --------------------------------------------------------------------------------------------------------------
# When `auto` compiles


def test_break_even_is_compile_time_over_the_saving():
    assert PAYBACK.break_even() == pytest.approx(150 / 0.139)
    assert Payback(1.0, 1.0, 10.0, "no gain").break_even() == float("inf")


@pytest.mark.parametrize(("setting", "device", "work", "warm", "unsupported", "compiles", "says"), [
    (False, "cuda", 10**6, True, None, False, "compile: false"),
    (True, "cpu", 1, False, None, True, "compile: true"),
    (True, "cuda", 10**6, False, "the method changes the model", False, "the method changes the model"),
    ("auto", "cpu", 10**6, True, None, False, "eager on cpu"),
    ("auto", "cuda", 1000, False, None, False, "fewer than the ~1079"),
    ("auto", "cuda", 1100, False, None, True, "1100 steps pay back ~150 s"),
    ("auto", "cuda", 20, True, None, True, "already in memory"),
])
def test_auto_compiles_where_the_work_pays_the_compilation_back(setting, device, work, warm, unsupported, compiles,
                                                                says):
    decision = decide(setting, device, work, PAYBACK, "steps", warm=warm, unsupported=unsupported)
    assert decision.compile is compiles
    assert says in decision.reason


def test_deterministic_execution_keeps_auto_eager_and_compile_true_compiled():
    auto = decide("auto", "cuda", 10**6, PAYBACK, "steps", deterministic=True)
    assert auto.compile is False and "execution.deterministic" in auto.reason
    assert decide(True, "cuda", 1, PAYBACK, "steps", deterministic=True).compile is True


@pytest.mark.parametrize("device, steps, compiled, deterministic, autotunes", [
    ("cuda", fastpath.AUTOTUNE_PAYBACK_STEPS, False, False, True),
    ("cuda", fastpath.AUTOTUNE_PAYBACK_STEPS - 1, False, False, False),  # a short study: ~15 s a shape lost
    ("cuda", 20, True, False, True),  # compiled: seconds of timing beside minutes of compilation
    ("cuda", 100_000, True, True, False),  # deterministic: timing may pick another algorithm in each process
    ("cpu", 100_000, False, False, False),
])
def test_cudnn_times_its_algorithms_only_where_the_steps_pay_it_back(device, steps, compiled, deterministic,
                                                                   autotunes):
    autotune, why = fastpath.autotune_training(device, steps, compiled, deterministic)
    assert autotune is autotunes
    assert ("not autotuned" in why or device == "cpu") is not autotunes


def test_a_run_autotunes_by_the_studys_steps_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fastpath, "_study", fastpath.StudyWork())
    run = make_run(tmp_path, snapshot_steps=(4,))
    method = trainer.make_method(run)
    unet = build_tiny_components().unet
    monkeypatch.setattr(trainer, "decide_training", lambda *a: (fastpath.Decision(False, "eager"), None))
    with caplog.at_level("INFO", logger="harness.trainer.loop"):
        short = trainer.run_speedups(run, method, unet, torch.device("cuda"), 4, [])
        fastpath.expect_study(WorkEstimate(training_runs=7, optimizer_steps=8400, snapshots=0, class_images=0,
                                           eval_images=0, base_model_images=0))
        long = trainer.run_speedups(run, method, unet, torch.device("cuda"), 4, [])
    assert (short.cudnn_benchmark, long.cudnn_benchmark) == (False, True)
    assert "4 steps are fewer than the ~1500" in caplog.text and "8400 steps pay back" in caplog.text


def test_an_unknown_setting_is_refused():
    for bad in ("on", 1, None):
        with pytest.raises(ValueError, match="auto, true or false"):
            decide(bad, "cuda", 1, PAYBACK)


def test_the_study_announces_its_work(monkeypatch):
    monkeypatch.setattr(fastpath, "_study", fastpath.StudyWork())
    fastpath.expect_study(WorkEstimate(training_runs=7, optimizer_steps=8400, snapshots=28, class_images=200,
                                       eval_images=3472, base_model_images=124))
    assert fastpath.study_work() == fastpath.StudyWork(training_steps=8400, images=3796)


# --------------------------------------------------------------------------------------------------------------
# The throughput table and the dry run's estimate

H100 = "NVIDIA H100 80GB HBM3"


def figure(**values):
    return {"commit": "abc1234", "date": "2026-11-26", **values}


TABLE = {"schema": 1, "gpus": {H100: {
    "train.dreambooth.fast.checkpointing": {
        "eager": figure(seconds_per_step=0.3), "compiled": figure(seconds_per_step=0.1, compile_seconds=100.0)},
    "sampling.class": {"eager": figure(images_per_second=2.0)},
    "sampling.eval": {"eager": figure(images_per_second=4.0),
                      "compiled": figure(images_per_second=8.0, compile_seconds=50.0)},
    "scoring": {"eager": figure(images_per_second=100.0)},
}}}


@pytest.fixture
def table(monkeypatch, tmp_path):
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setattr(throughput, "load_table", lambda path=path: json.loads(path.read_text()))
    return TABLE


def test_figures_are_found_by_gpu_name_whatever_the_case_and_spacing(table):
    assert throughput.gpu_figures("nvidia  h100 80gb hbm3") == TABLE["gpus"][H100]
    assert throughput.gpu_figures("Tesla T4") is None and throughput.gpu_figures(None) is None


def test_payback_comes_from_the_table_where_it_was_measured(table):
    measured = throughput.payback_for("training", "train.dreambooth.fast.checkpointing", H100)
    assert (measured.eager_seconds, measured.compiled_seconds, measured.compile_seconds) == (0.3, 0.1, 100.0)
    assert measured.break_even() == pytest.approx(500)
    assert throughput.payback_for("sampling", "sampling.eval", H100).break_even() == pytest.approx(50 / 0.125)
    # No compiled figure (class images): on an H100 or H200, the defaults measured on an H100; elsewhere nothing.
    assert throughput.payback_for("sampling", "sampling.class", H100) is fastpath.DEFAULT_PAYBACK["sampling"]
    assert throughput.payback_for("training", "train.x", "NVIDIA H200") is fastpath.DEFAULT_PAYBACK["training"]
    assert throughput.payback_for("training", "train.x", "Tesla T4") is None
    assert throughput.payback_for("training", "train.x", None) is None


def test_auto_stays_eager_on_a_gpu_without_figures():
    decision = decide("auto", "cuda", 10**6, None, "steps")
    assert not decision.compile and "no compile figures measured on this GPU" in decision.reason
    assert decide(True, "cuda", 1, None).compile and decide("auto", "cuda", 1, None, warm=True).compile


def test_merging_figures_keeps_the_others():
    merged = throughput.merge_figures(TABLE, H100, {"sampling.class": {"compiled": {"images_per_second": 5.0}},
                                                    "scoring": {"eager": {"images_per_second": 1.0}}})
    entry = merged["gpus"][H100]
    assert entry["sampling.class"] == {"eager": figure(images_per_second=2.0),
                                       "compiled": {"images_per_second": 5.0}}
    assert entry["scoring"]["eager"] == {"images_per_second": 1.0}
    assert TABLE["gpus"][H100]["scoring"]["eager"]["images_per_second"] == 100.0  # the input is not changed
    other = throughput.merge_figures(merged, "Tesla T4", {"scoring": {"eager": {"images_per_second": 9.0}}})
    assert set(other["gpus"]) == {H100, "Tesla T4"}


def test_the_shipped_table_loads_and_holds_only_known_figures():
    shipped = throughput.load_table.__wrapped__(throughput.TABLE_PATH)
    for gpu, entries in shipped["gpus"].items():
        for key, paths in entries.items():
            assert key.startswith(("train.", "sampling.", "scoring")), (gpu, key)
            for path, fig in paths.items():
                assert path in ("eager", "compiled") and fig.get("commit") and fig.get("date"), (gpu, key, path)
                assert ("seconds_per_step" in fig) != ("images_per_second" in fig), (gpu, key, path)
                assert path == "eager" or "compile_seconds" in fig, (gpu, key, path)


def protocol_plan(write_protocol, steps: int = 1000, compile: str = "auto", eval_compile: str = "auto"):
    photos = write_images(Path(write_protocol("").parent) / "photos", n=3, size=256)  # big enough for 512 px
    path = write_protocol(f"""
        model: {{id: tiny}}
        subjects: [{{name: dog, instance_dir: {photos}, class_noun: dog}}]
        train: {{resolution: 512, steps: {steps}, num_class_images: 10, compile: {compile}}}
        class_images: {{compile: true}}
        eval: {{backbones: tiny, seeds: [0, 1], max_subject_prompts: 2, class_prompts: ["a {{class}}"],
                compile: {eval_compile}}}
    """)
    return make_plan(load_protocol(path))


def test_the_estimate_adds_each_phase_from_the_gpus_figures(table, write_protocol):
    plan = protocol_plan(write_protocol, steps=1000)
    lines = throughput.estimate_lines(plan.protocol, plan.runs, plan.work, True, gpu=(H100, "nvidia-smi"))
    text = "\n".join(lines)
    assert lines[0].startswith(f"Time estimate for {H100} (found with nvidia-smi)") and "estimate" in lines[0]
    phases = {p.phase: p for p in throughput.estimate_phases(plan.protocol, plan.runs, plan.work,
                                                             TABLE["gpus"][H100], H100)}
    # 1000 steps pay back 100 s of compilation (break-even 500): compiled, 1000 x 0.1 s + 100 s.
    assert phases["training"].seconds == pytest.approx(1000 * 0.1 + 100)
    assert "compiled figure measured at abc1234" in phases["training"].basis
    # 10 class images at 2 images/s: compile is on, but there is no compiled figure: the eager one, and it says so.
    assert phases["class images"].seconds == pytest.approx(5.0)
    assert "no compiled figure yet" in phases["class images"].basis
    # 6 evaluation images + 6 base-model images, too few to compile: eager at 4 images/s.
    assert plan.work.eval_images + plan.work.base_model_images == 12
    assert phases["sampling"].seconds == pytest.approx(12 / 4.0)
    assert phases["scoring"].seconds == pytest.approx(12 / 100.0)
    assert "total" in lines[-1] and "3 min" in lines[-1]  # 200 + 5 + 3 + 0.12 s
    assert "training" in text and "1000 steps" in text


def test_the_sampling_kinds_share_one_compile_time(monkeypatch, write_protocol):
    table = json.loads(json.dumps(TABLE))
    figures = table["gpus"][H100]
    # measured after the evaluation images had compiled the UNet that class images render through too
    figures["sampling.class"]["compiled"] = figure(images_per_second=4.0, compile_seconds=0.1)
    assert throughput.compile_seconds(figures, "sampling.class") == 50.0
    assert throughput.compile_seconds(figures, "sampling.eval") == 50.0
    assert throughput.compile_seconds(figures, "train.dreambooth.fast.checkpointing") == 100.0
    assert throughput.compile_seconds(TABLE["gpus"][H100], "sampling.class") is None  # no compiled figure
    monkeypatch.setattr(throughput, "load_table", lambda path=None: table)
    payback = throughput.payback_for("sampling", "sampling.class", H100)
    assert payback.compile_seconds == 50.0 and payback.break_even() == pytest.approx(50 / (1 / 2.0 - 1 / 4.0))
    # Both kinds compiled (`compile: true`): the class images pay the compilation, the evaluation images find it.
    plan = protocol_plan(write_protocol, steps=1000, eval_compile="true")
    phases = {p.phase: p for p in throughput.estimate_phases(plan.protocol, plan.runs, plan.work, figures, H100)}
    assert phases["class images"].seconds == pytest.approx(10 / 4.0 + 50.0)
    assert phases["sampling"].seconds == pytest.approx(12 / 8.0)


def test_the_estimate_scales_to_the_protocols_settings_and_follows_compile_off(table, write_protocol):
    plan = protocol_plan(write_protocol, steps=1000, compile="false")
    phases = {p.phase: p for p in throughput.estimate_phases(plan.protocol, plan.runs, plan.work,
                                                             TABLE["gpus"][H100], H100)}
    assert phases["training"].seconds == pytest.approx(1000 * 0.3)
    run = replace(plan.runs[0], train=replace(plan.runs[0].train, resolution=256, prior_loss_weight=0.0))
    quarter = throughput.estimate_phases(plan.protocol, [run], replace(plan.work, optimizer_steps=1000),
                                         TABLE["gpus"][H100], H100)
    # 256 px and one image per step instead of two: 1/4 of the pixels, 1/2 of the images.
    assert quarter[1].seconds == pytest.approx(1000 * 0.3 / 8) and "scaled" in quarter[1].basis


def test_a_deterministic_study_is_estimated_eager(table, write_protocol):
    plan = protocol_plan(write_protocol, steps=1000)
    protocol = replace(plan.protocol, execution=replace(plan.protocol.execution, deterministic=True))
    phases = {p.phase: p for p in throughput.estimate_phases(protocol, plan.runs, plan.work,
                                                             TABLE["gpus"][H100], H100)}
    assert phases["training"].seconds == pytest.approx(1000 * 0.3)  # eager, where auto would compile (see above)


def test_the_estimate_says_when_it_cannot_be_made(table, write_protocol):
    plan = protocol_plan(write_protocol)
    unknown = throughput.estimate_lines(plan.protocol, plan.runs, plan.work, True, gpu=("Tesla T4", "torch"))
    assert unknown == [f"Time estimate: no figures for Tesla T4 in throughput.json (measured GPUs: {H100}); "
                       "`python benchmarks/bench_throughput.py --update` on this GPU adds them."]
    none = throughput.estimate_lines(plan.protocol, plan.runs, plan.work, True, gpu=(None, "nvidia-smi found no GPU"))
    assert none == ["Time estimate: no CUDA GPU found (nvidia-smi found no GPU); the table holds GPU figures only."]
    tiny = throughput.estimate_lines(plan.protocol, plan.runs, plan.work, False, gpu=(H100, "torch"))
    assert "none for model 'tiny'" in tiny[0]


def test_the_gpu_is_found_with_nvidia_smi_when_torch_is_not_loaded(monkeypatch):
    calls = []

    class Done:
        returncode, stdout = 0, "NVIDIA H100 80GB HBM3\nNVIDIA H100 80GB HBM3\n"

    def run(command, **kwargs):
        calls.append(command)
        return Done()

    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(throughput.subprocess, "run", run)
    assert throughput.find_gpu() == (H100, "nvidia-smi")
    assert calls == [["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]]

    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    monkeypatch.setattr(throughput.subprocess, "run", missing)
    assert throughput.find_gpu() == (None, "nvidia-smi unavailable (FileNotFoundError)")


def test_with_torch_loaded_the_gpu_comes_from_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    assert throughput.find_gpu() == ("NVIDIA H200", "torch")


# --------------------------------------------------------------------------------------------------------------
# Time and work per phase


def test_work_is_credited_to_the_innermost_phase_and_shown_as_a_rate(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 20.0, 22.0])
    cpu_clock = iter([0.0, 0.5, 1.5, 6.0, 6.0, 7.0])
    monkeypatch.setattr("harness.timings.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr("harness.timings.time.process_time", lambda: next(cpu_clock))
    timings = Timings()
    count(5, "images")  # outside any phase: nothing
    with timings.phase("training"):  # 0 .. 10 s, 2 of them in sampling
        count(400, "steps")
        with timings.phase("sampling"):  # 1 .. 3 s
            count(10, "images")
    with timings.phase("sampling"):  # 20 .. 22 s
        count(6, "images")
    assert timings.seconds == {"sampling": 4.0, "training": 8.0}
    assert timings.cpu_seconds == {"sampling": 2.0, "training": 5.0}
    assert timings.work == {"training": {"steps": 400}, "sampling": {"images": 16}}
    assert timings.rate("training") == "400 steps, 0.020 s/step"
    assert timings.rate("sampling") == "16 images, 4.00 images/s"
    table = timings.table().splitlines()
    assert table[0].split()[-2:] == ["wall", "CPU"]
    assert table[1].split() == ["sampling", "4.0", "s", "2.0", "s", "16", "images,", "4.00", "images/s"]
    assert table[-1].split() == ["total", "12.0", "s", "7.0", "s"]


# --------------------------------------------------------------------------------------------------------------
# Losses read in batches, and the step clock


def test_a_step_never_waits_for_the_device(tmp_path, monkeypatch):
    run = make_run(tmp_path, (3,))
    step = start(run, build_tiny_components(), synthetic_data(), "cpu")
    reads = []

    def spy(name, real):
        def read(self, *args, **kwargs):
            if self.is_floating_point():  # the data order reads integer permutations, drawn on the CPU
                reads.append(name)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    pending = [trainer.advance(step) for _ in range(3)]
    assert reads == []  # nothing read the device inside a step
    losses = session.read_losses(pending)
    assert reads == ["tolist"]  # one read for all three steps
    assert [loss.step for loss in losses] == [1, 2, 3] and all(loss.prior is not None for loss in losses)


def test_losses_read_in_batches_equal_losses_read_every_step(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "LOSS_READ_EVERY", 2)
    run = make_run(tmp_path, (2, 5), checkpoint_every=3)
    result = trainer.train(run, open_folder(tmp_path, run), build_tiny_components(), synthetic_data(), Recorder(),
                           "cpu")
    step = start(run, build_tiny_components(), synthetic_data(), "cpu")
    one_by_one = [trainer.advance(step).read() for _ in range(5)]
    assert result.loss_history == [vars(loss) for loss in one_by_one]
    assert result.compiled is None and result.warmup_seconds is not None


def test_the_clock_leaves_out_the_warm_up_and_the_pauses(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(session.time, "perf_counter", lambda: now[0])
    clock = session.StepClock(torch.device("cpu"), start_step=10, warmup_steps=2)
    now[0] = 50.0  # steps 11-12, compilation included
    clock.lap(12)
    now[0] = 52.0  # steps 13-14
    clock.lap(14)
    paused_at = clock.pause()
    now[0] = 80.0  # a snapshot
    clock.restart(14, paused_at)
    now[0] = 83.0  # steps 15-17
    clock.lap(17)
    assert clock.warmup_seconds == 50.0
    assert clock.seconds_per_step(7) == pytest.approx(5.0 / 5)
    short = session.StepClock(torch.device("cpu"), start_step=0, warmup_steps=2)
    now[0] = 90.0
    short.lap(2)  # a two-step run: nothing after the warm-up
    assert short.seconds_per_step(2) == pytest.approx(7.0 / 2)


# --------------------------------------------------------------------------------------------------------------
# Components reused in place


@pytest.fixture
def forget_kept():
    reuse.forget()
    yield
    reuse.forget()


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_later_run_gets_the_same_modules_with_the_published_weights(tmp_path, forget_kept):
    model = ModelSpec(id="tiny")
    first = reuse.training_components(model)
    published = {name: state(getattr(first, name)) for name in reuse.MODULES}
    pointers = {k: v.data_ptr() for k, v in first.unet.state_dict().items()}
    run = make_run(tmp_path, (2,), train_text_encoder=True)
    trainer.train(run, open_folder(tmp_path, run), first, synthetic_data(), Recorder(), "cpu")
    assert any(not torch.equal(published["unet"][k], v) for k, v in first.unet.state_dict().items())

    second = reuse.training_components(model)
    assert second.unet is first.unet and second.text_encoder is first.text_encoder
    assert {k: v.data_ptr() for k, v in second.unet.state_dict().items()} == pointers  # restored in place
    fresh = build_tiny_components()
    for name in reuse.MODULES:
        restored, loaded = state(getattr(second, name)), state(getattr(fresh, name))
        assert all(torch.equal(restored[k], loaded[k]) for k in loaded), name
    assert not hasattr(second.unet, "_harness_trained_for")
    assert all(p.requires_grad and p.grad is None for p in second.unet.parameters())
    assert not second.unet.is_gradient_checkpointing and not second.unet.training
    other = make_run(tmp_path, (1,), seed=3)  # the restored components train again
    trainer.train(other, open_folder(tmp_path / "other", other), second, synthetic_data(), Recorder(), "cpu")


def test_a_changed_structure_or_another_model_loads_afresh(forget_kept):
    first = reuse.training_components(ModelSpec(id="tiny"))
    first.unet.extra = torch.nn.Linear(2, 2)  # what a method's adapter left behind
    second = reuse.training_components(ModelSpec(id="tiny"))
    assert second.unet is not first.unet and not hasattr(second.unet, "extra")
    second.scheduler_config["prediction_type"] = "v_prediction"  # each call gets its own copy of the config
    third = reuse.training_components(ModelSpec(id="tiny"))
    assert third.unet is second.unet and third.scheduler_config["prediction_type"] == "epsilon"
    assert reuse.training_components(ModelSpec(id="tiny", dtype="bf16")).unet is not third.unet


@pytest.mark.slow
def test_a_study_on_reused_components_trains_what_fresh_components_train(tmp_path, forget_kept, write_protocol):
    from safetensors.torch import load_file

    from harness.runner import run_protocol

    path = write_protocol("""
        model: {id: tiny}
        subjects: [{name: dog, instance_dir: {subject_dir}, class_noun: dog}]
        train: {resolution: 32, steps: 2, learning_rate: 1.0e-3, prior_loss_weight: 0.0, save: final}
        eval: {backbones: tiny, seeds: [0], max_subject_prompts: 1, class_prompts: ["a {class}"], steps: 2}
        grid: {seed: [0, 1]}
    """)

    def study(folder: Path):
        protocol = load_protocol(path)
        return replace(protocol, output=replace(protocol.output, runs_dir=folder / "runs", cache_dir=folder / "cache",
                                                results_dir=folder / "results", reports_dir=folder / "reports"))

    together = study(tmp_path / "together")
    assert run_protocol(together, device="cpu") == 0  # the second run restores the first run's modules
    second = make_plan(together).runs[1]
    reuse.forget()
    assert run_protocol(study(tmp_path / "alone"), only=(second.run_key,), device="cpu") == 0

    def exported(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(folder / "runs" / second.run_key / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")

    a, b = exported(tmp_path / "together"), exported(tmp_path / "alone")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_compiled_copy_takes_weights_that_fit_and_reads_its_state_dict_once(monkeypatch):
    from harness import inference

    unet = build_tiny_components().unet
    copy = inference._empty_like(unet, torch.float32)
    copy.fuse_qkv_projections()
    assert any(inference.is_fused_key(k) for k in copy.state_dict())
    reads = []
    state_dict = copy.state_dict
    monkeypatch.setattr(copy, "state_dict", lambda *a, **k: reads.append(1) or state_dict(*a, **k))
    assert inference.fits(unet.state_dict(), copy)
    # Once per check, not once per key: at SD 1.5's size a read per key cost seconds every sampling call.
    assert len(reads) <= 2
    wrong = {**unet.state_dict(), "conv_in.weight": torch.zeros(1)}
    assert not inference.fits(wrong, copy)
    assert not inference.fits({k: v for k, v in unet.state_dict().items() if k != "conv_in.weight"}, copy)
