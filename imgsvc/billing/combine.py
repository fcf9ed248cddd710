"""Work that arrives while the same kind of work is running waits, and then runs as one group.

A caller that finds nothing running under its key runs its item alone, at once. Items that
arrive meanwhile queue; when the running group is done, the first of them runs every queued
item of that key (up to `max_group`) as the next group, and so on. Under light load nothing
waits; under heavy load one database statement or one commit serves many calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Waiter(Generic[T, R]):
    __slots__ = ("done", "error", "group", "item", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = threading.Event()
        self.group: list[_Waiter[T, R]] | None = None  # set when this waiter leads the next group
        self.result: R | None = None
        self.error: Exception | None = None


class Combiner(Generic[T, R]):
    """`submit(key, item)` returns `run_group`'s outcome for the item (or raises its error).

    `run_group(items)` must return one outcome per item, in order: a result, or the exception
    that item's caller gets. Items of different keys never share a group.
    """

    def __init__(
        self, run_group: Callable[[Sequence[T]], Sequence[R | Exception]], max_group: int = 64
    ) -> None:
        self._run_group = run_group
        self._max = max_group
        self._guard = threading.Lock()
        self._queued: dict[Hashable, list[_Waiter[T, R]]] = {}  # key present: a group runs

    def submit(self, key: Hashable, item: T) -> R:
        me: _Waiter[T, R] = _Waiter(item)
        with self._guard:
            queue = self._queued.get(key)
            if queue is None:
                self._queued[key] = []
                group: list[_Waiter[T, R]] | None = [me]
            else:
                queue.append(me)
                group = None
        if group is None:
            me.done.wait()
            group = me.group  # None: another leader ran this item
        if group is not None:
            self._lead(key, group)
        if me.error is not None:
            raise me.error
        return me.result  # type: ignore[return-value]  # set, as error was not

    def _lead(self, key: Hashable, group: list[_Waiter[T, R]]) -> None:
        try:
            outcomes: Sequence[R | Exception] = self._run_group([w.item for w in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(group)} items")
        except Exception as exc:  # noqa: BLE001 - every caller of the group gets it
            outcomes = [exc] * len(group)
        except BaseException:
            self._finish(key, group, [RuntimeError("interrupted")] * len(group))
            raise
        self._finish(key, group, outcomes)

    def _finish(
        self, key: Hashable, group: list[_Waiter[T, R]], outcomes: Sequence[R | Exception]
    ) -> None:
        self._hand_over(key)
        leader = group[0]
        for waiter, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Exception):
                waiter.error = outcome
            else:
                waiter.result = outcome
            if waiter is not leader:
                waiter.done.set()

    def _hand_over(self, key: Hashable) -> None:
        """Start the next group of `key` in its first waiter's thread, or mark the key idle."""
        with self._guard:
            queue = self._queued[key]
            if not queue:
                del self._queued[key]
                return
            group, self._queued[key] = queue[: self._max], queue[self._max :]
        group[0].group = group
        group[0].done.set()
