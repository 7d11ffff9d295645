"""Registry: one way to register strategies by name and select them by name (as timm's _registry.py)."""
from __future__ import annotations

import fnmatch
from collections.abc import MutableMapping
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from .errors import ConfigError, LRDError

T = TypeVar("T")
_MISSING = object()


def _default_key(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


class Registry(MutableMapping, Generic[T]):
    """Named entries of one kind (freeze schedules, cost models, leaf modules, bench models, ...).

        SCHEDULES = Registry("schedule", hint="register one with @lrd_fx.register_schedule('name')")

        @SCHEDULES.register("sequential")      # a name
        def _sequential(config): ...
        @SCHEDULES.register                    # no name: the object's __name__ (or key=)
        def static(config): ...
        SCHEDULES.register("mine", factory)    # as a call

        SCHEDULES.get("sequential")            # the entry; an unknown name raises `error` listing the names
        SCHEDULES.get(some_callable)           # a callable passed instead of a name is returned as is
        "static" in SCHEDULES, SCHEDULES.names()

    Registering an existing name replaces its entry (re-running a notebook cell must work). It is also a
    mapping (reg[name], del reg[name]), so tests can add and remove entries with monkeypatch.setitem.
    """

    def __init__(self, kind: str, *, hint: str = "", error: type[LRDError] = ConfigError,
                 key: Callable[[Any], str] = _default_key):
        self.kind = kind      # "schedule", "cost model": used in error messages
        self.hint = hint      # how to add one, appended to the unknown-name error
        self.error = error    # LRDError subclass raised for an unknown name
        self.key = key        # name of an entry registered without one
        self._entries: dict[str, T] = {}

    # --- registering ------------------------------------------------------------------------------

    def register(self, name: Any = None, obj: Any = _MISSING):
        """register("n") / register() -> decorator; @register (bare) or register(obj) -> obj under key(obj);
        register("n", obj) -> obj. Returns the object, so it works as a decorator."""
        if obj is not _MISSING:
            return self._add(name, obj)
        if name is None or isinstance(name, str):
            return lambda o: self._add(name, o)
        return self._add(None, name)   # bare decorator: name is the object itself

    def _add(self, name: Optional[str], obj: T) -> T:
        name = self.key(obj) if name is None else name
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} registry: the name must be a non-empty string, got {name!r}")
        self._entries[name] = obj
        return obj

    # --- selecting --------------------------------------------------------------------------------

    def get(self, name_or_obj: Any, default: Any = _MISSING) -> T:
        """The entry registered under a name; a non-string callable is returned as is (a user's own
        strategy). Unknown names return `default` when given, else raise `self.error` listing the names."""
        if not isinstance(name_or_obj, str):
            if callable(name_or_obj):
                return name_or_obj
            if default is not _MISSING:
                return default
            raise self.error(f"{name_or_obj!r} is not a {self.kind}: pass a registered name "
                             f"{self.names()} or a callable")
        try:
            return self._entries[name_or_obj]
        except KeyError:
            if default is not _MISSING:
                return default
            raise self.error(self.unknown_message(name_or_obj)) from None

    def unknown_message(self, name: str) -> str:
        hint = f"; {self.hint}" if self.hint else ""
        return f"{name!r} is not a known {self.kind} (not registered); known: {self.names()}{hint}"

    def names(self, pattern: Optional[str] = None) -> list[str]:
        """Registered names, sorted; `pattern` (a glob, e.g. 'time*') filters them."""
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    # --- mapping protocol ------------------------------------------------------------------------

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self._add(name, obj)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
