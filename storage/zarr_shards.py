"""Whole zarr v3 shard objects encoded in one pass, byte for byte what zarr itself writes.

The target store writes one whole shard at a time (chunk = one clip, shard = ``shard_size``
clips). Going through zarr costs several full copies of the shard (the codec pipeline's chunk
buffers, the assembled shard, the write) and the ``_done`` marker then re-reads the object to
hash it. For the teacher stage that is gigabytes per second of output, and the writers, not the
GPU, set the pace (bench/RESULTS.md, issue 5). Here each chunk is (optionally) compressed, hashed
and written straight from the caller's array, and the sha256 comes out of the same pass.

Reading the other way (``ShardCodec.decode_rows``) decodes chunks of a memory-mapped shard object
straight into the caller's array, without zarr's per-call machinery (a 21 MB one-step chunk: 26 ms
through zarr, 17 ms for the zstd decode itself); uncompressed chunks stored back to back can be
mapped as one array instead (``ShardCodec.row_span``), no copy at all.

Only the layout the target store creates is handled (``sharding_indexed`` with chunks of one
index along the first axis, inner codecs ``bytes`` little endian [+ ``zstd``], index codecs
``bytes`` + ``crc32c`` at the end); ``shard_codec`` returns None for anything else and the caller
writes through zarr. Tests compare the bytes with zarr's own for both codecs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd

MAX_UINT64 = 2**64 - 1
"""Offset and length of an absent chunk in a shard index."""


@dataclass(frozen=True)
class ShardCodec:
    """How the chunks of one array's shards are encoded."""

    chunks_per_shard: int
    zstd: Any = None  # numcodecs.Zstd configured as the array's zstd codec, or None for raw bytes

    def parts(self, data: np.ndarray) -> Iterator[memoryview | bytes]:
        """The shard object of ``data`` (its first axis = the shard's chunks, in order), in pieces."""
        assert data.dtype.byteorder in "=<|" and data.shape[0] <= self.chunks_per_shard
        data = np.ascontiguousarray(data)
        index = np.full((self.chunks_per_shard, 2), MAX_UINT64, dtype="<u8")
        offset = 0
        for i in range(data.shape[0]):
            chunk = memoryview(data[i:i + 1].reshape(-1).view(np.uint8))  # a slice: 1-d rows are views too
            encoded = self.zstd.encode(chunk) if self.zstd is not None else chunk
            index[i] = (offset, len(encoded))
            offset += len(encoded)
            yield encoded
        index_bytes = index.tobytes()
        yield index_bytes + np.uint32(google_crc32c.value(index_bytes)).tobytes()

    def decode_rows(self, shard: memoryview, rows: Sequence[int], out: np.ndarray, where: str) -> None:
        """Decode chunks ``rows`` (indices within the shard) of a shard object in memory (or
        memory-mapped) into ``out`` (one row per chunk, already filled with the fill value for
        absent chunks)."""
        shard = memoryview(shard).cast("B")
        index = self._shard_index(shard, where)
        for i, row in enumerate(rows):
            offset, length = (int(v) for v in index[row])
            if offset == MAX_UINT64:
                continue
            if offset + length > len(shard) - self.index_size:
                raise ValueError(f"{where}: chunk {row} runs past the end of the shard object")
            target = memoryview(out[i:i + 1].reshape(-1).view(np.uint8))
            encoded = shard[offset:offset + length]
            if self.zstd is None:
                if length != target.nbytes:
                    raise ValueError(f"{where}: chunk {row} holds {length} bytes, expected {target.nbytes}")
                target[:] = encoded
            else:
                self._decode(encoded, target, row, where)

    def row_span(self, shard: memoryview, first: int, stop: int, row_bytes: int, where: str) -> tuple[int, int] | None:
        """(byte offset, length) in the shard object of uncompressed chunks ``first:stop`` stored back
        to back (as :meth:`parts` writes them), so a reader can map them as one array without a copy;
        None for compressed chunks, an absent chunk (fill values) or any other arrangement. A damaged
        index raises as in :meth:`decode_rows`."""
        if self.zstd is not None or stop <= first:
            return None
        shard = memoryview(shard).cast("B")
        index = self._shard_index(shard, where)
        offsets, lengths = index[first:stop, 0], index[first:stop, 1]
        start = int(offsets[0])
        expected = np.uint64(start) + np.uint64(row_bytes) * np.arange(stop - first, dtype=np.uint64)
        if (np.any(offsets == MAX_UINT64) or np.any(lengths != row_bytes) or np.any(offsets != expected)
                or start + row_bytes * (stop - first) > len(shard) - self.index_size):
            return None
        return start, row_bytes * (stop - first)

    def _decode(self, encoded: bytes | memoryview, target: memoryview, row: int, where: str) -> None:
        try:
            self.zstd.decode(encoded, out=target)
        except (RuntimeError, ValueError) as err:  # numcodecs reports corrupt frames as RuntimeError
            raise ValueError(f"{where}: chunk {row} cannot be decoded ({err}); the shard is corrupt") from None

    @property
    def index_size(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def _shard_index(self, shard: memoryview, where: str) -> np.ndarray:
        """The offset/length table at the end of a shard object in memory."""
        return self._index(shard[len(shard) - self.index_size:] if len(shard) >= self.index_size else shard,
                           len(shard), where)

    def _index(self, index_bytes: bytes | memoryview, size: int, where: str) -> np.ndarray:
        """The (chunks, 2) offset/length table of a shard object of ``size`` bytes, crc-checked."""
        if size < self.index_size:
            raise ValueError(f"{where}: shard object of {size} bytes is shorter than its index")
        index_bytes = bytes(index_bytes)
        if np.uint32(google_crc32c.value(index_bytes[:-4])).tobytes() != index_bytes[-4:]:
            raise ValueError(f"{where}: shard index checksum (crc32c) does not match")
        return np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(self.chunks_per_shard, 2)


def shard_codec(array: zarr.Array) -> ShardCodec | None:
    """The encoder for ``array``'s shards, or None when its layout is not the one handled here."""
    # A JSON round trip turns the metadata's tuples into the lists they are on disk.
    codecs = json.loads(json.dumps(array.metadata.to_dict().get("codecs", [])))
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0]["configuration"]
    shard_shape = array.shards
    chunk_shape = list(config["chunk_shape"])
    if shard_shape is None or chunk_shape != [1, *shard_shape[1:]]:
        return None
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    if config.get("index_location") != "end" or config.get("index_codecs") != [little, {"name": "crc32c"}]:
        return None
    inner = config.get("codecs", [])
    # Single-byte dtypes carry no endianness: their bytes codec has no configuration.
    if not inner or inner[0] not in (little, {"name": "bytes"}):
        return None
    if len(inner) == 1:
        return ShardCodec(shard_shape[0])
    if len(inner) == 2 and inner[1].get("name") == "zstd":
        return ShardCodec(shard_shape[0], Zstd.from_config(dict(inner[1]["configuration"])))
    return None
