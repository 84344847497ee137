"""One registry type for everything chosen by name: defenses, callbacks, detectors and attacks (timm-style).

A registry maps a name to a class (or function). Built-in entries register themselves with the
``@REGISTRY.register`` decorator when their package is imported; installed plugins add theirs through
an entry-point group (``[project.entry-points."safe_train.defenses"] mine = "my_pkg.mine"``): loading
the entry point imports the module, whose decorator registers it. Both are loaded on first use, so
importing this module costs nothing and no module has to import the built-ins by hand.

This module imports only :mod:`safe_train.errors`: every other module may import it.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from safe_train.errors import ConfigError

T = TypeVar("T")

log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Names → entries of one kind.

    Args:
        kind: what an entry is, for messages ("defense").
        builtins: the package whose import registers the built-in entries ("safe_train.defenses").
        entry_point_group: where installed plugins add entries ("safe_train.defenses").
    """

    def __init__(self, kind: str, builtins: str, entry_point_group: str) -> None:
        self.kind = kind
        self.builtins = builtins
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._loaded = False
        self._loading = False

    def register(self, entry: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
        """Decorator (``@REG.register`` or ``@REG.register(name="x")``); the name defaults to ``entry.name``."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__", None)
            if not key:
                raise TypeError(f"a {self.kind} needs a name to be registered: {obj!r}")
            previous = self._entries.get(key)
            if previous is not None and previous is not obj:
                warnings.warn(f"{self.kind} {key!r} registered twice ({_where(previous)} and {_where(obj)}); "
                              f"the later one wins", stacklevel=3)
            self._entries[key] = obj
            return obj

        return add(entry) if entry is not None else add

    def load(self) -> None:
        """Import the built-in entries and every installed plugin of the entry-point group (once)."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            importlib.import_module(self.builtins)
            for entry_point in metadata.entry_points(group=self.entry_point_group):
                try:
                    loaded = entry_point.load()
                except Exception as e:  # a broken plugin must name itself, not crash with a bare traceback
                    raise ConfigError(f"{self.kind} plugin {entry_point.name!r} ({entry_point.value}) failed to "
                                      f"load: {type(e).__name__}: {e}") from e
                if entry_point.name not in self._entries and not _is_module(loaded):
                    self.register(loaded, name=entry_point.name)
            self._loaded = True
        finally:
            self._loading = False

    def get(self, name: str) -> T:
        """The entry called ``name``, or a :class:`ConfigError` that lists the choices."""
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order: built-ins first, in their package's import order."""
        self.load()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _is_module(obj: object) -> bool:
    return type(obj).__name__ == "module"


DEFENSES: Registry = Registry("defense", "safe_train.defenses", "safe_train.defenses")
"""``--defense NAME``: :class:`~safe_train.interface.Defense` subclasses."""

CALLBACKS: Registry = Registry("callback", "safe_train.callbacks", "safe_train.callbacks")
"""Callbacks that switch themselves on from their own flags (``Callback.from_args``)."""

DETECTORS: Registry = Registry("detector", "safe_train.detection.detectors", "safe_train.detectors")
"""``--detect NAMES``: backdoor-sample scores (:class:`~safe_train.detection.detectors.Detector`)."""

ATTACKS: Registry = Registry("attack", "safe_train.attacks", "safe_train.attacks")
"""``safe-train poison --attack NAME``: trigger classes (:class:`~safe_train.attacks.triggers.Trigger`)."""


def list_defenses() -> list[str]:
    return DEFENSES.names()


def list_callbacks() -> list[str]:
    return CALLBACKS.names()


def list_detectors() -> list[str]:
    return DETECTORS.names()


def list_attacks() -> list[str]:
    return ATTACKS.names()
