"""The slurm executor: a study as three kinds of Slurm jobs, submitted through submitit.

1. prepare: one job that makes the instance images, the class-image pools and the reference rows. It is a job, not
   work done where the command runs, because it needs a GPU (class images and base-model images are generated) and
   a cluster's login node usually has none and is not for heavy work; it also gets the same kind of node as the runs.
2. execute: a job array over the run keys not complete yet (longest first, `slurm_array_parallelism` tasks at
   once), started once prepare succeeded. Each task executes one run under the run store's lock (it waits if
   another invocation holds the run). A task that Slurm stops at its time limit or preempts is requeued (submitit's
   checkpointing) and the run resumes from its last snapshot or checkpoint; a task that fails is recorded in the
   run's error.json, as locally.
3. collect: a job after the array, whatever became of it, that writes the CSVs and the report, so they appear even
   when nobody waits for them.
The command waits for the collect job, drawing one view from the status files the jobs write, then prints the
account of the runs; Ctrl-C stops only the waiting (the jobs go on). Every path the jobs use is made absolute, and
must lie on a filesystem that every node mounts at the same place: `check` refuses the ones that cannot be (/tmp,
/dev/shm, tmpfs), and every job checks that it sees the study's folders before working.

What this module does not hold: what the jobs do (prepare.py, execute.py, collect.py), the settings and checks
(slurm_settings.py), the submitted callables and the waiting (slurm_jobs.py, which imports submitit).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.executors import ExecutionError, Executor, StudyJob, StudyOutcome
from harness.executors.slurm_settings import (
    absolute_outputs,
    local_only_reason,
    sbatch_lines,
    sbatch_parameters,
    setup_lines,
    shared_folders,
)


class SlurmExecutor(Executor):
    name = "slurm"

    def check(self, protocol: Any) -> list[str]:
        problems = []
        if shutil.which("sbatch") is None:
            problems.append("execution.executor slurm: Slurm's sbatch is not on PATH; run the command on a login "
                            "node of the cluster, or use the local executor (--executor local).")
        for setting, path in shared_folders(protocol).items():
            reason = local_only_reason(path)
            if reason:
                problems.append(f"{setting}: {path} {reason}; Slurm jobs run on other machines and would not see "
                                "it. Put it on a filesystem every node mounts at the same path (a home, project or "
                                "scratch folder).")
        return problems

    def describe(self, plan: Any, runs: tuple[Any, ...]) -> list[str]:
        spec = plan.protocol.execution
        parallel = f"%{spec.slurm_array_parallelism}" if spec.slurm_array_parallelism else ""
        lines = ["Execution (slurm): three jobs through submitit; every job runs:", *[f"  {s}" for s in
                                                                                    setup_lines(spec)]]
        lines += ["  prepare (instance images, class-image pools, reference rows):",
                  *[f"    {line}" for line in sbatch_lines(sbatch_parameters(spec, "prepare"))],
                  f"  execute, once prepare succeeded: a job array of the runs not complete yet, longest first "
                  f"({len(runs)} at most):",
                  *[f"    {line}" for line in sbatch_lines(sbatch_parameters(spec, "execute"),
                                                          dependency="afterok:<prepare>",
                                                          array=f"0-{max(len(runs) - 1, 0)}{parallel}")],
                  *[f"    task {i}: {run.run_key}" for i, run in enumerate(runs)],
                  "  collect (CSVs and report), after the array whatever became of it:",
                  *[f"    {line}" for line in sbatch_lines(sbatch_parameters(spec, "collect"),
                                                          dependency="afterany:<array>")],
                  f"  logs and progress under {Path(spec.log_dir).absolute()}/"]
        problems = self.check(plan.protocol)
        if problems:
            lines += ["  problems (the study would not be submitted):", *[f"    - {p}" for p in problems]]
        return lines

    def run(self, job: StudyJob) -> StudyOutcome:
        from harness.executors.slurm_jobs import submit_and_wait

        if job.device is not None:
            raise ExecutionError("--device picks the device of a local worker; Slurm gives each job its GPUs "
                                 "(execution.gpus_per_task). Leave out --device, or use --executor local.")

        protocol = absolute_outputs(job.plan.protocol)
        plan = replace(job.plan, protocol=protocol)
        for folder in (protocol.output.runs_dir, protocol.output.cache_dir, protocol.execution.log_dir):
            Path(folder).mkdir(parents=True, exist_ok=True)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        return submit_and_wait(replace(job, plan=plan), Path(protocol.execution.log_dir) / f"{protocol.name}-{stamp}")


EXECUTOR = SlurmExecutor()
