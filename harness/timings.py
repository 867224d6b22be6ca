"""Wall-clock time and work per phase of a study, and the table printed at its end.

Phases nest (sampling happens inside training); each second counts once, in the innermost phase, so the phases
add up to the total. Work is credited the same way: a stage calls `count(n, unit)` ("images", "steps") and the
amount goes to the innermost phase open in this context, so the table shows a rate beside each phase (images/s,
s/step) without any stage knowing the phases' names. Outside a phase `count` does nothing.

What this module does not hold: the phases themselves (the runner opens them) or the dry run's estimate
(harness/throughput.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

_innermost: ContextVar[tuple[Timings, str] | None] = ContextVar("innermost_phase", default=None)


@dataclass
class Timings:
    """Wall-clock seconds and work per phase."""

    seconds: dict[str, float] = field(default_factory=dict)
    work: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> unit -> amount
    _inner: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._inner.append(0.0)
        token = _innermost.set((self, name))
        try:
            yield
        finally:
            _innermost.reset(token)
            elapsed = time.perf_counter() - started
            nested = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._inner:
                self._inner[-1] += elapsed

    def count(self, phase: str, amount: float, unit: str) -> None:
        units = self.work.setdefault(phase, {})
        units[unit] = units.get(unit, 0.0) + amount

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
        total = sum(self.seconds.values())
        lines = [f"  {name:<28} {sec:9.1f} s   {self.rate(name)}".rstrip() for name, sec in self.seconds.items()]
        return "\n".join(["Time per phase:", *lines, f"  {'total':<28} {total:9.1f} s"])


def count(amount: float, unit: str) -> None:
    """Credits `amount` of work in `unit` to the innermost phase open in this context (nothing outside phases)."""
    current = _innermost.get()
    if current is not None and amount:
        timings, phase = current
        timings.count(phase, amount, unit)
