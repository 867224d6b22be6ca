#!/usr/bin/env python
"""Runs a protocol: python run_experiment.py protocols/prior_ablation.yaml [--dry-run]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train, sample and evaluate a grid of subject-driven fine-tuning runs described by a protocol.",
    )
    parser.add_argument("protocol", type=Path, help="protocol YAML file, e.g. protocols/smoke.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the protocol and the images, print the runs and the work, and stop")
    parser.add_argument("--only", metavar="RUN_KEY", action="append", default=[],
                        help="run only this run key (repeatable); results and report still cover every finished run")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the CSVs and the report from the run folders; train and generate nothing")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    """Keeps the libraries' informational chatter (dtype casts, deprecations) out of the progress output."""
    import logging
    import warnings

    import diffusers
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(logging.INFO)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars for a few MB
    for name in ("huggingface_hub", "timm", "open_clip", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.config import ProtocolError, load_protocol
    from harness.data import InstanceDataError

    try:
        protocol = load_protocol(args.protocol)
        if args.dry_run:
            from harness.plan import format_plan, make_plan

            print(format_plan(make_plan(protocol)))
            return 0
        quiet_libraries()
        from harness.backbones import BackboneUnavailableError
        from harness.backends import ModelUnavailableError
        from harness.runner import run_protocol

        try:
            return run_protocol(protocol, only=tuple(args.only), report_only=args.report_only, device=args.device)
        except (ModelUnavailableError, BackboneUnavailableError) as e:
            print(f"error: {e}", file=sys.stderr)  # the message names the ways out (network, local folder, tiny)
            return 2
    except (ProtocolError, InstanceDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
