#!/usr/bin/env python
"""Runs a protocol: python run_experiment.py protocols/prior_ablation.yaml [--dry-run]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.console import quiet_libraries  # light; the notebooks call run_experiment.quiet_libraries()

EXIT_STATUSES = """exit status:
  0    every selected run succeeded (or the dry run / report-only finished)
  1    a run failed; the others still ran (its error is in runs/<run_key>/error.json and in runs.csv)
  2    setup error, nothing was run: a bad protocol or bad images, an unknown --only key or --device, a model or
       backbone that cannot be loaded
  130  interrupted (Ctrl-C): finished work is kept; run the same command again to resume
"""


def _device_name(text: str) -> str:
    """argparse type of --device: the spelling is checked here, whether the device exists when a run starts."""
    from harness.devices import DeviceError, check_device_name

    try:
        return check_device_name(text)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from harness import __version__

    parser = argparse.ArgumentParser(
        description="Train, sample and evaluate a grid of subject-driven fine-tuning runs described by a protocol.",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"DreamBooth evaluation harness {__version__}")
    parser.add_argument("protocol", type=Path, help="protocol YAML file, e.g. protocols/smoke.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the protocol and the images, print the runs and the work, and stop")
    parser.add_argument("--only", metavar="RUN_KEY", action="append", default=[],
                        help="run only this run key (repeatable); results and report still cover every finished run")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the CSVs and the report from the run folders; train and generate nothing")
    parser.add_argument("--device", default=None, type=_device_name,
                        help="cpu, cuda, cuda:N, mps or xpu (default: cuda if torch sees a GPU, else cpu)")
    execution = parser.add_argument_group("where the runs execute (overrides the protocol's execution: section)")
    execution.add_argument("--executor", metavar="NAME",
                           help="local (default: workers on this machine) or slurm (a job array through submitit)")
    execution.add_argument("--gpus", metavar="0,1", help="local: the GPUs to use, one worker each (default: all)")
    execution.add_argument("--workers", metavar="N", help="local: worker processes (default: one per GPU; one "
                                                          "in this process without a GPU)")
    execution.add_argument("--execution", metavar="KEY=VALUE", action="append", default=[],
                           help="any execution setting, e.g. partition=gpu, time_limit=120, mem_gb=32 (repeatable)")
    return parser.parse_args(argv)


def execution_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The execution settings given on the command line, read as YAML values (so numbers and lists parse)."""
    import yaml

    from harness.executors import ExecutionError

    def value_of(flag: str, text: str) -> object:
        try:
            return yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ExecutionError(f"{flag}: {text!r} is not a value; quote it or write it as in the protocol "
                                 "(a number, a word, a list like [a, b]).") from None

    values: dict[str, object] = {}
    for item in args.execution:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ExecutionError(f"--execution {item}: write KEY=VALUE, e.g. --execution partition=gpu.")
        values[key.strip()] = value_of(f"--execution {item}", value)
    for key, value in (("executor", args.executor), ("workers", args.workers)):
        if value is not None:
            values[key] = value_of(f"--{key}", value)
    if args.gpus is not None:
        values["gpus"] = [value_of("--gpus", g) for g in args.gpus.split(",") if g.strip()]
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.config import ProtocolError, load_protocol, override_execution
    from harness.data import InstanceDataError
    from harness.devices import DeviceError
    from harness.executors import ExecutionError
    from harness.plan import UnknownRunError

    try:
        if not args.dry_run:  # the libraries take seconds to load: say at once what is happening
            print(f"{args.protocol}: checking the protocol and the images", flush=True)
        protocol = override_execution(load_protocol(args.protocol), execution_overrides(args))
        if args.dry_run:
            from harness.executors import EXECUTORS
            from harness.ownership import check_outputs
            from harness.plan import format_plan, make_plan, select_runs
            from harness.progress import longest_first

            check_outputs(protocol)
            plan = make_plan(protocol)
            select_runs(plan, args.only)
            print(format_plan(plan))
            executor = EXECUTORS.get(protocol.execution.executor)
            print("\n" + "\n".join(executor.describe(plan, tuple(longest_first(protocol, plan.runs)))))
            if protocol.execution.deterministic:
                print("Deterministic kernels (execution.deterministic): slower; compile: auto stays eager.")
            return 0
        quiet_libraries()
        from harness.backbones import BackboneUnavailableError
        from harness.backends import ModelUnavailableError
        from harness.executors import StudyFailedError
        from harness.runner import run_protocol

        try:
            return run_protocol(protocol, only=tuple(args.only), report_only=args.report_only, device=args.device)
        except (ModelUnavailableError, BackboneUnavailableError) as e:
            print(f"error: {e}", file=sys.stderr)  # the message names the ways out (network, local folder, tiny)
            return 2
        except StudyFailedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except (ProtocolError, InstanceDataError, ExecutionError, DeviceError, UnknownRunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
