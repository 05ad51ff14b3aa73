"""The export store: webdataset tar shards + index.json under ``<root>/exports/<export_id>/``.

Layout of one export::

    exports/<export_id>/
      _build.json            while building: the recipe, field specs, shard plan and stats
      _done/<shard>.json     while building: the record of a finished shard (written after its rename)
      _claims/<shard>/       claims of concurrent builders: each shard is written by one (storage.claims)
      shard-000000.tar ...   plain ustar tars; each written as a writer-tagged .tmp-* (storage.fs.temp_name),
                             fsynced and renamed when complete
      samples.npy            the sample table, written just before index.json: one 64-byte row per
                             sample (plan row, byte offset, sha256, xxh3) in shard order (SAMPLE_ROW)
      index.json             written last: shards (samples, bytes, sha256), the sample table's name,
                             size and sha256, every version id, action/state statistics

index.json stays small (per shard, not per sample); readers hold the sample table as one numpy array
(64 B a sample), never as Python objects per sample. Exports made before the table existed carry the
per-sample lists inside index.json's shard entries; they are read into the same table.

An export exists only once index.json exists. Tar members are parsed from their headers and read as
bytes: never extracted by path; anything but a regular file member is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import sys
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BeforeValidator, Field, PlainSerializer, PrivateAttr

from foresight.pipelines.export import action_chunk, column_stats, decoded_dtype, tar_sample_bytes, target_field_names
from foresight.schemas.base import FORMAT_VERSION, StrictModel, validate, validate_stored
from foresight.schemas.dataset import ColumnStats
from foresight.schemas.plan import ClipRows
from foresight.schemas.refs import is_version_id
from foresight.schemas.target import TargetVersion, content_id
from foresight.storage import layout
from foresight.storage.episodes import EpisodeStore
from foresight.storage.fs import (TMP_PREFIX, DiskFullError, Root, check_content_digest, content_digest, fast_digest,
                                  free_bytes, fsync_dir, open_root, remove_temporaries, temp_name)
from foresight.storage.graph import VersionGraph
from foresight.storage.lookahead import helper_threads, prepared_lazily
from foresight.storage.mapped import allow_files, map_file
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetReader, TargetStore, confirm_reads_unchanged, verify_by_default
from foresight.storage.provenance import git_commit, host, now_iso, package_versions

log = logging.getLogger(__name__)
EXPORT_STAGE_VERSION = 2
"""Bumped by hand when the tar layout or a codec changes what bytes an export holds."""
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
ZERO_BLOCK = bytes(TAR_BLOCK)
EPISODE_PREFIX = "episode:"
MASK_SUFFIX = ":mask"
LOOKAHEAD = 4
"""Samples a verified sequential read (ShardStream's) checks ahead of its consumer in a background thread."""


@dataclass(frozen=True)
class FieldSource:
    """Where one field of every sample comes from: an array of a target version, or a low-dim column of
    the episode store (``mask``: the column's validity mask over the action chunk).

    Stored as '<target version>:<array>' or 'episode:<column>[:mask]' (the form export ids were hashed
    with); :meth:`parse` is the one reader of that form.
    """

    version: str | None
    name: str
    mask: bool = False

    @classmethod
    def target(cls, version: str, array: str) -> FieldSource:
        return cls(version=version, name=array)

    @classmethod
    def episode(cls, column: str, mask: bool = False) -> FieldSource:
        return cls(version=None, name=column, mask=mask)

    @classmethod
    def parse(cls, text: Any) -> FieldSource:
        """The source a stored string names; ValueError quoting it when it is neither form."""
        if isinstance(text, FieldSource):
            return text
        if isinstance(text, str) and text.startswith(EPISODE_PREFIX):
            column = text[len(EPISODE_PREFIX):]
            mask = column.endswith(MASK_SUFFIX)
            column = column[:-len(MASK_SUFFIX)] if mask else column
            if column and ":" not in column:
                return cls.episode(column, mask)
        elif isinstance(text, str):
            version, _, array = text.partition(":")
            if is_version_id(version) and array and ":" not in array:
                return cls.target(version, array)
        raise ValueError(f"field source {text!r}: expected '<target version>:<array>' or 'episode:<column>[:mask]'")

    @property
    def is_episode(self) -> bool:
        return self.version is None

    def __str__(self) -> str:
        if self.version is None:
            return f"{EPISODE_PREFIX}{self.name}{MASK_SUFFIX if self.mask else ''}"
        return f"{self.version}:{self.name}"


def _parse_sources(value: Any) -> Any:
    """Field -> FieldSource of a stored sources dict; the error names the field."""
    if not isinstance(value, dict):
        return value
    parsed = {}
    for field, text in value.items():
        try:
            parsed[field] = FieldSource.parse(text)
        except ValueError as err:
            raise ValueError(f"field '{field}': {err}") from None
    return parsed


FieldSources = Annotated[dict[str, FieldSource], BeforeValidator(_parse_sources),
                         PlainSerializer(lambda sources: {f: str(s) for f, s in sources.items()},
                                         return_type=dict[str, str])]
"""Field -> source: typed in memory, stored and hashed as strings (see :class:`FieldSource`)."""
StoredFieldSource = Annotated[FieldSource, BeforeValidator(FieldSource.parse), PlainSerializer(str, return_type=str)]


class ExportRecipe(StrictModel):
    """Everything that decides an export's bytes; its hash is the export id."""

    plan_id: str = Field(description="Clip plan the samples come from (plan order).")
    split: str | None = Field(description="Only clips of episodes of this split; None = every clip.")
    sources: FieldSources = Field(description="Field -> '<target version>:<array>' or 'episode:<column>[:mask]'.")
    codec: Literal["f16", "bf16", "fp8"] = Field(description="Codec of floating-point target fields.")
    shard_bytes: int = Field(description="Target size of one tar shard in bytes.")
    action_chunk: int = Field(description="Action rows per sample (frames start .. start+chunk-1).")
    stage_version: int = Field(default=EXPORT_STAGE_VERSION, description="Export format/algorithm version.")

    def export_id(self) -> str:
        return content_id("export", self.model_dump(mode="json"))


class ExportField(StrictModel):
    """One field of every sample."""

    source: StoredFieldSource = Field(description="'<target version>:<array>' or 'episode:<column>[:mask]'.")
    version: str | None = Field(description="Target version id the field comes from (None: episode store).")
    codec: str = Field(description="'raw', 'f16', 'bf16' or 'fp8' (see pipelines/export.py).")
    dtype: str = Field(description="dtype of the decoded array (before a reader's float_dtype).")
    shape: list[int] = Field(description="Shape of the field in one sample.")


class ExportShard(StrictModel):
    """The record of one finished tar shard, with its samples (``_done/<i>.json`` while building; the
    shard entries of index.json in exports made before the sample table)."""

    name: str
    samples: int
    bytes: int
    sha256: str
    clips: list[int] = Field(description="Plan row of each sample, in tar order.")
    offsets: list[int] = Field(description="Byte offset of each sample's first tar header.")
    data_end: int = Field(description="Byte offset of the end-of-archive blocks (end of the last sample).")
    sample_sha256: list[str] = Field(description="sha256 of each sample's bytes (headers + payloads).")
    sample_xxh3: list[str] = Field(default_factory=list, description="xxh3-128 of each sample's bytes: what "
                                   "readers check while reading (empty in exports made before it was recorded).")

    def sample_rows(self, where: str) -> np.ndarray:
        """The shard's samples as rows of the sample table (SAMPLE_ROW)."""
        lists = [len(self.clips), len(self.offsets), len(self.sample_sha256)]
        if lists != [self.samples] * 3 or (self.sample_xxh3 and len(self.sample_xxh3) != self.samples):
            raise ValueError(f"{where}: {self.name} records {self.samples} samples but {lists[0]} clips, "
                             f"{lists[1]} offsets, {lists[2]} sha256 and {len(self.sample_xxh3)} xxh3 digests")
        rows = np.zeros(self.samples, SAMPLE_ROW)
        rows["clip"], rows["offset"] = self.clips, self.offsets
        try:
            rows["sha256"] = np.frombuffer(bytes.fromhex("".join(self.sample_sha256)), "V32")
            if self.sample_xxh3:
                rows["xxh3"] = np.frombuffer(bytes.fromhex("".join(self.sample_xxh3)), "V16")
        except ValueError:
            raise ValueError(f"{where}: {self.name} has a sample digest that is not a hex sha256 / xxh3-128") from None
        return rows

    def entry(self) -> "ShardEntry":
        """The shard as index.json lists it (its samples go to the sample table)."""
        return ShardEntry(name=self.name, samples=self.samples, bytes=self.bytes, sha256=self.sha256,
                          data_end=self.data_end, xxh3=bool(self.sample_xxh3))


SAMPLE_ROW = np.dtype([("clip", "<i8"), ("offset", "<i8"), ("sha256", "V32"), ("xxh3", "V16")])
"""One sample of the sample table: plan row, byte offset of its first tar header in its shard, sha256
and xxh3-128 of its bytes (zeros where not recorded)."""


class ShardEntry(StrictModel):
    """One finished tar shard as index.json lists it; its samples' rows are a view of the sample table
    (attached by ``ExportStore.index``), so a shard costs one small object whatever its sample count."""

    name: str
    samples: int
    bytes: int
    sha256: str
    data_end: int = Field(description="Byte offset of the end-of-archive blocks (end of the last sample).")
    xxh3: bool = Field(default=True, description="Whether the table holds each sample's xxh3-128 (what readers "
                                                 "check; False in exports made before it was recorded: sha256).")
    _rows: np.ndarray = PrivateAttr(default_factory=lambda: np.zeros(0, SAMPLE_ROW))

    @property
    def rows(self) -> np.ndarray:
        """This shard's rows of the sample table (SAMPLE_ROW), in tar order."""
        return self._rows

    @property
    def clips(self) -> np.ndarray:
        """Plan row of each sample, in tar order (int64)."""
        return self._rows["clip"]

    @property
    def offsets(self) -> np.ndarray:
        """Byte offset of each sample's first tar header (int64)."""
        return self._rows["offset"]

    def clip(self, position: int) -> int:
        return int(self._rows["clip"][position])

    def sample_range(self, position: int) -> tuple[int, int]:
        """[start, end) byte range of the sample at ``position`` in this shard."""
        offsets = self._rows["offset"]
        end = offsets[position + 1] if position + 1 < self.samples else self.data_end
        return int(offsets[position]), int(end)

    def intact(self, position: int, buffer: np.ndarray) -> bool:
        """The sample's bytes hash to what the index records (xxh3 when recorded, else sha256)."""
        row = self._rows[position]
        if self.xxh3:
            digest = fast_digest()
            digest.update(buffer)
            return digest.digest() == row["xxh3"].tobytes()
        return hashlib.sha256(buffer).digest() == row["sha256"].tobytes()


class SampleTableFile(StrictModel):
    """index.json's record of the sample table file (what makes a damaged or swapped table detectable)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$", description="File name in the export folder "
                                                                           "(samples.npy).")
    rows: int = Field(description="Samples in the table (= num_samples).")
    bytes: int = Field(description="Size of the file.")
    sha256: str = Field(description="sha256 of the file, checked on every read.")
    row_dtype: str = Field(description="numpy dtype of one row (SAMPLE_ROW), as str(dtype.descr).")


def sample_table_bytes(rows: np.ndarray) -> bytes:
    """The table as a .npy file (no pickle; readable with ``numpy.load(..., allow_pickle=False)``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(rows, SAMPLE_ROW), allow_pickle=False)
    return buffer.getvalue()


def parse_sample_table(data: bytes, record: SampleTableFile, where: str) -> np.ndarray:
    """The rows of a table file, refused in one line naming ``where`` unless size, sha256, dtype and
    row count are what index.json records."""
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"{where}: sample table does not match index.json ({len(data)} bytes, index.json records "
                         f"{record.bytes} bytes and its sha256); the file was modified, truncated or replaced")
    try:
        rows = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{where}: not a readable .npy sample table ({err})") from None
    if rows.dtype != SAMPLE_ROW or rows.shape != (record.rows,):
        raise ValueError(f"{where}: sample table holds {rows.shape} rows of {rows.dtype}, index.json records "
                         f"{record.rows} rows of {SAMPLE_ROW}")
    return rows


