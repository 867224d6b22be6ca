"""The progress a worker publishes and the one view the command draws of it: run starts and ends, a step bar with
the loss, the ETA, and no stray lines when the output is not a terminal."""

from __future__ import annotations

import io

import pytest

from harness.console import StudyView, duration, progress_bar
from harness.progress import Reporter, RunCost, WorkerStatus, bar, file_publisher, read_status, reporting


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


COST = RunCost(step=1.0, image=0.5, total=20.0)  # 10 steps + 20 images


def view_of(live: bool, runs: int = 2) -> tuple[StudyView, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    view = StudyView(runs, {f"key{i}": COST for i in range(runs)}, stream=out, live=live, clock=clock)
    return view, out, clock


def test_run_start_steps_and_end_are_reported_once_each():
    view, out, _ = view_of(live=False)
    reporter = Reporter("cpu", "cpu", publish=view.update)
    reporter.start_run("key0", "dog {'w': 1}", COST)
    assert out.getvalue() == ""  # a run that turns out to be done is not announced as started
    reporter.activity("load model")
    for step in range(1, 4):
        reporter.train_step(step, 10, loss=0.5 / step)
    reporter.finish_run("key0", "trained", "key0 dog {'w': 1}: trained (0.1 s/step)")
    assert out.getvalue().splitlines() == ["[1/2] key0 dog {'w': 1}: started",
                                           "[1/2] key0 dog {'w': 1}: trained (0.1 s/step)"]
    assert view.runs_done == 1


def test_the_worker_line_shows_the_step_bar_and_the_loss():
    view, _, _ = view_of(live=True)
    status = WorkerStatus(worker="gpu1", run_key="abc", activity="train", done=5, total=10, unit="step", loss=0.1234)
    view.update(status)
    view.update(WorkerStatus(worker="gpu0", run_key="def", activity="sample step 2", done=1, total=4, unit="img"))
    assert view.worker_line(status) == f"gpu1    abc train {progress_bar(5, 10)} 5/10 loss 0.1234"
    assert progress_bar(5, 10, width=4) == "██░░"


def test_the_eta_follows_the_measured_work():
    view, _, clock = view_of(live=False, runs=2)  # 40 units in all
    reporter = Reporter("cpu", publish=view.update)
    reporter.start_run("key0", "dog", COST)
    reporter.activity("load model")
    assert view.eta() is None  # nothing measured yet
    clock.now += 10
    for step in range(1, 11):
        reporter.train_step(step, 10, loss=0.1)  # 10 units of work in 10 s
    assert view.eta() == pytest.approx(30.0)  # 30 units left at 1 unit/s
    assert view.study_line() == "0/2 runs done, 0:10 spent, ETA 0:30"


def test_without_a_terminal_a_progress_line_comes_every_half_minute_and_only_when_something_moved():
    view, out, clock = view_of(live=False)
    reporter = Reporter("cpu", publish=view.update)
    reporter.start_run("key0", "dog", COST)
    reporter.activity("load model")
    clock.now += 31
    reporter.train_step(1, 10, loss=0.25)
    reporter.publish()
    clock.now += 31
    view.tick()  # nothing moved: no second line
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] key0 dog: started"
    assert lines[1:] == ["  .. 0/2 runs done, 0:31 spent, ETA 20:09; key0 train 1/10 loss 0.2500"]
    assert "\r" not in out.getvalue() and "0%" not in out.getvalue()


def test_on_a_terminal_the_live_block_is_redrawn_in_place():
    view, out, clock = view_of(live=True)
    view.update(WorkerStatus(worker="cpu", run_key="key0", activity="train", done=1, total=4, unit="step"))
    clock.now += 1
    view.print("a permanent line")
    text = out.getvalue()
    assert "\x1b[1A\x1b[2K" in text  # the block is erased before the permanent line
    assert text.rstrip("\n").splitlines()[-2:] == ["  0/2 runs done, 0:01 spent", "  key0 train "
                                                   f"{progress_bar(1, 4)} 1/4"]


def test_messages_of_a_worker_are_printed_once(tmp_path):
    view, out, _ = view_of(live=False)
    path = tmp_path / "w.json"
    reporter = Reporter("gpu0", publish=file_publisher(path))
    reporter.message("cache/latents/x.safetensors cannot be read; it will be made again.")
    view.update(read_status(path))
    view.update(read_status(path))
    assert out.getvalue().splitlines() == ["cache/latents/x.safetensors cannot be read; it will be made again."]


def test_generation_bars_report_to_the_active_worker():
    reporter = Reporter("cpu")
    with reporting(reporter):
        images = bar(total=8, desc="sample step 2")
        images.update(4)
        assert (reporter.status.activity, reporter.status.done, reporter.status.total) == ("sample step 2", 4, 8)
    from tqdm import tqdm

    outside = bar(total=1, desc="outside a study")
    assert isinstance(outside, tqdm) and not outside.leave
    outside.close()


def test_durations_read_like_clocks():
    assert [duration(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]
