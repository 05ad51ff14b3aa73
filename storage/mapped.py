"""Memory-mapped local shard files, and views of them that cross process boundaries as descriptors.

ShardStream's samples on a local root are views of a copy-on-write memory map of the shard file
(``map_file``): no copy at all in the process that reads them. A DataLoader worker would otherwise
pickle those arrays (or copy them into fresh shared memory) to hand them to the main process, which
costs more than reading them. ``describe_views`` turns the views of one sample into small
descriptors instead (file path, byte offset, dtype, shape, and the identity of the file the worker
mapped); unpickling them in the receiving process maps the same bytes of the same file again
(``open_region``). Both processes read the same page-cache pages.

Safety of the receiving side:
- only files registered with ``allow_files`` (ShardStream registers the shards of its export) are
  mapped, and every byte range is checked against the file's size;
- the file is opened and its identity (device, inode, size, mtime, ctime) compared with the one the worker
  mapped: a shard deleted, replaced or modified in between is refused instead of returning other bytes;
- descriptors carry only a path, integers and a numeric dtype string: nothing from a shard is ever
  unpickled.

Each received sample gets its own copy-on-write map of the byte range its arrays span (one map per
sample and file): its arrays are writable, and writes stay private to that sample exactly as they do
in-process. A map per file cached for the whole run would let a trainer's in-place edits of one epoch's
arrays reappear when the same sample is read in a later epoch.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_ALLOWED: dict[str, tuple[int, str]] = {}
"""Real path -> (expected size in bytes, label) of the files this process accepts descriptors for."""
_ALLOWED_LOCK = threading.Lock()
VIEW_DTYPE_KINDS = "biufc"
"""Numeric and bool dtypes: the only ones a descriptor may name (no objects, no structured records)."""


class FileIdentity(NamedTuple):
    """Which file a map was made from: equal identities mean the same, unmodified file."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int  # also changes when a writer sets the modification time back

    @classmethod
    def of(cls, stat: os.stat_result) -> FileIdentity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def allow_files(files: Mapping[str, tuple[int, str]]) -> None:
    """Accept descriptors of these files in this process: {path: (size in bytes, label for errors)}."""
    with _ALLOWED_LOCK:
        _ALLOWED.update({os.path.realpath(path): (int(size), label) for path, (size, label) in files.items()})


def map_file(path: str) -> np.memmap:
    """Copy-on-write uint8 memory map of a whole file, carrying the identity of the file it maps
    (``describe_views`` reads it; the identity comes from the very descriptor that was mapped)."""
    with open(path, "rb") as handle:
        identity = FileIdentity.of(os.fstat(handle.fileno()))
        mapped = np.memmap(handle, dtype=np.uint8, mode="c")  # private pages: arrays are writable
    mapped.identity = identity
    return mapped


# describing views (the sending side) -----------------------------------------------------------
@dataclass(frozen=True)
class MappedRegion:
    """Bytes [start, start + length) of a mapped file; unpickles as a fresh copy-on-write map of them."""

    path: str
    start: int
    length: int
    identity: FileIdentity

    def __reduce__(self):
        return open_region, (self.path, self.start, self.length, tuple(self.identity))


@dataclass(frozen=True)
class MappedView:
    """An array at byte ``offset`` of a region; unpickles as a view of the region's map (no copy).

    Views of one sample share their ``MappedRegion`` object, which pickle writes (and the receiver
    maps) once.
    """

    region: MappedRegion
    offset: int
    dtype: str
    shape: tuple[int, ...]
    order: str

    def __reduce__(self):
        return view_of_region, (self.region, self.offset, self.dtype, self.shape, self.order)


def file_map_of(array: np.ndarray) -> np.memmap | None:
    """The ``map_file`` map an array is a view of (following ``.base`` and ``memoryview.obj``), or None."""
    obj = array
    while obj is not None:
        if isinstance(obj, np.memmap) and isinstance(obj.base, mmap.mmap):
            return obj if isinstance(getattr(obj, "identity", None), FileIdentity) else None
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
    return None


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _mapped_span(array: np.ndarray) -> tuple[np.memmap, int] | None:
    """(file map, file offset of the array's first byte) of a contiguous view of a file map, else None."""
    if not isinstance(array, np.ndarray) or array.size == 0 or array.dtype.kind not in VIEW_DTYPE_KINDS:
        return None
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        return None
    mapped = file_map_of(array)
    if mapped is None:
        return None
    relative = _address(array) - _address(mapped)
    assert 0 <= relative and relative + array.nbytes <= mapped.nbytes, "view lies outside its own map"
    return mapped, mapped.offset + relative


