"""Batches moved to the training device ahead of the step that needs them (a copy thread on a GPU)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors of a nested batch moved to ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


class DevicePrefetcher:
    """Yields ``(batch, tag)`` with the batch on ``device``, prepared ``depth`` batches ahead.

    On a GPU a background thread pulls host batches from the DataLoader and copies them on a side
    stream (the copy, pageable or pinned, blocks that thread, never the training loop); the training
    stream waits on the copy's event. On the CPU batches pass through in the caller's thread unless
    ``threaded`` is set.

    A batch tagged ``slot`` lives in a reusable buffer (trainers/slots.py): its storages are
    page-locked here once, and the thread waits for its copy to finish before it takes the next
    batch, which is what lets the producer overwrite the buffer later. On the CPU such a batch is
    cloned out of its buffer.
    """

    _END = object()

    def __init__(self, batches: Iterator[tuple[Any, Any]], device: torch.device, depth: int = 2,
                 threaded: bool | None = None):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # a bare "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.batches, self.device = batches, device
        self.stopping = threading.Event()
        self.thread = None
        from foresight.trainers.slots import HostRegistry

        self.registry = HostRegistry()
        if not (self.cuda if threaded is None else threaded):
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread = threading.Thread(target=self._copy_loop, name="device-prefetch", daemon=True)
        self.thread.start()

    def _copy_loop(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            for host, tag in self.batches:
                if self.stopping.is_set() or not self._put(self._move(host, tag)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(err)
            return
        self._put(self._END)

    def _move(self, host: Any, tag: Any) -> tuple[Any, Any, Any, Any]:
        reused = isinstance(tag, dict) and tag.get("slot")
        if not self.cuda:
            return (_cloned(host) if reused else host), tag, None, None
        if reused:
            self.registry.ensure(host)
        with torch.cuda.stream(self.stream):
            moved = to_device(host, self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if reused:
            done.synchronize()  # the buffer is free again before the producer can be asked for more
        # ``host`` rides along so pinned memory outlives its asynchronous copy.
        return moved, tag, done, host

    def _put(self, item: Any) -> bool:
        """Queue ``item``; False when the prefetcher is being closed."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self.thread is None:
            moved, tag, done, _ = self._move(*next(self.batches))
        else:
            item = self.queue.get()
            if item is self._END:
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            moved, tag, done, _ = item
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            _record_stream(moved, current)
        return moved, tag

    def close(self) -> None:
        """Stop the copy thread and the DataLoader workers now rather than at garbage collection."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer that gets unlocked
        self.registry.close()


def _cloned(batch: Any) -> Any:
    """A nested batch with every tensor copied out of its (reusable) buffer."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: _cloned(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cloned(v) for v in batch)
    return batch


def _record_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator the batch is used on ``stream`` (it was allocated on the copy stream)."""
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            _record_stream(value, stream)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _record_stream(value, stream)