class ExportBuild(StrictModel):
    """_build.json: what the shard tasks of a building export need."""

    format_version: int = Field(default=FORMAT_VERSION)
    export_id: str
    recipe: ExportRecipe
    dataset: str
    fields: dict[str, ExportField]
    shard_clips: list[list[int]] = Field(description="Plan rows of each planned shard.")
    stats: dict[str, ColumnStats] = Field(default_factory=dict, description="'actions' / 'state' statistics.")


class ShardClipTable:
    """The plan rows of each planned shard of an export as two int64 arrays (``starts``: where each
    shard's rows begin in ``rows``, plus the end), 8 B a clip, where ``ExportBuild.shard_clips`` holds
    a Python int and a list slot per clip (~36 B): what a building export's driver and shard tasks
    keep while the build runs."""

    def __init__(self, starts: np.ndarray, rows: np.ndarray):
        self.starts, self.rows = starts, rows

    @classmethod
    def of(cls, shard_clips: Sequence[Sequence[int]]) -> "ShardClipTable":
        sizes = np.fromiter((len(clips) for clips in shard_clips), np.int64, len(shard_clips))
        starts = np.zeros(len(shard_clips) + 1, np.int64)
        np.cumsum(sizes, out=starts[1:])
        rows = np.fromiter((clip for clips in shard_clips for clip in clips), np.int64, int(starts[-1]))
        return cls(starts, rows)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def size(self, shard: int) -> int:
        return int(self.starts[shard + 1] - self.starts[shard])

    def clips(self, shard: int) -> list[int]:
        """Plan rows of one shard, in order."""
        return self.rows[self.starts[shard]:self.starts[shard + 1]].tolist()


