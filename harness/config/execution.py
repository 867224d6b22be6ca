"""The `execution:` section: where the runs execute (harness/executors), checked when the protocol loads, and
replaced setting by setting from the command line (`override_execution`). Nothing here changes a result.

What this module does not hold: the executors themselves (harness/executors).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harness.config.fields import check_rules, convert_field, field_names, suggest
from harness.config.schema import ExecutionSpec, Protocol
from harness.config.yaml_lines import Collector
from harness.executors import EXECUTORS, ExecutionError


def check_execution(spec: ExecutionSpec, errs: Collector) -> None:
    at = ("execution",)
    if spec.executor not in EXECUTORS:
        errs.add(at + ("executor",), EXECUTORS.unknown_message(spec.executor))
    if spec.gpus is not None:
        if any(g < 0 for g in spec.gpus):
            errs.add(at + ("gpus",), f"GPU indices are 0 or more, got {list(spec.gpus)}.")
        if len(set(spec.gpus)) != len(spec.gpus):
            errs.add(at + ("gpus",), f"has repeated GPUs {list(spec.gpus)}; list each GPU once.")
        if not spec.gpus:
            errs.add(at + ("gpus",), "is empty; list GPU indices, e.g. [0, 1], or leave it out to use every GPU.")
    for line in spec.sbatch:
        if not line.startswith("--") or line == "--":
            errs.add(at + ("sbatch",), f"{line!r} is not an sbatch option; write options as in sbatch's manual, "
                                       "e.g. '--qos=high' or '--exclusive'.")


def override_execution(protocol: Protocol, values: dict[str, Any], source: str = "--execution") -> Protocol:
    """The protocol with some `execution` settings replaced (from the command line); raises ExecutionError naming
    every bad setting and what it accepts."""
    names = field_names(ExecutionSpec)
    converted, problems = {}, []
    for key, value in values.items():
        if key not in names:
            problems.append(f"{source} {key}: unknown setting; {suggest(key, names)}")
            continue
        try:
            converted[key] = convert_field(ExecutionSpec, key, value)
        except ValueError as e:
            problems.append(f"{source} {key}: {e}.")
    spec = replace(protocol.execution, **converted)
    problems += [f"{source} {name}: {message}" for name, message in check_rules(spec) if name in converted]
    errs = Collector(protocol.path, {})
    check_execution(spec, errs)
    problems += [f"{source} {p.key.removeprefix('execution.')}: {p.message}" for p in errs.problems
                 if p.key.removeprefix("execution.").split(".")[0] in converted]
    if problems:
        raise ExecutionError("\n".join(problems))
    return replace(protocol, execution=spec)
