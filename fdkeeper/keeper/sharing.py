"""One object kept per equal value, bounded: what many kept connections hold alike costs the keeper once.

An idle kept connection's Python objects are most of its memory (bench/keeper_scale.py), so a
value that thousands of them hold equal copies of (a SuT's address, a TLS session's description)
is looked up in a ``SharedValues`` table and the one kept object held instead. A keeper talks to
few SuTs with few configurations, so a table is bounded: past its bound a new value is simply
not shared (returned as it is), never refused and never evicting one (what is shared stays the
one object for its key).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedValues(Generic[K, V]):
    """The one object kept per ``key``, at most ``bound`` of them."""

    __slots__ = ("_kept", "bound")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._kept: dict[K, V] = {}

    def one(self, key: K, make: Callable[[], V]) -> V:
        """The object kept for ``key``; else ``make()``'s, kept for it while the table has room."""
        shared = self._kept.get(key)
        if shared is not None:
            return shared
        made = make()
        if len(self._kept) < self.bound:
            self._kept[key] = made
        return made

    def __len__(self) -> int:
        return len(self._kept)
