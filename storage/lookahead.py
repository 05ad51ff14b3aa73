"""Preparing the items of a sequential read (check, then parse) ahead of their consumer, in a helper thread.

A verified read of memory-mapped samples costs one extra pass over the bytes (the hash) on top of
the consumer's own pass. Done in the consumer's thread the two passes add up; xxhash releases the
GIL while it hashes (as numpy does in its loops), so a helper thread can check sample ``p + 1``
while the consumer works on sample ``p`` and the passes overlap on two cores. One helper keeps up
only while hashing a sample is faster than the consumer's pass over it; where the consumer's pass
is a bare touch of the page cache it is not, so with free cores several helpers check the next
samples at once (:func:`helper_threads`). Without a free core the consumer does the checks itself
(work it would otherwise wait for), as it did before.

The guarantee stays the one of a check in the consumer's thread: an item reaches the consumer only
as what ``prepare`` returned for it (``prepare`` checks before it parses), items arrive in their
order, and an error of ``prepare`` (or of producing an item) is raised in the consumer at the
position it happened, after every item before it.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")

"""Most helper threads one look-ahead starts: past three, hashing is bound by memory bandwidth, not cores."""
MAX_HELPERS = 3


def helper_threads(depth: int, most: int = MAX_HELPERS) -> int:
    """Helper threads for a look-ahead of ``depth`` items in this process: one per core beyond the
    consumer's (the cores this process may run on), at least one, at most ``most`` and ``depth``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(most, depth, cores - 1))


class _Job:
    """One item to prepare: pending, claimed (by the helper or the consumer), then done."""

    __slots__ = ("item", "claimed", "result", "error", "done")

    def __init__(self, item: Any, error: BaseException | None = None):
        self.item, self.claimed, self.result, self.error = item, error is not None, None, error
        self.done = threading.Event()
        if error is not None:
            self.done.set()


class PreparedAhead(Generic[Item, Prepared]):
    """Iterator over ``prepare(item)`` of each of ``items``, in order, prepared by ``helpers`` threads
    that work ahead of the consumer, and by the consumer itself when it would otherwise wait.

    The consumer's thread alone iterates ``items`` (cheap: a slice of a memory map, or a read into a
    buffer) and keeps ``depth`` items queued ahead of the one it asks for; each helper claims the first
    queued item nobody claimed, so with several helpers the next items are prepared at once (each
    exactly once). Asking for an item nobody claimed yet, the consumer prepares it itself: with free
    cores the helpers are ahead and the consumer never waits; without, the work falls back to the
    consumer's thread as if there were no helper. A consumer that stops early wastes at most ``depth``
    preparations. ``close()`` (also called at the end, on an error, and by the reading generator's
    ``finally``) stops and joins the helpers and then closes ``items``: no thread outlives the iteration.
    """

    def __init__(self, items: Iterator[Item], prepare: Callable[[Item], Prepared], depth: int,
                 name: str = "prepared-ahead", helpers: int = 1):
        if depth < 1:
            raise ValueError(f"PreparedAhead {name}: depth {depth} must be at least 1")
        if not 1 <= helpers <= depth:
            raise ValueError(f"PreparedAhead {name}: helpers {helpers} must be between 1 and depth {depth}")
        self._items, self._prepare, self._depth = items, prepare, depth
        self._jobs: deque[_Job] = deque()
        self._changed = threading.Condition()
        self._stopped = self._exhausted = False
        self._threads = [threading.Thread(target=self._help, name=f"{name}-{k}", daemon=True)
                         for k in range(helpers)]
        for thread in self._threads:
            thread.start()

    def _help(self) -> None:
        while True:
            with self._changed:
                job = self._claim_next()
                while job is None and not self._stopped:
                    self._changed.wait()
                    job = self._claim_next()
                if self._stopped:
                    return
            self._run(job)

    def _claim_next(self) -> _Job | None:
        """The first queued job nobody claimed, now claimed (call holding ``_changed``)."""
        for job in self._jobs:
            if not job.claimed:
                job.claimed = True
                return job
        return None

    def _run(self, job: _Job) -> None:
        try:
            job.result = self._prepare(job.item)
        except BaseException as error:  # raised in the consumer, in order
            job.error = error
        job.item = None
        job.done.set()

    def _queue_ahead(self) -> None:
        """Consumer's thread: keep ``depth`` jobs queued (after the one the consumer holds)."""
        while not self._exhausted and len(self._jobs) < self._depth:
            try:
                job = _Job(next(self._items))
            except StopIteration:
                self._exhausted = True
                break
            except Exception as error:  # producing the item failed: raised at its position
                self._exhausted, job = True, _Job(None, error)
            with self._changed:
                self._jobs.append(job)
                self._changed.notify()

    def __iter__(self) -> "PreparedAhead[Item, Prepared]":
        return self

    def __next__(self) -> Prepared:
        if self._stopped:
            raise StopIteration
        self._queue_ahead()
        if not self._jobs:
            self.close()
            raise StopIteration
        job = self._jobs[0]
        with self._changed:
            mine = not job.claimed
            job.claimed = True
        if mine:
            self._run(job)
        job.done.wait()
        with self._changed:
            self._jobs.popleft()
        self._queue_ahead()  # the helper works on the next items while the consumer uses this one
        if job.error is not None:
            self.close()
            raise job.error
        return job.result

    def close(self) -> None:
        """Stop the helpers, wait for them, and close the underlying items (idempotent)."""
        with self._changed:
            self._stopped = True
            self._jobs.clear()
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    @property
    def running(self) -> bool:
        """Whether any helper thread is still alive."""
        return any(thread.is_alive() for thread in self._threads)


def prepared_lazily(items: Iterator[Item], needs_thread: Callable[[Item], bool],
                    prepare: Callable[[Item], Prepared], depth: int,
                    name: str = "prepared-ahead", helpers: int = 1) -> Iterator[Prepared]:
    """``prepare(item)`` of each of ``items``, in order; prepared in the consumer's thread until the first
    item that ``needs_thread`` (one not checked yet), from which on ``helpers`` threads of a
    ``PreparedAhead`` prepare ahead (later epochs over already checked samples start no thread at all)."""
    items = iter(items)
    ahead: PreparedAhead[Item, Prepared] | None = None
    try:
        for item in items:
            if needs_thread(item):
                ahead = PreparedAhead(_chain_first(item, items), prepare, depth, name, helpers)
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
