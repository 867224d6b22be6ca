"""Wall-clock time, CPU time and work per phase of a study, and the table printed at its end.

Phases nest (sampling happens inside training); each second counts once, in the innermost phase, so the phases
add up to the total. CPU seconds (every thread of the process) are kept beside the wall clock: on a shared machine
the wall clock says how busy the others were, the CPU seconds what the phase cost. Work is credited the same way:
a stage calls `count(n, unit)` ("images", "steps") and the amount goes to the innermost phase open in this context,
so the table shows a rate beside each phase (images/s, s/step) without any stage knowing the phases' names. Outside
a phase `count` does nothing. `add` folds in another process's phases (a worker's).

What this module does not hold: the phases themselves (the phases of harness/prepare.py, execute.py and collect.py
open them) or the dry run's estimate (harness/throughput.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

_innermost: ContextVar[tuple[Timings, str] | None] = ContextVar("innermost_phase", default=None)


@dataclass
class Timings:
    """Wall-clock seconds, CPU seconds and work per phase."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    work: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> unit -> amount
    _inner: list[tuple[float, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started, cpu_started = time.perf_counter(), time.process_time()
        self._inner.append((0.0, 0.0))
        token = _innermost.set((self, name))
        try:
            yield
        finally:
            _innermost.reset(token)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            nested, nested_cpu = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu - nested_cpu
            if self._inner:
                outer, outer_cpu = self._inner[-1]
                self._inner[-1] = (outer + elapsed, outer_cpu + cpu)

    def count(self, phase: str, amount: float, unit: str) -> None:
        units = self.work.setdefault(phase, {})
        units[unit] = units.get(unit, 0.0) + amount

    def add(self, seconds: Mapping[str, float], cpu_seconds: Mapping[str, float] | None = None,
            work: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Adds another process's phases (a worker's) to these."""
        for mine, theirs in ((self.seconds, seconds), (self.cpu_seconds, cpu_seconds or {})):
            for name, value in theirs.items():
                mine[name] = mine.get(name, 0.0) + float(value)
        for phase, units in (work or {}).items():
            for unit, amount in units.items():
                self.count(phase, float(amount), unit)

    def rate(self, phase: str) -> str:
        """'120 images, 3.41 images/s' or '400 steps, 0.262 s/step' (steps as time per unit); '' without work."""
        seconds = self.seconds.get(phase, 0.0)
        parts = []
        for unit, amount in self.work.get(phase, {}).items():
            if not amount or seconds <= 0:
                continue
            singular = unit[:-1] if unit.endswith("s") else unit
            per = f"{seconds / amount:.3f} s/{singular}" if unit == "steps" else f"{amount / seconds:.2f} {unit}/s"
            parts.append(f"{amount:g} {unit}, {per}")
        return "; ".join(parts)

    def table(self) -> str:
        total, total_cpu = sum(self.seconds.values()), sum(self.cpu_seconds.values())
        lines = [f"  {name:<28} {sec:9.1f} s {self.cpu_seconds.get(name, 0.0):9.1f} s   {self.rate(name)}".rstrip()
                 for name, sec in self.seconds.items()]
        return "\n".join([f"Time per phase:{'wall':>24} {'CPU':>11}", *lines,
                          f"  {'total':<28} {total:9.1f} s {total_cpu:9.1f} s"])


def count(amount: float, unit: str) -> None:
    """Credits `amount` of work in `unit` to the innermost phase open in this context (nothing outside phases)."""
    current = _innermost.get()
    if current is not None and amount:
        timings, phase = current
        timings.count(phase, amount, unit)
