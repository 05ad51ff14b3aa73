"""Preparing the items of a sequential read (check, then parse) ahead of their consumer, in one thread.

A verified read of memory-mapped samples costs one extra pass over the bytes (the hash) on top of
the consumer's own pass. Done in the consumer's thread the two passes add up; xxhash releases the
GIL while it hashes (as numpy does in its loops), so a background thread can check sample ``p + 1``
while the consumer works on sample ``p`` and the passes overlap on two cores.

The guarantee stays the one of a check in the consumer's thread: an item reaches the consumer only
as what ``prepare`` returned for it (``prepare`` checks before it parses), items arrive in their
order, and an error of ``prepare`` (or of producing an item) is raised in the consumer at the
position it happened, after every item before it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
_END = object()
_POLL_S = 0.05  # how often a producer blocked on a full queue looks whether its consumer left


class PreparedAhead(Generic[Item, Prepared]):
    """Iterator over ``prepare(item)`` of each of ``items``, computed in a background thread, in order.

    At most ``depth`` prepared items wait for the consumer (the thread may be preparing one more), so
    a consumer that stops early wastes at most ``depth + 1`` preparations. ``close()`` (also called at the end,
    on an error, and by the reading generator's ``finally``) stops and joins the thread and then
    closes ``items`` from the consumer's thread: no thread outlives the iteration.
    """

    def __init__(self, items: Iterator[Item], prepare: Callable[[Item], Prepared], depth: int,
                 name: str = "prepared-ahead"):
        if depth < 1:
            raise ValueError(f"PreparedAhead {name}: depth {depth} must be at least 1")
        self._items, self._prepare = items, prepare
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                if not self._put((self._prepare(item), None)):
                    return
            self._put((_END, None))
        except BaseException as error:  # handed to the consumer, raised there in order
            self._put((None, error))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        """Queue ``entry``; False when the consumer closed the iteration meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "PreparedAhead[Item, Prepared]":
        return self

    def __next__(self) -> Prepared:
        if self._stop.is_set():
            raise StopIteration
        item, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if item is _END:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread, wait for it, and close the underlying items (idempotent)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()  # frees a producer blocked on a full queue
            self._thread.join(_POLL_S)
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    @property
    def running(self) -> bool:
        """Whether the background thread is still alive."""
        return self._thread.is_alive()


def prepared_lazily(items: Iterator[Item], needs_thread: Callable[[Item], bool],
                    prepare: Callable[[Item], Prepared], depth: int,
                    name: str = "prepared-ahead") -> Iterator[Prepared]:
    """``prepare(item)`` of each of ``items``, in order; prepared in the consumer's thread until the first
    item that ``needs_thread`` (one not checked yet), from which on a ``PreparedAhead`` thread prepares
    ahead (later epochs over already checked samples start no thread at all)."""
    items = iter(items)
    ahead: PreparedAhead[Item, Prepared] | None = None
    try:
        for item in items:
            if needs_thread(item):
                ahead = PreparedAhead(_chain_first(item, items), prepare, depth, name)
                yield from ahead
                return
            yield prepare(item)
    finally:
        if ahead is not None:
            ahead.close()
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _chain_first(first: Item, rest: Iterator[Item]) -> Iterator[Item]:
    yield first
    yield from rest
