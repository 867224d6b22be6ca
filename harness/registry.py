"""One small registry: a name -> object table with lazy entries, used for every extension point.

Model backends, metric backbones, metrics, fine-tuning methods and executors each keep one `Registry`. Built-in
entries are written as `"module:object"` strings and imported on first use, so listing or validating names never
imports torch; code outside the package adds its own with `register`, as a decorator or a call:

    METHODS.register("my_method", MyMethod)

    @METRICS.register("my_metric")
    def my_metric(...): ...

An unknown name gives a `KeyError` whose message lists the registered choices and the nearest one.

What this module does not hold: any of the registries themselves (each lives beside the protocol it serves).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; str() is the readable message (KeyError's repr-quoting is undone)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def nearest(word: str, choices: list[str]) -> str | None:
    """The registered name closest to `word`, if any is reasonably close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return close[0] if close else None


class Registry(Generic[T]):
    """Names of one kind of thing (`what`, e.g. "metric") mapped to objects, some of them imported lazily."""

    def __init__(self, what: str, lazy: Mapping[str, str] | None = None):
        self.what = what
        self._lazy: dict[str, str] = dict(lazy or {})
        self._loaded: dict[str, T] = {}
        self._order: list[str] = list(self._lazy)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def names(self) -> list[str]:
        """Registered names in registration order (built-in entries first)."""
        return list(self._order)

    @overload
    def register(self, name: str, obj: T) -> T: ...

    @overload
    def register(self, name: str, obj: None = None) -> Callable[[T], T]: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Adds `obj` under `name` (or returns a decorator that does). A name is registered once."""

        def add(item: T) -> T:
            if name in self._loaded or name in self._lazy:
                raise ValueError(f"{self.what} {name!r} is registered twice; choose another name or "
                                 f"unregister the first.")
            self._loaded[name] = item
            self._order.append(name)
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Removes a name (tests register throwaway entries and clean up after themselves)."""
        self._loaded.pop(name, None)
        self._lazy.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def get(self, name: str) -> T:
        """The object of `name`, importing a lazy entry on first use."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._lazy:
            self._loaded[name] = _import(self._lazy.pop(name))
            return self._loaded[name]
        raise UnknownNameError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        choices = self.names()
        close = nearest(str(name), choices)
        hint = f"did you mean {close!r}? " if close else ""
        return f"unknown {self.what} {name!r}; {hint}registered: {', '.join(choices)}."

    def items(self) -> list[tuple[str, T]]:
        """Every (name, object), importing lazy entries."""
        return [(name, self.get(name)) for name in self.names()]


def _import(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module