class _BuildPlans:
    """The last few building exports' (recipe, shard plan) of this process, keyed by root, export id
    and the size of their _build.json (a plan begun over again after its folder was deleted is read
    again unless it is the same size; an export id fixes its recipe, so its plan differs only if the
    code that sizes shards changed, which a running process never sees)."""

    KEEP = 4

    def __init__(self):
        self._lock = threading.Lock()
        self._plans: dict[tuple[str, str], tuple[int, ExportRecipe, ShardClipTable]] = {}

    def get(self, store: "ExportStore", export_id: str, size: int) -> tuple[ExportRecipe, ShardClipTable]:
        key = (store.root.url, export_id)
        with self._lock:
            found = self._plans.get(key)
        if found is not None and found[0] == size:
            return found[1], found[2]
        build = store.build_info(export_id)
        plan = (size, build.recipe, ShardClipTable.of(build.shard_clips))
        with self._lock:
            self._plans.pop(key, None)
            while len(self._plans) >= self.KEEP:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan[1], plan[2]


_BUILD_PLANS = _BuildPlans()


def legacy_sample_rows(data: Any, where: str) -> np.ndarray | None:
    """The sample table of an index.json written before samples.npy (its shard entries list their
    samples), taking the per-sample lists out of ``data`` so that the rest validates as ExportIndex;
    None for a current index.json."""
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list) or not any(isinstance(s, dict) and "clips" in s for s in shards):
        return None
    parts = []
    for position, entry in enumerate(shards):
        shard = validate(ExportShard, entry, f"{where}, shards[{position}]")
        parts.append(shard.sample_rows(where))
        shards[position] = shard.entry().model_dump(mode="json")
    return np.concatenate(parts) if parts else np.zeros(0, SAMPLE_ROW)


class ExportIndex(StrictModel):
    """index.json of a complete export."""

    format_version: int = Field(default=FORMAT_VERSION)
    export_id: str
    recipe: ExportRecipe
    plan_id: str
    dataset: str
    versions: dict[str, str] = Field(description="Field -> target version id, for every target field.")
    fields: dict[str, ExportField]
    num_samples: int
    total_bytes: int
    shards: list[ShardEntry]
    sample_table: SampleTableFile | None = Field(default=None, description="The sample table file (None only "
                                                 "in exports made before it, whose shards list their samples).")
    stats: dict[str, ColumnStats] = Field(default_factory=dict)
    created: str = ""
    git_commit: str | None = None
    host: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    verified_inputs: bool = Field(default=True, description="False when the target versions were read with "
                                                            "--no-verify while exporting.")
    null_versions: list[str] = Field(default_factory=list, description="Versions made by the `null` model that "
                                     "the export was made from (simulation only; trainers refuse them unless "
                                     "allowed).")
    content_sha256: str | None = Field(default=None, description="sha256 of this index's canonical JSON without "
                                       "this key (storage.fs.content_digest): an edit anywhere in index.json is refused on "
                                       "open. None in exports made before it.")

    @property
    def version_ids(self) -> list[str]:
        """Every distinct target version the export was made from, sorted."""
        return sorted(set(self.versions.values()))

    def attach_rows(self, rows: np.ndarray, where: str) -> "ExportIndex":
        """Give each shard its view of the sample table ``rows`` (shard order); refuses a table whose
        length does not add up to the shards' sample counts."""
        counts = [shard.samples for shard in self.shards]
        if len(rows) != sum(counts) or sum(counts) != self.num_samples:
            raise ValueError(f"{where}: {len(rows)} sample rows for {sum(counts)} samples in {len(counts)} shards "
                             f"(index.json records num_samples {self.num_samples})")
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        for shard, start, stop in zip(self.shards, starts, starts[1:]):
            shard._rows = rows[start:stop]
        return self

    def sample_rows(self) -> np.ndarray:
        """The whole sample table (a copy: the shards hold views of it)."""
        return np.concatenate([shard.rows for shard in self.shards]) if self.shards else np.zeros(0, SAMPLE_ROW)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# tar encoding ----------------------------------------------------------------------------------
def tar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular, read-only file with fixed owner and mtime (byte-reproducible)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o444, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    try:
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    except ValueError as err:
        raise ValueError(f"tar member {name!r}: {err}") from None


def tar_padding(size: int) -> bytes:
    return bytes(-size % TAR_BLOCK)


def tar_trailer_size(data_end: int) -> int:
    """Bytes of the end-of-archive blocks after ``data_end`` bytes of members, padded to a whole record."""
    return 2 * TAR_BLOCK + -(data_end + 2 * TAR_BLOCK) % TAR_RECORD


