"""Clip plans: which frames of which episodes become training clips."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any, overload

import pyarrow as pa
from pydantic import Field

from foresight.schemas.base import FORMAT_VERSION, StrictModel


class ClipRow(StrictModel):
    """One clip: ``num_frames`` frames of one camera, ``stride`` apart, from ``start``."""

    clip_id: str = Field(description="Unique id within the plan (no '.' so it is a valid webdataset key).")
    dataset: str
    episode_id: str
    camera: str
    start: int = Field(description="Frame index of the observed (conditioning) frame.")
    num_frames: int
    stride: int
    instruction: str


CLIPS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("dataset", pa.string()),
        ("episode_id", pa.string()),
        ("camera", pa.string()),
        ("start", pa.int64()),
        ("num_frames", pa.int64()),
        ("stride", pa.int64()),
        ("instruction", pa.string()),
    ]
)


class ClipRows(Sequence[ClipRow]):
    """A plan's clip rows, kept as the columns of clips.parquet (about 120 B a clip, where a list of
    :class:`ClipRow` objects takes about 1.4 KB: 1.4 GB at 10^6 clips in every process that reads
    the plan). Rows are built on access, a block of :attr:`BLOCK` at a time, so the sequential reads
    of a shard's clips build each row once."""

    BLOCK = 1024

    def __init__(self, table: pa.Table):
        self.table = table
        self._block: tuple[int, list[ClipRow]] = (-1, [])

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, index: int) -> ClipRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[ClipRow]: ...

    def __getitem__(self, index: int | slice) -> ClipRow | list[ClipRow]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = operator.index(index)
        position += len(self) if position < 0 else 0
        if not 0 <= position < len(self):
            raise IndexError(f"clip {index} out of range (the plan has {len(self)} clips)")
        number, rows = self._block  # one read: another thread may replace the block meanwhile
        if number != position // self.BLOCK:
            number = position // self.BLOCK
            rows = self._rows(number * self.BLOCK, self.BLOCK)
            self._block = (number, rows)
        return rows[position - number * self.BLOCK]

    def __iter__(self) -> Iterator[ClipRow]:
        for start in range(0, len(self), self.BLOCK):
            yield from self._rows(start, self.BLOCK)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # a sequence compared by value

    def column(self, name: str) -> list[Any]:
        """One field of every clip, in plan order (without building rows)."""
        return self.table.column(name).to_pylist()

    def _rows(self, start: int, count: int) -> list[ClipRow]:
        return [ClipRow(**row) for row in self.table.slice(start, count).to_pylist()]


class PlanInfo(StrictModel):
    """plan.json: how a plan was made. ``plan_id`` is content addressed over the rest."""

    format_version: int = Field(default=FORMAT_VERSION)
    plan_id: str
    dataset: str
    dataset_fingerprint: str
    params: dict[str, Any] = Field(description="Every parameter that changed the clip list.")
    num_clips: int
    clips_sha256: str = Field(default="", description="sha256 of clips.parquet.")
    created: str = Field(default="", description="ISO timestamp.")
