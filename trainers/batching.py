"""Batches for the training loop, and the one resume protocol of a stream read through DataLoader workers.

A stream (``trainers.data.ShardStream``, :class:`MemoryStream`) has ``__iter__`` (the current epoch's
samples of this rank and worker from the current position), ``epoch`` / ``set_epoch(e)`` and
``state_dict()`` / ``load_state_dict(state)``, where a state taken inside a DataLoader worker
describes that worker's position.

:class:`ResumableLoader` has the same ``state_dict()`` / ``load_state_dict()`` one level up, for the
batches it hands out (the dataloader-state style of torchtitan): each worker batches its own samples
and tags every batch with its stream's ``state_dict()`` taken right after the batch's last sample.
The loader keeps, per worker, the state of the last batch it *handed out* (not merely prefetched by
the workers or copied ahead to the device), and which worker the DataLoader's round robin visits
next. A loader that loads that state before its first batch gives each worker its own state back,
and the workers the round robin would have visited before that one yield one skip marker first, so
the batch order continues exactly. Each worker moves its stream to the next epoch (``set_epoch``)
when its part of an epoch ends, so batches are always full and DDP ranks never run dry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foresight.trainers.config import LoopConfig
from foresight.trainers.prefetch import DevicePrefetcher


class MemoryStream(IterableDataset):
    """A resumable stream over in-memory samples, with ShardStream's protocol.

    Iterating yields the current epoch's part of this rank and DataLoader worker (a seeded
    per-epoch shuffle, split by rank then worker) from where it stopped; ``set_epoch`` selects the
    next epoch; ``state_dict()`` (inside a worker: that worker's position) and ``load_state_dict()``
    resume mid-epoch.
    """

    def __init__(self, samples: list[dict[str, Any]], seed: int = 0, rank: int = 0, world: int = 1):
        self.samples = samples
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.position = 0, 0

    def _part(self) -> list[int]:
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return order.tolist()[self.rank * workers + worker::self.world * workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        part = self._part()
        while self.position < len(part):
            self.position += 1
            yield self.samples[part[self.position - 1]]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class StatefulBatches(IterableDataset):
    """Batches of ``stream`` built inside each worker, each tagged with the worker's stream state."""

    def __init__(self, stream: IterableDataset, batch_size: int, collate: Callable[[list], Any],
                 resume: dict[str, Any] | None = None, slots: int = 0, pinned: bool = False):
        self.stream, self.batch_size, self.collate = stream, batch_size, collate
        self.resume = resume or {}
        # ``slots`` reusable buffers per producer (0: fresh memory per batch); ``collate`` must take ``slots=``.
        self.slots, self.pinned = slots, pinned

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info else 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self._worker()
        saved = self.resume.get("workers", {}).get(str(worker))
        if saved is not None:
            self.stream.load_state_dict(saved)
        if self.resume and worker < int(self.resume.get("next_worker", 0)):
            yield {"skip": True, "worker": worker}
        yield from self._batches(worker)

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        from foresight.trainers.slots import BatchSlots

        in_worker = get_worker_info() is not None
        ring = BatchSlots(self.slots, shared=in_worker, pinned=self.pinned and not in_worker) if self.slots else None
        samples: list[Any] = []
        empty_passes = 0
        while empty_passes < 2:  # one empty pass is an epoch that ended exactly at a batch boundary
            empty_passes += 1
            for sample in self.stream:
                empty_passes = 0
                samples.append(sample)
                if len(samples) == self.batch_size:
                    state = self.stream.state_dict()
                    taken = ring.next if ring is not None else 0
                    batch = self.collate(samples, slots=ring) if ring is not None else self.collate(samples)
                    reused = ring is not None and ring.next > taken
                    yield {"batch": batch, "worker": worker, "state": state, "slot": reused}
                    samples = []
            self.stream.set_epoch(self.stream.epoch + 1)
        raise ValueError(
            f"stream {type(self.stream).__name__}: worker {worker} received no samples; use fewer "
            f"DataLoader workers x ranks than the export has shards"
        )


class ResumableLoader:
    """Endless batches of ``stream`` on ``device``, collated in DataLoader workers; resumable.

    ``state_dict()`` says where the batches handed out so far leave every worker (JSON-serialisable;
    a checkpoint keeps it); ``load_state_dict(state)`` before the first batch continues right after
    them. The workers start at the first ``iter()`` (in the calling thread). ``threaded`` as in
    :class:`DevicePrefetcher` (default: a copy thread on a GPU only).
    """

    def __init__(self, collate: Callable[..., Any], stream: IterableDataset, cfg: LoopConfig,
                 device: torch.device, threaded: bool | None = None):
        self.collate, self.stream, self.cfg, self.device, self.threaded = collate, stream, cfg, device, threaded
        self.num_workers = max(1, cfg.num_workers)
        self.workers: dict[str, Any] = {}  # worker -> its stream state after the last batch handed out
        self.next_worker = 0
        self._resume: dict[str, Any] | None = None
        self._batches: DevicePrefetcher | None = None

    @property
    def reuses_buffers(self) -> bool:
        """Whether batches are collated into reusable buffers (trainers/slots.py)."""
        return buffer_slots(self.collate, self.cfg, self._reuse()) > 0

    def _reuse(self) -> bool:
        return self.device.type == "cuda" if self.cfg.reuse_buffers is None else self.cfg.reuse_buffers

    def state_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "workers": dict(self.workers), "next_worker": self.next_worker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches described by ``state`` (same worker count; before the first batch)."""
        if self._batches is not None:
            raise ValueError("ResumableLoader: load_state_dict after the first batch; load the state before iterating")
        saved = int(state.get("num_workers", 1))
        if saved != self.num_workers:
            raise ValueError(f"checkpoint stream state was written with {saved} DataLoader workers; resume with "
                             f"num_workers={saved} for an exact resume (got {self.cfg.num_workers})")
        self._resume = dict(state)
        self.workers = dict(state.get("workers", {}))
        self.next_worker = int(state.get("next_worker", 0))

    def __iter__(self) -> "ResumableLoader":
        if self._batches is None:
            cuda = self.device.type == "cuda"
            host = batch_iterator(self.collate, self.stream, self.cfg, self.cfg.pin_memory and cuda, self._resume,
                                  reuse=self._reuse(), pin_buffers=cuda)
            self._batches = DevicePrefetcher(host, self.device, threaded=self.threaded)
        return self

    def __next__(self) -> Any:
        batch, tag = next(iter(self)._batches)
        self.workers[str(tag["worker"])] = tag["state"]
        self.next_worker = (tag["worker"] + 1) % self.num_workers
        return batch

    def close(self) -> None:
        """Stop the copy thread and the DataLoader workers now rather than at garbage collection."""
        if self._batches is not None:
            self._batches.close()


def buffer_slots(collate: Callable[..., Any], cfg: LoopConfig, reuse: bool) -> int:
    """Reusable buffers per producer: none unless ``reuse`` is asked for and ``collate`` takes ``slots=``."""
    from foresight.trainers.slots import slots_needed

    return slots_needed(cfg.prefetch_factor, cfg.num_workers) if reuse and _takes_slots(collate) else 0


def batch_iterator(collate: Callable[..., Any], stream: IterableDataset, cfg: LoopConfig, pin: bool,
                   resume: dict[str, Any] | None, reuse: bool = False,
                   pin_buffers: bool = False) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Endless host ``(batch, tag)`` pairs of ``stream`` (what :class:`ResumableLoader` hands on).

    ``resume``: a ``ResumableLoader.state_dict()``. ``pin``: the DataLoader pins each batch. ``reuse``:
    collate into reusable buffers when ``collate`` takes them (page-locked ones in this process with
    ``pin_buffers``); a tag's ``slot`` then says the batch lives in one, to be consumed through
    ``DevicePrefetcher``.
    """
    from foresight.trainers.data import worker_context

    slots = buffer_slots(collate, cfg, reuse)
    batches = StatefulBatches(stream, cfg.batch_size, collate, resume, slots=slots, pinned=pin_buffers)
    loader = DataLoader(
        batches, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin and not slots,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        multiprocessing_context=worker_context() if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
    )
    # The workers start here, in the calling thread, not in whichever thread first asks for a batch.
    return _tagged(iter(loader))


def _takes_slots(collate: Callable) -> bool:
    try:
        return "slots" in inspect.signature(collate).parameters
    except (TypeError, ValueError):
        return False


def _tagged(items: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, dict[str, Any]]]:
    for item in items:
        if not item.get("skip"):
            yield item["batch"], {"worker": item["worker"], "state": item["state"], "slot": item["slot"]}