def describe_views(arrays: Mapping[str, object]) -> dict[str, MappedView]:
    """Descriptors of the values of ``arrays`` that are contiguous views of ``map_file`` maps.

    The views of one file share one region (from their first to their last byte), so the receiver
    makes one map per file for them. Values that are not such views are left out.
    """
    spans = {name: span for name, value in arrays.items() if (span := _mapped_span(value)) is not None}
    groups: dict[int, list[str]] = {}
    for name, (mapped, _) in spans.items():
        groups.setdefault(id(mapped), []).append(name)
    views = {}
    for names in groups.values():
        mapped = spans[names[0]][0]
        start = min(spans[name][1] for name in names)
        end = max(spans[name][1] + arrays[name].nbytes for name in names)
        region = MappedRegion(mapped.filename, start, end - start, mapped.identity)
        for name in names:
            array = arrays[name]
            order = "C" if array.flags.c_contiguous else "F"
            views[name] = MappedView(region, spans[name][1] - start, array.dtype.str, tuple(array.shape), order)
    return views


# opening views (the receiving side) ------------------------------------------------------------
def _allowed(path: str) -> tuple[str, int, str]:
    real = os.path.realpath(path)
    with _ALLOWED_LOCK:
        entry = _ALLOWED.get(real)
    if entry is None:
        raise ValueError(f"{path}: not a shard file of an export read in this process; refusing to map it")
    return real, entry[0], entry[1]


def open_region(path: str, start: int, length: int, identity: Sequence[int]) -> np.memmap:
    """Copy-on-write map of bytes [start, start + length) of ``path``, after checking that the file is
    an allowed shard, the range lies inside it, and it is still the file the sender mapped."""
    real, size, label = _allowed(path)
    identity = FileIdentity(*map(int, identity))
    if identity.size != size:
        raise ValueError(f"{path} ({label}): the sender mapped a file of {identity.size} bytes, the export's "
                         f"index says {size}; the shard was replaced")
    if start < 0 or length <= 0 or start + length > size:
        raise ValueError(f"{path} ({label}): byte range [{start}, {start + length}) is outside the file's "
                         f"{size} bytes")
    region = map_unchanged(real, start, length, identity, f"{path} ({label})", "the sender")
    region.identity = identity  # its views can be described again (handed on to another process)
    return region


def map_unchanged(path: str, start: int, length: int, identity: FileIdentity, label: str,
                  mapped_by: str = "this reader") -> np.memmap:
    """Copy-on-write map of bytes [start, start + length) of ``path`` if it is still the file of
    ``identity`` (ValueError otherwise: a file deleted, replaced or modified since is never mapped in
    its place). Each call maps afresh, so writes into one map's arrays stay private to them. The map
    carries no ``identity``: :func:`describe_views` hands its views to other processes as copies, since
    only files registered with :func:`allow_files` may be mapped from a descriptor."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ValueError(f"{label}: cannot open the shard {mapped_by} mapped ({err}); it was deleted "
                         "or replaced while being read") from None
    with handle:
        found = FileIdentity.of(os.fstat(handle.fileno()))
        if found != identity:
            raise ValueError(f"{label}: the shard changed after {mapped_by} mapped it (file identity "
                             f"{identity} then, {found} now); refusing to map other bytes")
        return np.memmap(handle, dtype=np.uint8, mode="c", offset=start, shape=(length,))


def view_of_region(region: np.memmap, offset: int, dtype: str, shape: Sequence[int], order: str) -> np.ndarray:
    """The array at byte ``offset`` of a region map (a view, no copy); checks that it fits the region."""
    kind = np.dtype(dtype)
    if kind.kind not in VIEW_DTYPE_KINDS or kind.hasobject or kind.fields is not None or order not in ("C", "F"):
        raise ValueError(f"{region.filename}: a mapped view may only hold numeric arrays (got dtype {dtype!r}, "
                         f"order {order!r})")
    count = math.prod(shape)
    if offset < 0 or count < 0 or offset + count * kind.itemsize > region.nbytes:
        raise ValueError(f"{region.filename}: view of {count} x {kind} at byte {offset} runs outside its "
                         f"mapped region of {region.nbytes} bytes")
    return np.frombuffer(region, dtype=kind, count=count, offset=offset).reshape(tuple(shape), order=order)