class ShardTarWriter:
    """Streams samples into one tar under a temporary name; ``publish`` fsyncs and renames it into place.

    The temporary's name records the writer (storage.fs.temp_name): the next claimer of the shard, or
    the export's completion, removes it when its writer died. ``expected_samples`` (the planned
    samples of the shard) lets a full disk report what the whole shard needs.
    """

    def __init__(self, root: Root, export_id: str, index: int, expected_samples: int = 0):
        self.root, self.index, self.name = root, index, shard_name(index)
        self.dir = layout.export_dir(export_id)
        self.tmp_rel = f"{self.dir}/{temp_name(self.name)}"
        self.expected_samples, self.sample_bytes = expected_samples, 0
        root.makedirs(self.dir)
        self.handle = root.open(self.tmp_rel, "wb")
        self.digest, self.position = hashlib.sha256(), 0
        self.clips: list[int] = []
        self.offsets: list[int] = []
        self.sample_sha256: list[str] = []
        self.sample_xxh3: list[str] = []

    def _write(self, data: bytes | memoryview, sample_digests: Sequence[Any]) -> None:
        try:
            self.handle.write(data)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                self._raise_disk_full(len(data))
            raise
        self.digest.update(data)
        for digest in sample_digests:
            digest.update(data)
        self.position += len(data)

    def _raise_disk_full(self, pending: int) -> None:
        """DiskFullError naming the shard, the bytes the whole shard needs (its planned samples at the
        size of the one being written) and the bytes free once this temporary is gone."""
        path = self.root.url_of(self.dir, self.name)
        data = self.expected_samples * self.sample_bytes
        needed = max(data + tar_trailer_size(data), self.position + pending)
        self.abort()
        free = free_bytes(self.root.path(self.tmp_rel)) if self.root.is_local else None
        raise DiskFullError(path, needed, free) from None

    def add_sample(self, clip_index: int, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample: every member's header, payload and padding, contiguously."""
        sample_digests = (hashlib.sha256(), fast_digest())
        self.sample_bytes = tar_sample_bytes(members)
        self.clips.append(clip_index)
        self.offsets.append(self.position)
        for name, payload in members:
            self._write(tar_header(name, len(payload)), sample_digests)
            self._write(payload, sample_digests)
            self._write(tar_padding(len(payload)), sample_digests)
        self.sample_sha256.append(sample_digests[0].hexdigest())
        self.sample_xxh3.append(sample_digests[1].hexdigest())

    def publish(self) -> ExportShard:
        """Write the end-of-archive blocks, fsync, close, rename to the final name; returns the record."""
        confirm_reads_unchanged()  # the inputs this thread read are still the bytes their checks saw
        data_end = self.position
        trailer = bytes(tar_trailer_size(self.position))
        self._write(trailer, ())
        try:
            if self.root.is_local:
                self.handle.flush()  # buffered writes reach the device here (and may find it full)
                os.fsync(self.handle.fileno())
            self.handle.close()
        except OSError as err:
            if err.errno == errno.ENOSPC:
                self._raise_disk_full(0)
            raise
        self.root.rename(self.tmp_rel, f"{self.dir}/{self.name}")
        if self.root.is_local:
            fsync_dir(self.root.path(self.dir))
        return ExportShard(name=self.name, samples=len(self.clips), bytes=self.position,
                           sha256=self.digest.hexdigest(), clips=self.clips, offsets=self.offsets,
                           data_end=data_end, sample_sha256=self.sample_sha256, sample_xxh3=self.sample_xxh3)

    def abort(self) -> None:
        """Drop the temporary file (a failed shard leaves nothing visible)."""
        with contextlib.suppress(OSError):
            if not self.handle.closed:
                self.handle.close()  # a full disk can fail the close's flush too: the file goes anyway
        self.root.rm(self.tmp_rel)  # a no-op once gone (a full disk's report removed it first)


# tar decoding ----------------------------------------------------------------------------------
def parse_members(data: bytearray | memoryview, where: str) -> list[tuple[str, memoryview]]:
    """(name, payload view) of every member in a buffer holding whole tar members; no copies.

    Only regular files are accepted: links, devices, directories and GNU/pax extensions are refused,
    and nothing is ever extracted to a path.
    """
    view = memoryview(data).cast("B")
    members, position = [], 0
    while position < len(view):
        header = bytes(view[position:position + TAR_BLOCK])
        if len(header) < TAR_BLOCK or header == ZERO_BLOCK:
            raise ValueError(f"{where}: truncated tar data or end-of-archive inside a sample at byte {position}")
        name, size = parse_ustar_header(header, f"{where}, byte {position}")
        start = position + TAR_BLOCK
        if start + size > len(view):
            raise ValueError(f"{where}: tar member {name!r} runs past the end of its sample")
        members.append((name, view[start:start + size]))
        position = start + size + (-size % TAR_BLOCK)
    return members


def parse_ustar_header(header: bytes, where: str) -> tuple[str, int]:
    """(name, size) of a regular-file ustar/v7 header, checksum verified (tarfile's full parser is
    ~10x slower and this runs for every member); anything but a regular file is refused."""
    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not stored or sum(header[:148]) + 8 * 32 + sum(header[156:]) != int(stored, 8):
        raise ValueError(f"{where}: corrupt tar header (checksum mismatch)")
    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    if prefix:
        name = prefix.decode("utf-8") + "/" + name
    if header[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise ValueError(f"{where}: tar member {name!r} is not a regular file; refusing it")
    size_field = header[124:136]
    if size_field[0] & 0x80:
        raise ValueError(f"{where}: tar member {name!r} uses a base-256 size (not written by foresight)")
    return name, int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)


# the store -------------------------------------------------------------------------------------
class ExportStore:
    """All exports under ``<root>/exports/``."""

    def __init__(self, root: Root | str | None):
        self.root = open_root(root)

    def ids(self) -> list[str]:
        """Ids of complete exports (those with an index.json)."""
        return [n for n in self.root.ls(layout.EXPORTS) if layout.is_safe_id(n) and self.exists(n)]

    def exists(self, export_id: str) -> bool:
        return self.root.file_exists(layout.export_file(export_id, layout.EXPORT_INDEX))

    def url(self, export_id: str, name: str = "") -> str:
        """URL of the export folder or of one file in it (what stock webdataset opens)."""
        return self.root.url_of(layout.export_dir(export_id), name)

    def index(self, export_id: str) -> ExportIndex:
        """index.json of a complete export, format-checked and validated, with its sample table (read
        and checked against index.json's sha256; from index.json itself in exports made before it)."""
        rel = layout.export_file(export_id, layout.EXPORT_INDEX)
        if not self.root.file_exists(rel):
            raise ValueError(f"export '{export_id}': no {layout.EXPORT_INDEX} under {self.root.url} "
                             "(not exported, or still building)")
        where = self.root.url_of(rel)
        data = self.root.read_json(rel)
        legacy_rows = legacy_sample_rows(data, where)
        index = validate_stored(ExportIndex, data, where)
        proven = index.recipe.export_id()
        if index.export_id != export_id or proven != export_id:
            raise ValueError(f"{where}: export '{export_id}' does not match its stored recipe (the recipe hashes "
                             f"to '{proven}', index.json says '{index.export_id}'); index.json was edited or "
                             "belongs to another export")
        check_content_digest(data, where)
        if legacy_rows is not None:
            return index.attach_rows(legacy_rows, where)
        if index.sample_table is None:
            raise ValueError(f"{where}: names no sample table and its shards list no samples")
        table_rel = layout.export_file(export_id, index.sample_table.name)
        table_where = self.root.url_of(table_rel)
        try:
            data = self.root.read_bytes(table_rel)
        except FileNotFoundError:
            raise ValueError(f"{table_where}: sample table is missing (index.json names it)") from None
        return index.attach_rows(parse_sample_table(data, index.sample_table, table_where), table_where)

    # building ----------------------------------------------------------------------------------
    def begin(self, build: ExportBuild) -> None:
        """Record the build plan of a new export (or keep the one of an interrupted build)."""
        if self.exists(build.export_id):
            raise ValueError(f"export '{build.export_id}' is complete and immutable")
        rel = layout.export_file(build.export_id, layout.EXPORT_BUILD)
        if self.root.file_exists(rel) and self.build_info(build.export_id) != build:
            raise ValueError(f"export '{build.export_id}': an interrupted build with another shard plan "
                             f"exists ({self.root.url_of(rel)}); delete the folder to start over")
        self.root.write_json_atomic(rel, build.model_dump(mode="json"))

    def build_info(self, export_id: str) -> ExportBuild:
        rel = layout.export_file(export_id, layout.EXPORT_BUILD)
        if not self.root.file_exists(rel):
            raise ValueError(f"export '{export_id}': no build in progress under {self.root.url}")
        return validate(ExportBuild, self.root.read_json(rel), self.root.url_of(rel))

    def shard_plan(self, export_id: str) -> tuple[ExportRecipe, ShardClipTable]:
        """The recipe and shard plan of a building export, parsed once per process (see
        :class:`_BuildPlans`): every shard task reopens the export, and _build.json lists every
        clip (~0.4 s to parse at 10^6 clips, ~1,600 tasks of 16 MB tars)."""
        rel = layout.export_file(export_id, layout.EXPORT_BUILD)
        try:
            size = self.root.size(rel)
        except FileNotFoundError:
            raise ValueError(f"export '{export_id}': no build in progress under {self.root.url}") from None
        return _BUILD_PLANS.get(self, export_id, size)

    def shard_writer(self, export_id: str, index: int, expected_samples: int = 0) -> ShardTarWriter:
        return ShardTarWriter(self.root, export_id, index, expected_samples)

    def remove_stale_temporaries(self, export_id: str, index: int) -> list[str]:
        """Delete the tar temporaries of shard ``index`` (call while holding its claim: any writer of
        them is dead, or lost the claim)."""
        name, folder, removed = shard_name(index), layout.export_dir(export_id), []
        for found in self.root.ls(folder):
            # Writer-tagged names end with the shard's name; older ones were .tmp-<shard name>-<random>.
            if found.startswith(TMP_PREFIX) and (found.endswith(f"-{name}") or found.startswith(f"{TMP_PREFIX}{name}-")):
                with contextlib.suppress(FileNotFoundError):
                    self.root.fs.rm(self.root.path(folder, found))
                    removed.append(found)
        return removed

    def record_shard(self, export_id: str, index: int, shard: ExportShard) -> None:
        """Mark a renamed shard finished (after the rename, so a marker implies a complete tar)."""
        self.root.write_json_atomic(layout.export_done(export_id, index), shard.model_dump(mode="json"))

    def done_shard(self, export_id: str, index: int) -> ExportShard | None:
        rel = layout.export_done(export_id, index)
        return validate(ExportShard, self.root.read_json(rel), self.root.url_of(rel)) if self.root.file_exists(rel) else None

    def pending_shards(self, export_id: str, shard_count: int | None = None) -> list[int]:
        """Planned shards without a ``_done`` record, from one listing of ``_done/``; ``shard_count``
        (the build plan's, when the caller holds it) spares reading the plan (every clip) again."""
        if shard_count is None:
            shard_count = len(self.build_info(export_id).shard_clips)
        done = set(self.root.ls(layout.export_dir(export_id), layout.DONE_DIR))
        return [i for i in range(shard_count) if f"{i}.json" not in done]

    def finalize(self, export_id: str, timings: dict[str, float] | None = None,
                 verified_inputs: bool = True) -> ExportIndex:
        """Write index.json (last) once every shard is done; the build files are removed after it.

        Safe to race: a concurrent builder that finalized first makes this call return its index.
        """
        if self.exists(export_id):
            return self.index(export_id)
        try:
            index = self._final_index(export_id, timings, verified_inputs)
        except (FileNotFoundError, ValueError):
            if self.exists(export_id):  # another builder finished (and removed the build files) meanwhile
                return self.index(export_id)
            raise
        folder = layout.export_dir(export_id)
        data = index.model_dump(mode="json")
        index.content_sha256 = data["content_sha256"] = content_digest(data)
        self.root.write_json_atomic(layout.export_file(export_id, layout.EXPORT_INDEX), data)
        for leftover in (layout.DONE_DIR, layout.EXPORT_BUILD, layout.CLAIMS_DIR):
            with contextlib.suppress(FileNotFoundError, OSError):  # a concurrent finalizer removes them too
                self.root.rm(folder, leftover)
        remove_temporaries(self.root, folder, only_dead=True)
        log.info("export %s complete: %d samples, %d shards, %.1f MB", export_id, index.num_samples,
                 len(index.shards), index.total_bytes / 1e6)
        return index

    def _final_index(self, export_id: str, timings: dict[str, float] | None, verified_inputs: bool) -> ExportIndex:
        """The index of a build whose shards are all done; writes the sample table (before index.json)."""
        build = self.build_info(export_id)
        pending = self.pending_shards(export_id, len(build.shard_clips))
        if pending:
            raise ValueError(f"export '{export_id}': shards {pending} are not written yet")
        entries, rows = self._shard_records(export_id, build)
        table = sample_table_bytes(rows)
        record = SampleTableFile(name=layout.EXPORT_SAMPLES, rows=len(rows), bytes=len(table),
                                 sha256=hashlib.sha256(table).hexdigest(), row_dtype=str(SAMPLE_ROW.descr))
        self.root.write_bytes_atomic(layout.export_file(export_id, layout.EXPORT_SAMPLES), table)
        index = ExportIndex(
            export_id=export_id, recipe=build.recipe, plan_id=build.recipe.plan_id, dataset=build.dataset,
            versions={f: spec.version for f, spec in build.fields.items() if spec.version},
            fields=build.fields, num_samples=len(rows), total_bytes=sum(s.bytes for s in entries),
            shards=entries, sample_table=record, stats=build.stats, created=now_iso(),
            git_commit=git_commit(), host=host(), packages=package_versions(), timings=timings or {},
            verified_inputs=verified_inputs, null_versions=null_made(self.root, build.fields))
        return index.attach_rows(rows, self.root.url_of(layout.export_file(export_id, layout.EXPORT_SAMPLES)))

    def _shard_records(self, export_id: str, build: ExportBuild) -> tuple[list[ShardEntry], np.ndarray]:
        """Every shard's index entry and the sample table, from the ``_done`` records (each record's
        per-sample lists are dropped as soon as its rows are taken)."""
        entries, parts = [], []
        for i, planned in enumerate(build.shard_clips):
            shard = self.done_shard(export_id, i)
            if shard is None:
                raise FileNotFoundError(f"export '{export_id}': a shard record vanished while finalizing")
            if shard.clips != planned or self.root.size(layout.export_file(export_id, shard.name)) != shard.bytes:
                raise ValueError(f"export '{export_id}', {shard.name}: stored shard does not match its plan")
            parts.append(shard.sample_rows(self.root.url_of(layout.export_done(export_id, i))))
            entries.append(shard.entry())
        return entries, np.concatenate(parts) if parts else np.zeros(0, SAMPLE_ROW)

    def delete(self, export_id: str) -> None:
        self.root.rm(layout.export_dir(export_id))

    # reading -----------------------------------------------------------------------------------
    def open_shard(self, export_id: str, name: str):
        """A binary file object over one shard (any fsspec filesystem)."""
        return self.root.open(layout.export_file(export_id, name), "rb")

    def read_samples(self, index: ExportIndex, shard_position: int, first: int, stop: int,
                     verify: bool | None = None,
                     pool: "BufferPool | None" = None,
                     mmap: bool = True,
                     lookahead: int = 0) -> Iterator[tuple[int, list[tuple[str, memoryview]]]]:
        """(clip, members) of samples ``first`` .. ``stop - 1`` of one shard, read sequentially
        (``read_pieces`` of that one piece; no look-ahead thread unless ``lookahead`` asks for one)."""
        return self.read_pieces(index, [(shard_position, first, stop)], verify, pool, mmap, lookahead)

    def read_pieces(self, index: ExportIndex, pieces: Sequence[tuple[int, int, int]],
                    verify: bool | None = None,
                    pool: "BufferPool | None" = None,
                    mmap: bool = True,
                    lookahead: int = LOOKAHEAD) -> Iterator[tuple[int, list[tuple[str, memoryview]]]]:
        """(clip, members) of the samples of ``pieces`` ((shard position, first, stop) each), in order.

        On a local root each shard is memory-mapped (copy-on-write) and payloads are views of the page
        cache: no copy at all. Elsewhere (or with ``mmap=False``) each sample is read into one buffer
        (from ``pool`` when given). With ``verify`` (default: on unless ``--no-verify``) each sample's
        bytes are checked against index.json (xxh3, else sha256) before they are parsed, so a tampered
        sample is never returned. With ``lookahead`` > 0 up to that many samples are read ahead of
        the consumer, across shard boundaries, and helper threads (one per free core, at most 3) check
        and parse them (storage/lookahead.py: the hashes of the next samples overlap the consumer's pass
        over this one; a sample no helper has reached yet is checked by the consumer's thread); samples
        this process already checked (see _VerifiedSamples) start no thread.
        """
        verify = verify_by_default() if verify is None else verify
        for shard_position, first, stop in pieces:
            shard = index.shards[shard_position]
            if not 0 <= first <= stop <= shard.samples:
                raise ValueError(f"export '{index.export_id}', {shard.name}: samples [{first}, {stop}) out of "
                                 f"range (has {shard.samples})")
        return self._parsed(index, self._raw_samples(index, pieces, pool, mmap), verify, lookahead)

    def _parsed(self, index: ExportIndex, raw: Iterator["_RawSample"], verify: bool,
                lookahead: int) -> Iterator[tuple[int, list[tuple[str, memoryview]]]]:
        if verify and lookahead > 0:
            # check, then parse, in background threads ahead of the consumer
            samples = prepared_lazily(raw, _RawSample.unchecked, _RawSample.checked_members, lookahead,
                                      name=f"verify-{index.export_id}", helpers=helper_threads(lookahead))
        else:
            samples = (sample.checked_members() if verify else sample.members() for sample in raw)
        try:
            yield from samples
        finally:
            samples.close()

    def _raw_samples(self, index: ExportIndex, pieces: Sequence[tuple[int, int, int]],
                     pool: "BufferPool | None", mmap: bool) -> Iterator["_RawSample"]:
        """Unchecked bytes of each sample of ``pieces``, one open shard at a time."""
        for shard_position, first, stop in pieces:
            if first == stop:
                continue
            shard = index.shards[shard_position]
            read = self._mapped_reader(index, shard) if mmap and self.root.is_local else \
                self._buffered_reader(index, shard, first, pool)
            url = self.root.url_of(layout.export_file(index.export_id, shard.name))
            try:
                for position in range(first, stop):
                    yield _RawSample(index.export_id, shard, position, read(position), read.identity, url)
            finally:
                read.close()

    def read_sample(self, index: ExportIndex, shard_position: int, position: int, verify: bool | None = None,
                    pool: "BufferPool | None" = None) -> tuple[int, list[tuple[str, memoryview]]]:
        """Random access to one sample by its position in a shard."""
        return next(self.read_samples(index, shard_position, position, position + 1, verify, pool=pool))

    def accept_mapped_views(self, index: ExportIndex) -> None:
        """Let this process map views of the export's shard files that a DataLoader worker describes
        (storage/mapped.py); nothing to do on a remote root, whose samples are never memory-mapped."""
        if self.root.is_local:
            allow_files({self.root.path(layout.export_dir(index.export_id), shard.name):
                         (shard.bytes, f"export '{index.export_id}', {shard.name}") for shard in index.shards})

    def _mapped_reader(self, index: ExportIndex, shard: ShardEntry) -> "_SampleReader":
        path = self.root.path(layout.export_dir(index.export_id), shard.name)
        mapped = map_file(path)  # copy-on-write: arrays are writable, and can cross to other processes
        if len(mapped) < shard.data_end:
            raise ValueError(f"export '{index.export_id}', {shard.name}: shard is truncated "
                             f"({len(mapped)} of {shard.bytes} bytes)")
        return _SampleReader(lambda position: mapped[slice(*shard.sample_range(position))], lambda: None,
                             identity=(path, mapped.identity))

    def _buffered_reader(self, index: ExportIndex, shard: ShardEntry, first: int,
                         pool: "BufferPool | None") -> "_SampleReader":
        handle = self.open_shard(index.export_id, shard.name)
        handle.seek(shard.sample_range(first)[0])

        def read(position: int) -> np.ndarray:
            start, end = shard.sample_range(position)
            buffer = pool.get(end - start) if pool is not None else np.empty(end - start, dtype=np.uint8)
            got = _read_into(handle, buffer)
            if got != len(buffer):
                raise ValueError(f"export '{index.export_id}', {shard.name}, sample {position}: shard is "
                                 f"truncated ({got} of {len(buffer)} bytes)")
            return buffer

        return _SampleReader(read, handle.close)

    def verify(self, export_id: str) -> list[str]:
        """Re-hash every shard against index.json; one message per missing or corrupt shard ([] = intact)."""
        index = self.index(export_id)
        problems = []
        for shard in index.shards:
            rel = layout.export_file(export_id, shard.name)
            if not self.root.file_exists(rel):
                problems.append(f"export '{export_id}': {shard.name} is missing ({self.root.url_of(rel)})")
            elif self.root.sha256(rel) != shard.sha256:
                problems.append(f"export '{export_id}': {shard.name} is corrupt (sha256 mismatch, "
                                f"{self.root.url_of(rel)})")
        return problems


class _VerifiedSamples:
    """Samples of memory-mapped shard files whose bytes this process already checked, keyed by the
    file's identity (device, inode, size, mtime, ctime): a later epoch over the same unmodified file reads
    the same page-cache bytes, so the check is not repeated; a rewritten or replaced file has
    another identity and is checked again. Each new process (a training run, a DataLoader worker)
    checks every sample once. Buffered (remote) reads are checked every time."""

    LIMIT = 1 << 20

    def __init__(self) -> None:
        self._seen: set[tuple[Any, int]] = set()

    def seen(self, identity: Any, position: int) -> bool:
        return identity is not None and (identity, position) in self._seen

    def add(self, identity: Any, position: int) -> None:
        if identity is None:
            return
        if len(self._seen) >= self.LIMIT:
            self._seen.clear()
        self._seen.add((identity, position))


_VERIFIED = _VerifiedSamples()


@dataclass(frozen=True)
class _RawSample:
    """The bytes of one sample as read from its shard, not yet checked."""

    export_id: str
    shard: ShardEntry
    position: int
    buffer: np.ndarray
    identity: Any  # of the memory-mapped file (None for buffered reads, which are checked every time)
    url: str

    @property
    def clip(self) -> int:
        return self.shard.clip(self.position)

    @property
    def where(self) -> str:
        return f"export '{self.export_id}', {self.shard.name}, sample {self.position} (clip {self.clip})"

    def unchecked(self) -> bool:
        """Whether this process has not checked these exact bytes yet."""
        return not _VERIFIED.seen(self.identity, self.position)

    def check(self) -> None:
        """Refuse bytes that do not hash to index.json's record (one line: export, shard, sample, URL)."""
        if not self.unchecked():
            return
        if not self.shard.intact(self.position, self.buffer):
            raise ValueError(f"{self.where}: checksum mismatch, the shard was modified or corrupted ({self.url})")
        _VERIFIED.add(self.identity, self.position)

    def members(self) -> tuple[int, list[tuple[str, memoryview]]]:
        """(clip, members) parsed from the bytes, unchecked (``--no-verify``)."""
        return self.clip, parse_members(self.buffer, self.where)

    def checked_members(self) -> tuple[int, list[tuple[str, memoryview]]]:
        """(clip, members) parsed from the bytes once they are checked."""
        self.check()
        return self.members()


class BufferPool:
    """Read buffers that are reused once nothing references them any more.

    A sample's arrays are views of its buffer; fresh large allocations cost page faults that take as
    long as the read itself, so a buffer goes back into use as soon as the trainer (or the collate
    function's copy) has dropped every array of its sample. Reference counts tell when that is.
    """

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.buffers: list[np.ndarray] = []

    def get(self, size: int) -> np.ndarray:
        """A writable uint8 array of ``size`` bytes (a view of a pooled buffer when one is free)."""
        for number in range(len(self.buffers)):
            # References when free: the list, getrefcount's argument, nothing else.
            if self.buffers[number].size >= size and sys.getrefcount(self.buffers[number]) == 2:
                return self.buffers[number][:size]
        fresh = np.empty(size, dtype=np.uint8)
        if len(self.buffers) < self.capacity:
            self.buffers.append(fresh)
        return fresh[:size]


class _SampleReader:
    """Bytes of one sample by position (sequential positions for the buffered reader); ``identity``
    names the exact file a memory map was made from (None for buffered reads)."""

    def __init__(self, read: Any, close: Any, identity: Any = None):
        self._read, self.close, self.identity = read, close, identity

    def __call__(self, position: int) -> np.ndarray:
        return self._read(position)


def _read_into(handle: Any, buffer: np.ndarray | bytearray) -> int:
    """Fill ``buffer`` from ``handle``; returns the bytes read (short only at end of file)."""
    view, total = memoryview(buffer), 0
    while total < len(buffer):
        chunk = handle.readinto(view[total:]) if hasattr(handle, "readinto") else None
        if chunk is None:
            data = handle.read(len(buffer) - total)
            view[total:total + len(data)] = data
            chunk = len(data)
        if not chunk:
            break
        total += chunk
    return total


# sources: which field comes from which version ------------------------------------------------
def parse_target_arg(text: str) -> tuple[str | None, str]:
    """'version' or 'alias=version' -> (alias, version)."""
    alias, _, version = text.strip().rpartition("=")
    return (alias.strip() or None), layout.check_id("target version", version.strip())


def complete_manifest(targets: TargetStore, version_id: str) -> TargetVersion:
    """Manifest of a complete version; ValueError naming the version otherwise."""
    status = targets.status(version_id)
    if status != "complete":
        state = "not found" if status is None else f"still '{status}'"
        raise ValueError(f"target version '{version_id}': {state} under {targets.root.url}; "
                         "only complete versions can be read for training")
    return targets.manifest(version_id)


def plan_of(graph: VersionGraph, manifest: TargetVersion) -> str:
    """The plan a version was computed over, following its inputs upstream (teacher -> video -> plan)."""
    found = graph.plan_of(manifest.id)
    if found is None:
        raise ValueError(f"target version '{manifest.id}': its inputs {manifest.recipe.input_ids()} name no plan")
    return found


def check_no_mixing(manifests: dict[str, TargetVersion], graph: VersionGraph) -> None:
    """Refuse pinned versions computed from a different upstream version than one also pinned
    (e.g. teacher maps of video A read beside the one-step features of video B)."""
    pinned_by_kind: dict[str, set[str]] = {}
    for manifest in manifests.values():
        pinned_by_kind.setdefault(manifest.kind, set()).add(manifest.id)
    for manifest in manifests.values():
        for name, ref in graph.inputs(manifest.id):
            upstream_kind = graph.stored_kind(ref.id) if ref.kind == "version" else None
            if upstream_kind is None:
                continue
            upstream = ref.id
            others = pinned_by_kind.get(upstream_kind, set()) - {upstream}
            if others:
                raise ValueError(f"target version '{manifest.id}' was computed from {name} '{upstream}', but "
                                 f"{sorted(others)} is pinned too; refusing to mix versions")


def null_source(targets: TargetStore, manifest: TargetVersion) -> str | None:
    """The id of the ``null``-model version that ``manifest`` is or was computed from (following
    its inputs upstream), None when none was."""
    if manifest.recipe.model is not None and manifest.recipe.model.is_null:
        return manifest.id
    for ref in manifest.recipe.inputs_of("version"):
        if targets.status(ref.id) is not None:
            found = null_source(targets, targets.manifest(ref.id))
            if found is not None:
                return found
    return None


def check_not_null(targets: TargetStore, manifest: TargetVersion, allow_null: bool) -> None:
    """Refuse a version made by (or from the output of) the null model unless ``allow_null``."""
    found = None if allow_null else null_source(targets, manifest)
    if found is not None:
        via = "" if found == manifest.id else f" (computed from '{found}')"
        raise ValueError(f"target version '{manifest.id}'{via}: made by the null model, a simulation, not targets; "
                         "pass --allow-null (allow_null=True) to read it anyway")


def null_made(root: Root, fields: dict[str, "ExportField"]) -> list[str]:
    """Sorted ids of the export's target versions that are or come from null-model versions."""
    targets = TargetStore(root)
    versions = sorted({spec.version for spec in fields.values() if spec.version})
    return [v for v in versions if targets.status(v) is not None and null_source(targets, targets.manifest(v))]


def resolve_sources(root: Root | str, plan_id: str, targets_args: Sequence[str], fields: Sequence[str] | None,
                    action_column: str = "action", state_column: str = "state",
                    allow_null: bool = False) -> dict[str, FieldSource]:
    """Field -> source (an array of a pinned version, or an episode column) for an export or ZarrClips;
    versions made by the null model are refused unless ``allow_null``."""
    targets = TargetStore(root)
    graph, plan = VersionGraph(targets), PlanStore(root).info(plan_id)
    manifests, sources = {}, {}
    for alias, version in map(parse_target_arg, targets_args):
        manifest = complete_manifest(targets, version)
        check_not_null(targets, manifest, allow_null)
        found = plan_of(graph, manifest)
        if found != plan_id or manifest.num_clips != plan.num_clips:
            raise ValueError(f"target version '{version}' was computed over plan '{found}' "
                             f"({manifest.num_clips} clips), not plan '{plan_id}' ({plan.num_clips} clips)")
        manifests[version] = manifest
        names = target_field_names(manifest.kind, manifest.recipe.stage, [a.name for a in manifest.arrays], alias)
        for array, field in names.items():
            source = FieldSource.target(version, array)
            if field in sources:
                raise ValueError(f"field '{field}' comes from both {sources[field]} and {source}; "
                                 "give one of them an alias (name=version)")
            sources[field] = source
    check_no_mixing(manifests, graph)
    sources.update(_episode_sources(EpisodeStore(root, plan.dataset), action_column, state_column))
    return _select(sources, fields)


def _episode_sources(episodes: EpisodeStore, action_column: str, state_column: str) -> dict[str, FieldSource]:
    features = episodes.info().features
    sources = {}
    if action_column in features:
        sources["actions"] = FieldSource.episode(action_column)
        sources["actions_mask"] = FieldSource.episode(action_column, mask=True)
    if state_column in features:
        sources["state"] = FieldSource.episode(state_column)
    return sources


def _select(sources: dict[str, FieldSource], fields: Sequence[str] | None) -> dict[str, FieldSource]:
    if fields is None:
        return sources
    wanted = list(fields) + (["actions_mask"] if "actions" in fields and "actions_mask" not in fields else [])
    unknown = [f for f in wanted if f not in sources]
    if unknown:
        raise ValueError(f"fields {unknown} are not available (available: {sorted(sources)})")
    return {f: sources[f] for f in wanted}


def contiguous_runs(clips: Sequence[int], block: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive values, in order: [3, 4, 5, 9] -> [(3, 6), (9, 10)]; with
    ``block``, a run also ends at each multiple of it (one run per target shard)."""
    runs: list[tuple[int, int]] = []
    for clip in clips:
        if runs and runs[-1][1] == clip and (block is None or clip % block):
            runs[-1] = (runs[-1][0], clip + 1)
        else:
            runs.append((clip, clip + 1))
    return runs


class ClipSource:
    """Arrays and metadata of the clips of one plan, from pinned target versions and the episode store.

    What the export stage writes into shards and what ZarrClips serves by random access.
    """

    def __init__(self, root: Root | str, plan_id: str, sources: dict[str, FieldSource], action_chunk_len: int,
                 verify: bool | None = None):
        self.root = open_root(root)
        self.plan_id, self.sources, self.action_chunk_len = plan_id, dict(sources), action_chunk_len
        self.rows: ClipRows = PlanStore(self.root).rows(plan_id)
        targets = TargetStore(self.root)
        self.readers: dict[str, TargetReader] = {}
        for source in self.target_sources().values():
            if source.version not in self.readers:
                self.readers[source.version] = TargetReader(targets, complete_manifest(targets, source.version),
                                                            verify)
        self._episodes: dict[str, EpisodeStore] = {}
        self._columns: dict[tuple[str, str, str], np.ndarray] = {}
        self._splits: dict[tuple[str, str], str] = {}

    def target_sources(self) -> dict[str, FieldSource]:
        return {f: s for f, s in self.sources.items() if not s.is_episode}

    def forget_reads(self) -> None:
        """Drop the shard bytes and episode columns kept for the next clips (a source kept from one
        task to the next reads and verifies them again)."""
        for reader in self.readers.values():
            reader.forget_objects()
        self._columns.clear()

    @property
    def versions(self) -> dict[str, str]:
        """Field -> target version id."""
        return {f: s.version for f, s in self.target_sources().items()}

    def _store(self, dataset: str) -> EpisodeStore:
        if dataset not in self._episodes:
            self._episodes[dataset] = EpisodeStore(self.root, dataset)
        return self._episodes[dataset]

    def split(self, clip: int) -> str:
        row = self.rows[clip]
        key = (row.dataset, row.episode_id)
        if key not in self._splits:
            self._splits[key] = self._store(row.dataset).record(row.episode_id).split
        return self._splits[key]

    def column(self, dataset: str, episode_id: str, column: str) -> np.ndarray:
        """A (T, ...) low-dim column of one episode (cached: clips of an episode share it)."""
        key = (dataset, episode_id, column)
        if key not in self._columns:
            if len(self._columns) > 256:
                self._columns.clear()
            self._columns[key] = self._store(dataset).read_column(episode_id, column)
        return self._columns[key]

    def meta(self, clip: int, export_id: str | None) -> dict[str, Any]:
        """The sample's "meta" dict (see trainers/data.py)."""
        row = self.rows[clip]
        return {**row.model_dump(), "clip_index": clip, "split": self.split(clip), "plan_id": self.plan_id,
                "export_id": export_id, "versions": self.versions}

    def read(self, clips: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Field arrays of each clip in ``clips`` (target arrays read in one selection per array)."""
        samples: list[dict[str, np.ndarray]] = [{} for _ in clips]
        targets = self.target_sources()
        # Slices of consecutive clips within one shard: a local uncompressed shard hands them out as
        # views of its mapped object, no copy (and zarr's slices beat its index lists ~20x).
        runs = {field: contiguous_runs(clips, self.readers[source.version].manifest.shard_size)
                for field, source in targets.items()}
        for field, source in targets.items():  # every shard of every array these clips touch, checked at once, ahead
            for begin, _ in runs[field]:
                self.readers[source.version].check_ahead(source.name, begin)
        for field, source in targets.items():
            reader = self.readers[source.version]
            values = [row for begin, end in runs[field] for row in reader.read(source.name, slice(begin, end))]
            for sample, value in zip(samples, values, strict=True):
                sample[field] = np.asarray(value)
        for sample, clip in zip(samples, clips, strict=True):
            sample.update(self._episode_fields(clip))
        return samples

    def _episode_fields(self, clip: int) -> dict[str, np.ndarray]:
        row, fields = self.rows[clip], {}
        for field, source in self.sources.items():
            if not source.is_episode or field == "actions_mask":
                continue
            values = self.column(row.dataset, row.episode_id, source.name)
            if field == "actions":
                fields["actions"], mask = action_chunk(values, row.start, self.action_chunk_len)
                if "actions_mask" in self.sources:
                    fields["actions_mask"] = mask
            else:
                fields[field] = values[row.start].astype(np.float32)
        return fields

    def field_specs(self, codec: str, raw_fields: Sequence[str]) -> dict[str, ExportField]:
        """ExportField of every field (decoded dtype and per-sample shape)."""
        specs = {}
        for field, source in self.sources.items():
            if source.is_episode:
                specs[field] = self._episode_spec(field, source)
                continue
            spec = self.readers[source.version].manifest.array_spec(source.name)
            field_codec = "raw" if field in raw_fields or np.dtype(spec.dtype).kind != "f" else codec
            specs[field] = ExportField(source=source, version=source.version, codec=field_codec,
                                       dtype=decoded_dtype(spec.dtype, field_codec), shape=spec.shape[1:])
        return specs

    def _episode_spec(self, field: str, source: FieldSource) -> ExportField:
        row = self.rows[0]
        width = int(np.prod(self.column(row.dataset, row.episode_id, source.name).shape[1:]))
        shape = {"actions": [self.action_chunk_len, width], "actions_mask": [self.action_chunk_len]}.get(field, [width])
        dtype = "bool" if field == "actions_mask" else "float32"
        return ExportField(source=source, version=None, codec="raw", dtype=dtype, shape=shape)

    def episode_stats(self, clips: Sequence[int]) -> dict[str, ColumnStats]:
        """'actions' / 'state' statistics over every frame of the episodes of ``clips``."""
        episodes = sorted({(self.rows[c].dataset, self.rows[c].episode_id) for c in clips})
        stats = {}
        for field in ("actions", "state"):
            if field not in self.sources:
                continue
            column = self.sources[field].name
            blocks = [self.column(dataset, episode, column) for dataset, episode in episodes]
            values = np.concatenate([block.reshape(len(block), -1) for block in blocks])
            stats[field] = ColumnStats(**column_stats(values))
        return stats
