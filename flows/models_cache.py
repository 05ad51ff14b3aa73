"""A per-process model cache, so each worker loads a model once and reuses it across tasks.

Prefect tasks run in threads of the flow process or in Dask worker processes; either way the
process stays up between shard tasks. Loading a 1.5B-parameter UNet per shard would cost more
than the shard itself, so shard tasks get their models through :func:`cached_model`, keyed by
``(family, spec, device, dtype)`` plus any settings that change the loaded module.

The cache holds at most ``$FORESIGHT_MODEL_CACHE_SIZE`` models (default 2: a chain alternates
between a generator and a teacher); the least recently used one is dropped, and the device
memory it held is returned to the allocator.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from foresight.schemas.base import canonical_json

log = logging.getLogger(__name__)

SIZE_ENV = "FORESIGHT_MODEL_CACHE_SIZE"
DEFAULT_SIZE = 2
Model = TypeVar("Model")


@dataclass(frozen=True)
class ModelKey:
    """What identifies a loaded model in one process."""

    family: str
    spec: str
    device: str
    dtype: str
    extra: str = ""

    def __str__(self) -> str:
        text = f"{self.family}:{self.spec}@{self.device}/{self.dtype}"
        return f"{text}[{self.extra}]" if self.extra else text


@dataclass
class CacheStats:
    """Counters of this process's cache (tests and logs use them)."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class ModelCache:
    """An LRU of loaded models with one lock per key, so concurrent threads load a model once."""

    def __init__(self, max_models: int | None = None):
        self.max_models = max_models
        self._models: OrderedDict[ModelKey, Any] = OrderedDict()
        self._key_locks: dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def capacity(self) -> int:
        if self.max_models is not None:
            return self.max_models
        value = os.environ.get(SIZE_ENV, str(DEFAULT_SIZE))
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{SIZE_ENV}={value!r}: must be a positive integer")
        return int(value)

    def get(self, key: ModelKey, load: Callable[[], Model]) -> Model:
        """The model for ``key``, calling ``load()`` only when this process has not loaded it."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.stats.hits += 1
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:  # another thread loaded it while we waited
                    self.stats.hits += 1
                    return self._models[key]
            started = time.perf_counter()
            model = load()
            elapsed = time.perf_counter() - started
            with self._lock:
                self._models[key] = model
                self.stats.loads += 1
                self.stats.load_seconds += elapsed
                self._evict_over_capacity()
            log.info("loaded %s in %.1f s (pid %d)", key, elapsed, os.getpid())
            return model

    def _evict_over_capacity(self) -> None:
        evicted = False
        while len(self._models) > self.capacity():
            old_key, _ = self._models.popitem(last=False)
            self._key_locks.pop(old_key, None)
            self.stats.evictions += 1
            evicted = True
            log.info("dropped %s from the model cache", old_key)
        if evicted:
            _release_device_memory()

    def keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._key_locks.clear()
        _release_device_memory()


def _release_device_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_CACHE = ModelCache()


def process_cache() -> ModelCache:
    """The cache of this process (one per Dask worker, one per local flow process)."""
    return _CACHE


def model_key(family: str, spec: str, device: str, dtype: str, extra: Hashable | dict | None = None) -> ModelKey:
    """A cache key; ``extra`` (settings that change the loaded module) is keyed by its canonical JSON."""
    extra_text = "" if extra is None else (canonical_json(extra) if isinstance(extra, dict) else str(extra))
    return ModelKey(family=family, spec=str(spec), device=str(device), dtype=str(dtype), extra=extra_text)


def cached_model(family: str, spec: str, device: str, dtype: str, load: Callable[[], Model],
                 extra: Hashable | dict | None = None) -> Model:
    """Load a model once per process and return the same object to every later task.

    ``load`` is called with no arguments on a miss; it must return a model already on ``device``
    in ``dtype``. Tasks must not modify the returned model (it is shared between tasks)::

        teacher = cached_model("dinov2", spec, device, dtype, lambda: load_teacher(spec, device, dtype))
    """
    return _CACHE.get(model_key(family, spec, device, dtype, extra), load)
