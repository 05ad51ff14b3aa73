"""Reusable, page-locked batch buffers between the readers and the GPU copy.

Without them every batch is fresh memory: a worker allocates a new shared-memory segment per batch
(hundreds of MB for full-size one-step features), the main process maps it, pins it with one more
host copy and unmaps it again. That churn (page faults, mmap/munmap with their TLB shoot-downs,
the pin copy) lands in the training process and slowed a launch-heavy step (the action expert) to
55% of its GPU-resident speed with worker processes (bench/RESULTS.md, issue 8).

With ``BatchSlots`` each producer (a DataLoader worker, or the main process when there are no
workers) owns a small ring of buffers allocated once: in shared memory inside a worker, page-locked
memory in the main process. Collating writes straight into the next buffer. The main process
page-locks each shared buffer once (``cudaHostRegister``) the first time it sees it, so the copy to
the GPU is a direct DMA with no host copy. torch's shared-storage cache hands the main process the
same storage for the same segment, so a buffer that comes back is recognised and not mapped again.

Reuse is safe because the consumer (``trainers.prefetch.DevicePrefetcher``) waits for a buffer's GPU
copy to finish before it asks for the next batch, and a worker writes batch ``r`` only after the
main process took batch ``r - prefetch_factor`` of that worker: buffers ``r - prefetch_factor``
(possibly still being copied) to ``r`` are distinct with ``prefetch_factor + 1`` of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]
"""Batch key -> (shape, numpy dtype) of the stacked array."""

CUDA_HOST_REGISTER_PORTABLE = 1  # page-locked for every CUDA context


def slots_needed(prefetch_factor: int, num_workers: int) -> int:
    """Buffers per producer: the batches a worker may run ahead, plus the one being copied."""
    return (prefetch_factor if num_workers else 1) + 1


def batch_layout(samples: Sequence[Mapping[str, Any]]) -> Layout:
    """Shapes and dtypes of the array fields of ``samples`` stacked (other fields are left out)."""
    layout: Layout = {}
    for name, value in samples[0].items():
        if isinstance(value, np.ndarray):
            layout[name] = ((len(samples), *value.shape), value.dtype)
    return layout


class BatchSlots:
    """A ring of ``count`` preallocated batches of one layout, owned by one producer.

    ``shared``: allocate in shared memory (inside a DataLoader worker, so batches cross to the main
    process without a copy); ``pinned``: page-locked memory (main process, CUDA). A batch of
    another layout (the short last one of a stream) gets no buffer: ``take`` returns None and the
    caller allocates as usual.
    """

    def __init__(self, count: int, shared: bool, pinned: bool):
        if count < 2:
            raise ValueError(f"batch buffers: need at least 2 per producer (got {count})")
        self.count, self.shared, self.pinned = count, shared, pinned
        self.layout: Layout | None = None
        self.buffers: list[dict[str, torch.Tensor]] = []
        self.next = 0

    def take(self, layout: Layout) -> dict[str, torch.Tensor] | None:
        """The next buffer of the ring for a batch of ``layout`` (None for a layout of its own)."""
        if self.layout is None:
            self.layout = layout
        if layout != self.layout:
            return None
        if len(self.buffers) < self.count:
            self.buffers.append({name: self._allocate(shape, dtype) for name, (shape, dtype) in layout.items()})
        buffer = self.buffers[self.next % self.count]
        self.next += 1
        return buffer

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        if self.shared:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape)
        return torch.empty(shape, dtype=torch_dtype, pin_memory=self.pinned)


def fill(buffer: dict[str, torch.Tensor], samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A batch of ``samples`` written into ``buffer``; fields without a buffer are kept as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        if name in buffer:
            # numpy's copy, not torch's: torch's CPU float16 copy is far slower on the CPU wheels.
            np.stack(values, out=buffer[name].numpy())
            batch[name] = buffer[name]
        else:
            batch[name] = values
    return batch


class HostRegistry:
    """Shared-memory batch storages page-locked in this process, each once, until ``close``."""

    def __init__(self):
        self.storages: dict[int, torch.UntypedStorage] = {}

    def ensure(self, batch: Any) -> None:
        """Page-lock every CPU tensor storage of ``batch`` that is not page-locked yet."""
        for tensor in _tensors(batch):
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if tensor.is_cuda or pointer in self.storages or tensor.is_pinned() or storage.nbytes() == 0:
                continue
            error = int(torch.cuda.cudart().cudaHostRegister(pointer, storage.nbytes(), CUDA_HOST_REGISTER_PORTABLE))
            if error:
                raise RuntimeError(f"batch buffers: cudaHostRegister of {storage.nbytes()} bytes failed (error {error})")
            self.storages[pointer] = storage  # the reference keeps torch's shared-storage cache entry alive

    def close(self) -> None:
        """Unlock every registered storage (before the mappings go away) and drop them."""
        for pointer in self.storages:
            torch.cuda.cudart().cudaHostUnregister(pointer)
        self.storages.clear()


def _tensors(batch: Any):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)
