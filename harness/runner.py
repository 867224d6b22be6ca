"""Runs a protocol end to end: plan, then the executor's prepare -> execute -> collect, then the account.

The executor (`execution.executor`, harness/executors) decides where the phases run; every phase skips what is
already on disk and whole, so running the same protocol again trains, generates and embeds nothing new and only
rebuilds the CSVs and the report. One failing run is recorded in its folder (error.json) and the others go on; the
exit status says whether every selected run finished.

What this module does not hold: any phase (prepare.py, execute.py, collect.py) or where it runs (executors).
torch, diffusers and the trainer are imported where a phase needs them, so a re-run with nothing to do loads
neither them nor a backbone.
"""

from __future__ import annotations

import time

from harness.config import Protocol
from harness.devices import resolve_device
from harness.executors import EXECUTORS, ExecutionError, StudyJob
from harness.fastpath import expect_study
from harness.ownership import claim_outputs
from harness.plan import make_plan, select_runs
from harness.progress import longest_first


def run_protocol(protocol: Protocol, only: tuple[str, ...] = (), report_only: bool = False,
                 device: str | None = None) -> int:
    """Runs the protocol; returns the process exit status (0 when every selected run succeeded)."""
    started = time.perf_counter()
    if device is not None:
        resolve_device(device)  # a device this machine lacks is a setup error, found before any file is written
    claim_outputs(protocol)  # another protocol file of the same name would have its outputs overwritten
    plan = make_plan(protocol)
    expect_study(plan.work)  # lets `compile: auto` amortise compilation over the whole grid
    for note in plan.warnings:
        print(f"note: {note}")
    runs = list(select_runs(plan, only))
    from harness.collect import account, collect
    from harness.study import Study

    if report_only:
        study = Study.open(protocol, "cpu")  # nothing is loaded: the records are read back
        print(f"{protocol.name}: rebuilding the CSVs and the report from {len(plan.runs)} run folder(s)")
        results, report = collect(plan, study)
        timings = study.timings
    else:
        executor = EXECUTORS.get(protocol.execution.executor)
        problems = executor.check(protocol)
        if problems:
            raise ExecutionError("\n".join(problems))
        outcome = executor.run(StudyJob(plan, tuple(longest_first(protocol, runs)), device))
        results, report, timings = outcome.results, outcome.report, outcome.timings
    print(timings.table())
    print(f"results: {results}\nreport:  {report}\nwall time: {time.perf_counter() - started:.1f} s")
    if report_only:
        return 0
    unfinished = [a for a in account(Study.open(protocol, "cpu"), runs) if a.status != "ok"]
    failed = [a for a in unfinished if a.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(f"{a.run.run_key} ({a.message[:200]})" for a in failed))
    others = [a for a in unfinished if a.status != "failed"]
    if others:
        print(f"{len(others)} run(s) did not finish: " + ", ".join(a.run.run_key for a in others)
              + "; run the same command again to resume them.")
    return 1 if unfinished else 0
