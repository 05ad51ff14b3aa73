"""The target store: content-addressed versions of zarr arrays, written shard by shard."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import mmap
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import zarr

from foresight.schemas.base import validate_stored
from foresight.schemas.refs import Ref
from foresight.schemas.target import ArraySpec, ShardTableFile, TargetRecipe, TargetVersion
from foresight.storage import layout
from foresight.storage.fs import (FAST_HASH, Root, check_content_digest, content_digest, fast_digest,
                                  local_entries_by_folder, object_files_by_folder, open_root, parse_json, read_many,
                                  remove_dead_temporaries_under, remove_temporaries)
from foresight.storage.lookahead import helper_threads
from foresight.storage.mapped import FileIdentity, map_unchanged
from foresight.storage.provenance import git_commit, host, now_iso, package_versions
from foresight.storage.zarr_shards import ShardCodec, shard_codec

if TYPE_CHECKING:  # the teachers engine hands tensors in; the store itself never imports torch
    import torch

log = logging.getLogger(__name__)
ZSTD = zarr.codecs.ZstdCodec(level=3)
COMPRESSORS = {"zstd": ZSTD, "none": None}
"""ArraySpec.compression -> zarr compressor of the stored chunks."""
EMPTY_SHARD = "fill-value-only"
"""Checksum recorded for a shard whose every value is the fill value (zarr writes no object)."""
SCALE_SUFFIX = ".fp8scale"
"""Companion array of an 'fp8' coded array: uint8 E8M0 scale bytes per clip and channel, (N, C)."""
NO_VERIFY_ENV = "FORESIGHT_NO_VERIFY"
"""Set (by ``foresight --no-verify``) to read versions and exports without checking checksums."""
SHARD_SUM = np.dtype([("sha256", "V32"), ("xxh3", "V16"), ("flags", "u1")])
"""One cell of a shard table (one shard's object of one stored part): its sha256 (the audit hash) and
xxh3-128 (what readers check) digests and ``flags`` (RECORDED, FILL_ONLY, HAS_XXH3): 49 bytes."""
RECORDED, FILL_ONLY, HAS_XXH3 = 1, 2, 4
"""SHARD_SUM flags: a checksum is recorded; the shard holds only fill values (no object, EMPTY_SHARD);
an xxh3 is recorded (markers written before xxh3 existed have none: readers then check sha256)."""
MARKER_BATCH = 2048
"""``_done`` markers fetched together at finalize (bounded memory, concurrent GETs on an object store)."""


def _tree_stats(path: str) -> tuple[int, float | None]:
    """(bytes, newest mtime) of the files under a local folder (symlinks not followed; (0, None)
    when absent or empty)."""
    total, newest = 0, None
    for entries in local_entries_by_folder(path):
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                total += stat.st_size
                newest = stat.st_mtime if newest is None or stat.st_mtime > newest else newest
    return total, newest


def _object_tree_stats(root: Root, rel: str) -> tuple[int, float | None]:
    """(bytes, newest mtime) of the objects under a folder of an object store, one subfolder's
    listing at a time ((0, None) when absent or empty)."""
    total, newest = 0, None
    for infos in object_files_by_folder(root, rel):
        for info in infos:
            stamp = file_mtime(info)
            total += int(info.get("size") or 0)
            newest = stamp if newest is None or (stamp is not None and stamp > newest) else newest
    return total, newest


def file_mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) of an fsspec listing entry (local, S3 or GCS keys)."""
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def verify_by_default() -> bool:
    """Whether readers check recorded checksums while reading (True unless ``--no-verify``)."""
    return not os.environ.get(NO_VERIFY_ENV)


def stored_parts(spec: ArraySpec) -> list[ArraySpec]:
    """The zarr arrays that hold ``spec`` as stored (codec 'raw'): the array itself for 'raw'; its
    uint16 bfloat16 bits for 'bf16'; its uint8 e4m3 codes and their (N, C) scale bytes for 'fp8'."""
    if spec.codec == "raw":
        return [spec]
    codes = spec.model_copy(update={"codec": "raw", "dtype": "uint16" if spec.codec == "bf16" else "uint8"})
    if spec.codec == "bf16":
        return [codes]
    scales = spec.model_copy(update={"name": spec.name + SCALE_SUFFIX, "shape": [spec.shape[0], spec.shape[-1]],
                                     "codec": "raw", "dtype": "uint8"})
    return [codes, scales]


def stored_part(manifest: TargetVersion, name: str) -> ArraySpec:
    """The stored zarr array ``name`` of a version (an array's own name or its companion's)."""
    for spec in manifest.arrays:
        for part in stored_parts(spec):
            if part.name == name:
                return part
    raise ValueError(f"target version {manifest.id}: no stored array '{name}' (has "
                     f"{[p.name for a in manifest.arrays for p in stored_parts(a)]})")


def encode_part_tensors(spec: ArraySpec, values: "torch.Tensor",
                        compiled: str | None = None) -> dict[str, "torch.Tensor"]:
    """Stored part name -> tensor (on ``values``' device: the teachers engine encodes on the GPU) for
    rows ``values`` of ``spec`` in ``spec.dtype``; fp8 scales are per clip (row) and channel, as an
    export's are per sample and channel. bf16 bits come as int16 (the bytes of the stored uint16).
    ``compiled``: the torch.compile backend of the fp8 encoding (see ``float_codecs.fp8_encode_blocks``)."""
    if spec.codec == "raw":
        return {spec.name: values}
    from foresight.pipelines import float_codecs  # torch: only writers of coded arrays pay for it

    if spec.codec == "bf16":
        return {spec.name: float_codecs.bf16_bits(values)}
    codes_NRC, scales_NC = float_codecs.fp8_encode_blocks(values.reshape(values.shape[0], -1, values.shape[-1]),
                                                          compiled=compiled)
    return {spec.name: codes_NRC.reshape(values.shape), spec.name + SCALE_SUFFIX: scales_NC}


def encode_parts(spec: ArraySpec, data: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`encode_part_tensors` of host rows, as numpy arrays of the stored dtypes."""
    if spec.codec == "raw":
        return {spec.name: data}
    import torch

    return host_parts(spec, encode_part_tensors(spec, torch.from_numpy(np.ascontiguousarray(data))))


def host_parts(spec: ArraySpec, tensors: dict[str, "torch.Tensor"]) -> dict[str, np.ndarray]:
    """:func:`encode_part_tensors`' tensors (on any device) as host numpy arrays of the stored dtypes
    (bf16 bits come back as uint16)."""
    dtypes = {part.name: np.dtype(part.dtype) for part in stored_parts(spec)}
    return {name: tensor.cpu().numpy().view(dtypes[name]) for name, tensor in tensors.items()}


def check_scales(part: str, data: np.ndarray, where: str) -> None:
    """Refuse fp8 scale bytes 255 (E8M0 NaN): the encoder's mark of NaN, inf or magnitudes above 2**127."""
    if part.endswith(SCALE_SUFFIX) and (np.asarray(data) == 255).any():
        rows = sorted({int(r) for r in np.nonzero(np.asarray(data) == 255)[0]})
        raise ValueError(f"{where}: rows {rows} hold NaN, inf or values above 2**127, which the fp8 codec "
                         "cannot store")


def decode_parts(spec: ArraySpec, parts: dict[str, np.ndarray], where: str) -> np.ndarray:
    """Rows of ``spec`` in ``spec.dtype`` from the rows of its stored parts (the inverse of
    :func:`encode_parts`, within the codec's bound)."""
    if spec.codec == "raw":
        return parts[spec.name]
    from foresight.pipelines import float_codecs

    if spec.codec == "bf16":
        return float_codecs.decode_bf16(parts[spec.name]).astype(spec.dtype, copy=False)
    codes, scales_NC = parts[spec.name], parts[spec.name + SCALE_SUFFIX]
    out = np.empty(codes.shape, dtype=spec.dtype)
    for row in range(codes.shape[0]):
        out[row] = float_codecs.decode_fp8(codes[row], scales_NC[row], spec.dtype, where=f"{where}, row {row}")
    return out


class ShardSums:
    """The checksums recorded for a version's shard objects, as columns: ``cells[shard, column]``
    (SHARD_SUM) with one column per stored part (``parts``). What readers, ``targets verify`` and
    the audit check objects against, whether the manifest holds them as JSON (versions finalized
    before the shard table) or names a shard table."""

    def __init__(self, parts: Sequence[str], cells: np.ndarray):
        self.parts, self.cells = list(parts), cells
        self._column = {part: i for i, part in enumerate(self.parts)}

    @classmethod
    def empty(cls, parts: Sequence[str], shards: int) -> "ShardSums":
        """Nothing recorded yet (a building version)."""
        return cls(parts, np.zeros((shards, len(parts)), SHARD_SUM))

    @classmethod
    def from_dicts(cls, parts: Sequence[str], shards: int, sha256: dict[str, dict[str, str]],
                   xxh3: dict[str, dict[str, str]], where: str) -> "ShardSums":
        """The columns of an older manifest's ``shards`` / ``shard_xxh3`` (shard -> part -> hex)."""
        extra = sorted({name for sums in sha256.values() for name in sums} - set(parts))
        table = cls.empty([*parts, *extra], shards)
        for key, sums in sha256.items():
            if key.isdigit() and int(key) < shards:
                table.record(int(key), sums, xxh3.get(key, {}), where)
        return table

    def record(self, shard: int, sha256: dict[str, str], xxh3: dict[str, str], where: str) -> None:
        """Set one shard's row from its marker's (or an older manifest's) part -> hex digests."""
        row = self.cells[shard]
        for name, digest in sha256.items():
            column = self._column.get(name)
            if column is None:
                raise ValueError(f"{where}: shard {shard} records array '{name}', which the version does not store")
            fast = xxh3.get(name)
            try:
                if digest == EMPTY_SHARD:
                    row[column] = (b"", b"", RECORDED | FILL_ONLY)
                else:
                    row[column] = (bytes.fromhex(digest), bytes.fromhex(fast) if fast else b"",
                                   RECORDED | (HAS_XXH3 if fast else 0))
            except (ValueError, TypeError):
                raise ValueError(f"{where}: shard {shard}, array '{name}': recorded checksum is not hex") from None

    def recorded(self, part: str, shard: int) -> tuple[str, str] | None:
        """(hash name, hex digest or EMPTY_SHARD) readers check one object against: xxh3 when
        recorded, else sha256; None when nothing is recorded (a building version's unfinished shard)."""
        column = self._column.get(part)
        if column is None or not 0 <= shard < len(self.cells):
            return None
        cell = self.cells[shard, column]
        flags = int(cell["flags"])
        if not flags & RECORDED:
            return None
        if flags & FILL_ONLY:
            return (FAST_HASH if flags & HAS_XXH3 else "sha256"), EMPTY_SHARD
        if flags & HAS_XXH3:
            return FAST_HASH, cell["xxh3"].tobytes().hex()
        return "sha256", cell["sha256"].tobytes().hex()

    def shard_sha256(self, shard: int) -> dict[str, str] | None:
        """Part -> sha256 hex (or EMPTY_SHARD) recorded for one shard, None when none is."""
        row = self.cells[shard]
        recorded = row["flags"] & RECORDED
        if not recorded.any():
            return None
        return {part: EMPTY_SHARD if row[i]["flags"] & FILL_ONLY else row[i]["sha256"].tobytes().hex()
                for i, part in enumerate(self.parts) if recorded[i]}

    def by_shard(self, fast: bool = False) -> dict[str, dict[str, str]]:
        """The older manifests' form: shard -> part -> sha256 (``fast``: xxh3, where recorded)."""
        out = {}
        for shard in range(len(self.cells)):
            if fast:
                row = self.cells[shard]
                sums = {part: EMPTY_SHARD if row[i]["flags"] & FILL_ONLY else row[i]["xxh3"].tobytes().hex()
                        for i, part in enumerate(self.parts) if row[i]["flags"] & HAS_XXH3}
            else:
                sums = self.shard_sha256(shard) or {}
            if sums:
                out[str(shard)] = sums
        return out

    def without_xxh3(self) -> "ShardSums":
        """A copy whose readers check sha256 only (what versions made before xxh3 record)."""
        cells = self.cells.copy()
        cells["flags"] &= ~np.uint8(HAS_XXH3)
        return ShardSums(self.parts, cells)


def shard_table_parts(cells: np.ndarray) -> list[bytes | memoryview]:
    """A shard table as the pieces of a .npy file (the bytes ``np.save`` writes; no pickle, readable
    with ``numpy.load(..., allow_pickle=False)``): its header and a view of the cells, so that
    publishing it copies nothing (a BytesIO held the table twice more: ~67 MB at 10^6 clips)."""
    cells = np.ascontiguousarray(cells, SHARD_SUM)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(cells))
    return [header.getvalue(), memoryview(cells.reshape(-1).view(np.uint8))]


def parse_shard_table(data: bytes, record: ShardTableFile, version_id: str, where: str) -> np.ndarray:
    """The cells of a shard table file, refused in one line naming ``where`` and the version unless
    size, sha256, dtype and shape are what the manifest records."""
    if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"{where}: shard table of target version '{version_id}' does not match its manifest "
                         f"({len(data)} bytes, the manifest records {record.bytes} bytes and its sha256); the "
                         "file was modified, truncated or replaced")
    try:
        cells = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{where}: shard table of target version '{version_id}' is not a readable .npy "
                         f"({err})") from None
    if cells.dtype != SHARD_SUM or cells.shape != (record.rows, len(record.parts)):
        raise ValueError(f"{where}: shard table of target version '{version_id}' holds {cells.shape} cells of "
                         f"{cells.dtype}, the manifest records {(record.rows, len(record.parts))} of {SHARD_SUM}")
    return cells


class TargetStore:
    """All target versions under ``<root>/targets/``."""

    def __init__(self, root: Root | str | None):
        self.root = open_root(root)

    def ids(self, kind: str | None = None) -> list[str]:
        """Version ids that have a manifest (building or complete), optionally of one kind."""
        names = [n for n in self.root.ls(layout.TARGETS)
                 if layout.is_safe_id(n) and self.root.file_exists(layout.target_manifest(n))]
        return [n for n in names if kind is None or Ref.infer(n).target_kind == kind]

    def folder_sizes(self) -> dict[str, int]:
        """Bytes under each version folder (see :meth:`folder_stats`)."""
        return {name: size for name, (size, _) in self.folder_stats().items()}

    def folder_stats(self) -> dict[str, tuple[int, float | None]]:
        """(bytes, newest file mtime) of each version folder. On a local root a scandir walk
        (fsspec's local walk costs ~30 us a folder, and zarr keeps ~3 a clip); on an object store
        one version at a time, one listing of its own files and one recursive listing of each array
        folder (on S3 1,000 objects a request), so what is held is one array's listing, not the
        whole of ``targets/`` (an info dict per object: ~0.6 GB for a 10^6-clip pi0 version)."""
        if self.root.is_local:
            return {name: _tree_stats(os.path.join(self.root.path(layout.TARGETS), name))
                    for name in self.root.ls(layout.TARGETS)}
        return {name: _object_tree_stats(self.root, f"{layout.TARGETS}/{name}") for name in self.root.ls(layout.TARGETS)}

    def status(self, version_id: str) -> str | None:
        """None when absent, else the manifest's status ('building' or 'complete')."""
        if not self.root.file_exists(layout.target_manifest(version_id)):
            return None
        return self.manifest(version_id).status

    def manifest(self, version_id: str) -> TargetVersion:
        rel = layout.target_manifest(version_id)
        if not self.root.file_exists(rel):
            raise ValueError(f"target version '{version_id}': not found under {self.root.url}")
        data = self.root.read_json(rel)
        where = self.root.url_of(rel)
        manifest = validate_stored(TargetVersion, data, where)
        check_version_id(manifest, version_id, where)
        check_content_digest(data, where)
        return manifest

    def shard_sums(self, manifest: TargetVersion) -> ShardSums:
        """The checksums recorded for ``manifest``'s shard objects: from its shard table (read and
        checked against the manifest: one ValueError naming the file and version when missing or
        damaged), or from the manifest itself (versions finalized before the table, building ones)."""
        parts = [part.name for array in manifest.arrays for part in stored_parts(array)]
        record = manifest.shard_table
        if record is None:
            return ShardSums.from_dicts(parts, manifest.num_shards, manifest.shards, manifest.shard_xxh3,
                                        self.root.url_of(layout.target_manifest(manifest.id)))
        rel = layout.target_file(manifest.id, record.name)
        where = self.root.url_of(rel)
        if record.parts != parts or record.rows != manifest.num_shards:
            raise ValueError(f"{where}: the manifest of target version '{manifest.id}' records a shard table of "
                             f"{record.rows} shards x {record.parts}, its layout is {manifest.num_shards} x {parts}")
        try:
            data = self.root.read_bytes(rel)
        except FileNotFoundError:
            raise ValueError(f"{where}: shard table of target version '{manifest.id}' is missing (its manifest "
                             "names it)") from None
        return ShardSums(parts, parse_shard_table(data, record, manifest.id, where))

    def write_manifest(self, manifest: TargetVersion) -> None:
        """Publish ``manifest`` with the digest of its own content (``content_sha256``)."""
        data = manifest.model_dump(mode="json")
        manifest.content_sha256 = data["content_sha256"] = content_digest(data)
        self.root.write_json_atomic(layout.target_manifest(manifest.id), data)

    def begin(self, recipe: TargetRecipe, arrays: Sequence[ArraySpec], num_clips: int,
              shard_size: int) -> "TargetWriter":
        """Create (or reopen, when building) the version of ``recipe``; refuse a complete one."""
        version_id = recipe.version_id()
        status = self.status(version_id)
        if status == "complete":
            raise ValueError(f"target version '{version_id}' is complete and immutable; "
                             "change an input, model or parameter to make a new version")
        if status == "building":
            manifest = self.manifest(version_id)
            _check_same_layout(manifest, arrays, num_clips, shard_size)
        else:
            manifest = TargetVersion(
                id=version_id, recipe=recipe, arrays=list(arrays), num_clips=num_clips, shard_size=shard_size,
                created=now_iso(), git_commit=git_commit(), host=host(), packages=package_versions(),
                verified_inputs=verify_by_default())
            self._create_arrays(manifest)
            self.write_manifest(manifest)
        return TargetWriter(self, manifest)

    def _create_arrays(self, manifest: TargetVersion) -> None:
        for spec in (part for array in manifest.arrays for part in stored_parts(array)):
            store = self.root.zarr_store(layout.target_array(manifest.id, spec.name))
            chunk = (1, *spec.shape[1:])
            try:
                zarr.create_array(store, shape=tuple(spec.shape), dtype=spec.dtype, chunks=chunk,
                                  shards=(manifest.shard_size, *spec.shape[1:]),
                                  compressors=COMPRESSORS[spec.compression],
                                  fill_value=0, config={"write_empty_chunks": True}, overwrite=False)
            except zarr.errors.ContainsArrayError:
                # A concurrent builder created it first: same id, same layout.
                continue

    def writer(self, version_id: str) -> "TargetWriter":
        """Reopen a building version by id (what a task does: tasks take ids, not arrays)."""
        manifest = self.manifest(version_id)
        return TargetWriter(self, manifest)

    def open(self, version_id: str, verify: bool | None = None) -> "TargetReader":
        """A reader of one version; ``verify`` (default: on unless ``--no-verify``) checks every
        shard's recorded checksum as it is read."""
        return TargetReader(self, self.manifest(version_id), verify)

    def delete(self, version_id: str) -> None:
        self.root.rm(layout.target_dir(version_id))


def check_version_id(manifest: TargetVersion, version_id: str, where: str) -> None:
    """Refuse a manifest whose stored recipe does not hash to the id of the folder it is in."""
    proven = manifest.recipe.version_id()
    if manifest.id != version_id or proven != version_id:
        raise ValueError(f"{where}: target version '{version_id}' does not match its stored recipe (the recipe "
                         f"hashes to '{proven}', the manifest says '{manifest.id}'); the manifest was edited "
                         "or belongs to another version")


def _check_same_layout(manifest: TargetVersion, arrays: Sequence[ArraySpec], num_clips: int, shard_size: int) -> None:
    def content(spec: ArraySpec) -> dict:
        return spec.model_dump(exclude={"compression"})

    if [content(a) for a in manifest.arrays] != [content(a) for a in arrays] or \
            manifest.num_clips != num_clips or manifest.shard_size != shard_size:
        raise ValueError(f"target version '{manifest.id}' is being built with another array layout "
                         "(arrays, clips or shard size differ); this is a bug in the stage that made it")
    stored = {a.name: a.compression for a in manifest.arrays}
    changed = sorted(a.name for a in arrays if stored[a.name] != a.compression)
    if changed:
        log.warning("target version '%s': resuming with the compression it was begun with (%s); the requested "
                    "compression of %s is ignored", manifest.id, stored, changed)


def layout_differences(array: zarr.Array, spec: ArraySpec, shard_size: int) -> list[str]:
    """How a stored zarr array's shape, dtype and shard length (clips per shard object) differ
    from what the manifest says of it ([] = they agree)."""
    problems = []
    if list(array.shape) != list(spec.shape):
        problems.append(f"stored shape {list(array.shape)} differs from the manifest's {list(spec.shape)}")
    if np.dtype(array.dtype) != np.dtype(spec.dtype):
        problems.append(f"stored dtype {array.dtype} differs from the manifest's {spec.dtype}")
    stored_shard = (array.shards or array.chunks)[0]
    if stored_shard != shard_size:
        problems.append(f"stored shards of {stored_shard} clips differ from the manifest's {shard_size}")
    return problems


def shard_object(manifest: TargetVersion, array: str, shard_index: int) -> str:
    """Path (relative to the root) of the stored object holding shard ``shard_index`` of ``array``."""
    ndim = len(stored_part(manifest, array).shape)
    key = "/".join([str(shard_index)] + ["0"] * (ndim - 1))
    return f"{layout.target_array(manifest.id, array)}/c/{key}"


class _VersionHandle:
    """One version's manifest and its lazily opened zarr arrays."""

    read_only = True

    def __init__(self, store: TargetStore, manifest: TargetVersion):
        self.store, self.manifest, self.root = store, manifest, store.root
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: dict[str, ShardCodec | None] = {}
        self._sums: tuple[TargetVersion, ShardSums] | None = None

    @property
    def sums(self) -> ShardSums:
        """The recorded checksums of this version's shard objects (the shard table is read, and
        checked, on first use; again when the manifest was replaced, e.g. by finalize)."""
        if self._sums is None or self._sums[0] is not self.manifest:
            self._sums = (self.manifest, self.store.shard_sums(self.manifest))
        return self._sums[1]

    @sums.setter
    def sums(self, sums: ShardSums) -> None:
        self._sums = (self.manifest, sums)

    @property
    def version_id(self) -> str:
        return self.manifest.id

    def array(self, name: str) -> zarr.Array:
        """The stored zarr array ``name`` of this version (opened once): for a coded array, its
        codes (see :func:`stored_parts`). Its shape, dtype and shard length must be the manifest's
        (ValueError naming both files otherwise): the version id proves the recipe, not the layout."""
        spec = stored_part(self.manifest, name)
        if name not in self._arrays:
            rel = layout.target_array(self.version_id, name)
            store = self.root.zarr_store(rel, read_only=self.read_only)
            # zarr_format: without it zarr also looks for v2 metadata, 4 more requests per open on S3.
            array = zarr.open_array(store, mode="r" if self.read_only else "r+", zarr_format=3)
            if problems := layout_differences(array, spec, self.manifest.shard_size):
                raise ValueError(f"target version '{self.version_id}', array '{name}': {'; '.join(problems)} "
                                 f"({self.root.url_of(rel)} against {self.root.url_of(layout.target_manifest(self.version_id))}); "
                                 f"the manifest was edited or the array replaced, refusing to read it")
            self._arrays[name] = array
        return self._arrays[name]

    def _codec(self, name: str) -> ShardCodec | None:
        """foresight.storage.zarr_shards' encoder/decoder of the array's shards (None: zarr does the work)."""
        if name not in self._codecs:
            self._codecs[name] = shard_codec(self.array(name))
        return self._codecs[name]


class TargetWriter(_VersionHandle):
    """Writes whole shards of one building version and completes it."""

    read_only = False

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def shard_clips(self, shard_index: int) -> range:
        """Clip indices covered by one shard."""
        start = shard_index * self.manifest.shard_size
        return range(start, min(start + self.manifest.shard_size, self.manifest.num_clips))

    def done_path(self, shard_index: int) -> str:
        return layout.target_done(self.version_id, shard_index)

    def is_done(self, shard_index: int) -> bool:
        return self.root.file_exists(self.done_path(shard_index))

    @property
    def _may_hold_temporaries(self) -> bool:
        """Only local roots: there every write goes to a temporary that is renamed; on an object
        store every write of a version (shard objects, zarr's, markers, tables, claims) is one PUT,
        so no listing is spent looking for temporaries (at 10^6 clips the finalize listing alone held
        ~0.7 GB of s3fs entries for a pi0 version, and a shard's claim listed once per stored part)."""
        return self.root.is_local

    def _sweep_temporaries(self) -> None:
        """At completion, remove what writers that have exited left anywhere in the version (a
        temporary of a live writer, or of another machine, is left alone: its claim handles it),
        from one walk of the version."""
        if self._may_hold_temporaries:
            remove_dead_temporaries_under(self.root, layout.target_dir(self.version_id))

    def pending_shards(self) -> list[int]:
        done = set(self.root.ls(layout.target_dir(self.version_id), layout.DONE_DIR))
        return [i for i in range(self.num_shards) if str(i) not in done]

    def write_shard(self, shard_index: int, arrays: dict[str, np.ndarray], encoded: bool = False) -> dict[str, str]:
        """Write every array of one shard, then its ``_done`` marker with the shard checksums.
        ``encoded``: ``arrays`` are the stored parts already (see :func:`encode_part_tensors`)."""
        clips = self.shard_clips(shard_index)
        if len(clips) == 0:
            raise ValueError(f"target version '{self.version_id}': shard {shard_index} is out of range")
        if encoded:
            return self._write_parts(shard_index, arrays)
        expected = {spec.name for spec in self.manifest.arrays}
        if set(arrays) != expected:
            raise ValueError(f"target version '{self.version_id}', shard {shard_index}: arrays "
                             f"{sorted(arrays)} given, expected {sorted(expected)}")
        for spec in self.manifest.arrays:
            data = np.asarray(arrays[spec.name])
            want = (len(clips), *spec.shape[1:])
            if data.shape != want:
                raise ValueError(f"target version '{self.version_id}', shard {shard_index}, array "
                                 f"'{spec.name}': shape {data.shape}, expected {want}")
        parts = {}
        for spec in self.manifest.arrays:
            parts.update(encode_parts(spec, np.asarray(arrays[spec.name]).astype(spec.dtype, copy=False)))
        return self._write_parts(shard_index, parts)

    def _write_parts(self, shard_index: int, parts: dict[str, np.ndarray]) -> dict[str, str]:
        """Store every stored part of one shard (checked against the layout), then the ``_done`` marker."""
        clips = self.shard_clips(shard_index)
        specs = [part for spec in self.manifest.arrays for part in stored_parts(spec)]
        if set(parts) != {part.name for part in specs}:
            raise ValueError(f"target version '{self.version_id}', shard {shard_index}: stored arrays "
                             f"{sorted(parts)} given, expected {sorted(part.name for part in specs)}")
        sums, fast = {}, {}
        for part in specs:
            where = f"target version '{self.version_id}', shard {shard_index}, array '{part.name}'"
            data = np.asarray(parts[part.name])
            if data.shape != (len(clips), *part.shape[1:]) or data.dtype != np.dtype(part.dtype):
                raise ValueError(f"{where}: {data.dtype} {data.shape} given, expected {part.dtype} "
                                 f"{(len(clips), *part.shape[1:])}")
            check_scales(part.name, data, where)
            sums[part.name], fast[part.name] = self._store_shard(part.name, shard_index, data)
        # The inputs this thread read are confirmed unchanged since their checks: bytes modified in
        # place while in use never get a marker. Every shard object was fsynced (file and folder)
        # above: the marker never outlives its data.
        confirm_reads_unchanged()
        self.root.write_json_atomic(self.done_path(shard_index), {"sha256": sums, FAST_HASH: fast})
        return sums

    def _store_shard(self, array: str, shard_index: int, data: np.ndarray) -> tuple[str, str]:
        """Store one shard of ``array``; returns the stored object's (sha256, xxh3) (or EMPTY_SHARD twice)."""
        codec = self._codec(array)
        if codec is None:  # a layout storage.zarr_shards does not encode: let zarr write it
            clips = self.shard_clips(shard_index)
            self.array(array)[clips.start:clips.stop] = data
            return self._object_digest(array, shard_index)
        hasher = fast_digest()
        sha = self.root.write_parts_atomic(shard_object(self.manifest, array, shard_index), codec.parts(data),
                                           digests=[hasher])
        return sha, hasher.hexdigest()

    def _object_digest(self, array: str, shard_index: int) -> tuple[str, str]:
        rel = shard_object(self.manifest, array, shard_index)
        # zarr stores no object for a shard that holds only the fill value.
        if not self.root.file_exists(rel):
            return EMPTY_SHARD, EMPTY_SHARD
        data = self.root.read_bytes(rel)
        self.root.write_bytes_atomic(rel, data)  # zarr's LocalStore does not fsync; this publication does
        return hashlib.sha256(data).hexdigest(), fast_digest_of(data)

    def read_done(self, shard_index: int) -> tuple[dict[str, str], dict[str, str]]:
        """(sha256, xxh3) per array recorded in one shard's ``_done`` marker (xxh3 {} for old markers)."""
        return _done_sums(self.root.read_json(self.done_path(shard_index)))

    def read_all_done(self) -> ShardSums:
        """Every shard's ``_done`` marker as columns, :data:`MARKER_BATCH` markers fetched together
        (concurrent GETs on an object store); each marker's JSON is dropped once its row is set."""
        parts = [part.name for array in self.manifest.arrays for part in stored_parts(array)]
        sums = ShardSums.empty(parts, self.num_shards)
        for first in range(0, self.num_shards, MARKER_BATCH):
            rels = [self.done_path(i) for i in range(first, min(first + MARKER_BATCH, self.num_shards))]
            data = read_many(self.root, rels)
            for shard, rel in enumerate(rels, start=first):
                where = self.root.url_of(rel)
                sha256, xxh3 = _done_sums(parse_json(data.pop(rel), where))
                sums.record(shard, sha256, xxh3, where)
        return sums

    def remove_stale_temporaries(self, shard_index: int) -> list[str]:
        """Delete temporaries a dead writer left in this shard's object folders (call while holding
        the shard's claim: no live writer can be using them)."""
        removed: list[str] = []
        if not self._may_hold_temporaries:
            return removed
        for spec in (part for array in self.manifest.arrays for part in stored_parts(array)):
            folder = shard_object(self.manifest, spec.name, shard_index).rsplit("/", 1)[0]
            # A 1-d array keeps every shard's object in one folder: there only exited writers' go.
            removed += remove_temporaries(self.root, folder, only_dead=len(spec.shape) == 1)
        if removed:
            log.info("target version %s shard %d: removed %d stale temporaries", self.version_id, shard_index,
                     len(removed))
        return removed

    def finalize(self, timings: dict[str, float] | None = None) -> TargetVersion:
        """Mark the version complete once every shard is done; returns the final manifest."""
        current = self.store.manifest(self.version_id)
        if current.status == "complete":
            return current
        pending = self.pending_shards()
        if pending:
            raise ValueError(f"target version '{self.version_id}': shards {pending} are not written yet")
        sums = self.read_all_done()
        self._sweep_temporaries()
        current.shards, current.shard_xxh3 = {}, {}
        current.shard_table = self._write_shard_table(sums)
        current.status, current.completed = "complete", now_iso()
        current.timings = {**current.timings, **(timings or {})}
        self.store.write_manifest(current)
        self.manifest = current
        self.sums = sums
        log.info("target version %s complete (%d clips, %d shards)", current.id, current.num_clips, self.num_shards)
        return current

    def _write_shard_table(self, sums: ShardSums) -> ShardTableFile:
        """Publish the shard table (before the manifest that names it marks the version complete)."""
        pieces = shard_table_parts(sums.cells)
        sha256 = self.root.write_parts_atomic(layout.target_file(self.version_id, layout.TARGET_SHARDS), pieces)
        return ShardTableFile(name=layout.TARGET_SHARDS, parts=sums.parts, rows=len(sums.cells),
                              bytes=sum(memoryview(piece).nbytes for piece in pieces), sha256=sha256,
                              row_dtype=str(SHARD_SUM.descr))


def _done_sums(marker: object) -> tuple[dict[str, str], dict[str, str]]:
    if isinstance(marker, dict) and isinstance(marker.get("sha256"), dict):
        return dict(marker["sha256"]), dict(marker.get(FAST_HASH) or {})
    return dict(marker), {}  # written before xxh3 was recorded: {array: sha256}


class TargetReader(_VersionHandle):
    """Read access to one version's arrays; with ``verify`` (the default) every shard object is
    checked against the checksum recorded at ``_done`` as it is read, and a mismatch is refused."""

    def __init__(self, store: TargetStore, manifest: TargetVersion, verify: bool | None = None):
        super().__init__(store, manifest)
        self.verify_reads = verify_by_default() if verify is None else bool(verify)
        self._objects: dict[str, tuple[int, ShardObject]] = {}  # array -> (shard, its bytes, checked when verifying)
        self._ahead: dict[str, dict[int, Future]] = {}  # array -> {next shard: its check in a helper thread}
        self._used: dict[str, UsedObject] = {}  # path -> the checked local objects the current read used

    def forget_objects(self) -> None:
        """Drop the verified shard bytes kept for the next rows and the checks started ahead: later
        reads load and check them again (a reader kept across tasks sees objects changed since)."""
        self._objects.clear()
        for futures in self._ahead.values():
            for future in futures.values():
                future.cancel()
        self._ahead.clear()

    def check_ahead(self, name: str, clip: int) -> None:
        """Start, in a helper thread, the checks of the shard objects that hold ``clip``'s row of
        array ``name`` (each stored part's), unless they are kept or already started. A caller about to
        read several arrays calls this for all of them first, so the checks of the later arrays
        overlap the decoding of the first instead of running one after the other in its thread. An
        unverified reader does nothing."""
        if not self.verify_reads:
            return
        shard = int(self._rows(clip)[0]) // self.manifest.shard_size
        for part in stored_parts(self.manifest.array_spec(name)):
            cached = self._objects.get(part.name)
            if (cached is None or cached[0] != shard) and shard not in self._ahead.get(part.name, {}):
                self._start_check(part.name, shard)

    def read(self, name: str, clips: slice | int | Sequence[int] = slice(None)) -> np.ndarray:
        """Rows of one array by clip index (an int, a slice or a list of indices), in the array's
        ``dtype``; a coded array (ArraySpec.codec) is decoded from its verified stored parts.

        Verified, the local shard objects the read used are confirmed unchanged since their checks
        once it is done (one ``stat`` each; a changed one is hashed again and refused if it no longer
        matches), and, inside an :func:`answering_for_reads` block, noted for the block's publication
        (:func:`confirm_reads_unchanged`), which covers rows handed out as views of the files while
        the caller used them."""
        self._used.clear()  # also what a read that raised had noted
        values = self._read(name, clips)
        for entry in self._used.values():
            entry.confirm()
            if _LEDGER.used is not None:
                _LEDGER.used[entry.path] = entry
        return values

    def _read(self, name: str, clips: slice | int | Sequence[int]) -> np.ndarray:
        spec = self.manifest.array_spec(name)
        if spec.codec == "raw":
            return self._read_stored(name, clips)
        single = isinstance(clips, (int, np.integer))
        rows = [clips] if single else clips
        parts = {part.name: self._read_stored(part.name, rows) for part in stored_parts(spec)}
        values = decode_parts(spec, parts, f"target version '{self.version_id}', array '{name}'")
        return values[0] if single else values

    def _read_stored(self, name: str, clips: slice | int | Sequence[int]) -> np.ndarray:
        """Rows of one stored zarr array (see :func:`stored_parts`) as stored."""
        array = self.array(name)
        codec = self._codec(name)
        if codec is not None and (self.verify_reads or self.root.is_local):
            return self._read_objects(name, codec, clips)
        if self.verify_reads:  # a layout zarr_shards does not decode: check the objects, then let zarr read
            for shard in sorted({i // self.manifest.shard_size for i in self._rows(clips)}):
                self._shard_bytes(name, shard)
        if isinstance(clips, (slice, int, np.integer)):
            return array[clips]
        return array.get_orthogonal_selection((np.asarray(clips, dtype=np.int64),))

    def _rows(self, clips: slice | int | Sequence[int]) -> np.ndarray:
        if isinstance(clips, slice):
            return np.arange(*clips.indices(self.manifest.num_clips))
        rows = np.atleast_1d(np.asarray(clips, dtype=np.int64))
        rows = np.where(rows < 0, rows + self.manifest.num_clips, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.manifest.num_clips):
            raise IndexError(f"target version '{self.version_id}': clip index out of range "
                             f"(has {self.manifest.num_clips} clips)")
        return rows

    def _read_objects(self, name: str, codec: ShardCodec, clips: slice | int | Sequence[int]) -> np.ndarray:
        """Rows decoded from the shard objects (checked first when verifying). Consecutive rows of
        one uncompressed shard on a local root come back as a view of the mapped object (see
        :meth:`_row_view`): the caller's one pass over them is the only one."""
        spec = stored_part(self.manifest, name)
        rows = self._rows(clips)
        size = self.manifest.shard_size
        view = self._row_view(name, codec, spec, rows)
        if view is not None:
            return view[0] if isinstance(clips, (int, np.integer)) else view
        unique, inverse = np.unique(rows, return_inverse=True)
        out = np.zeros((len(unique), *spec.shape[1:]), dtype=spec.dtype)  # zarr's fill value is 0
        shards = unique // size
        for shard in np.unique(shards).tolist():
            picked = np.flatnonzero(shards == shard)
            data = self._shard_bytes(name, shard)
            if data is None:
                continue  # a shard of fill values only: no object
            where = self._where(name, shard)
            if len(picked) == picked[-1] - picked[0] + 1:  # contiguous rows: decode into a view of out
                codec.decode_rows(data, (unique[picked] - shard * size).tolist(), out[picked[0]:picked[-1] + 1],
                                  where)
            else:
                part = np.zeros((len(picked), *spec.shape[1:]), dtype=spec.dtype)
                codec.decode_rows(data, (unique[picked] - shard * size).tolist(), part, where)
                out[picked] = part
        if isinstance(clips, (int, np.integer)):
            return out[0]
        return out if len(unique) == len(rows) and np.array_equal(unique, rows) else out[inverse]

    def _row_view(self, name: str, codec: ShardCodec, spec: ArraySpec, rows: np.ndarray) -> np.ndarray | None:
        """Consecutive ``rows`` of one uncompressed shard of a local root as an array viewing a fresh
        copy-on-write map of their bytes (the object checked first when verifying), or None. A fresh
        map per read, not the kept one: a caller writing into its rows changes neither the checked
        bytes nor what a later read returns."""
        size = self.manifest.shard_size
        if not self.root.is_local or not len(rows) or rows[0] // size != rows[-1] // size \
                or not np.array_equal(rows, rows[0] + np.arange(len(rows))):
            return None
        shard = int(rows[0]) // size
        data = self._shard_bytes(name, shard)
        identity = self._objects[name][1].identity
        if data is None or identity is None:
            return None
        rel = shard_object(self.manifest, name, shard)
        where = self._where(name, shard)
        row_bytes = math.prod(spec.shape[1:]) * np.dtype(spec.dtype).itemsize
        span = codec.row_span(data, int(rows[0]) - shard * size, int(rows[-1]) + 1 - shard * size, row_bytes, where)
        if span is None:
            return None
        if not _LIVE_MAPS.take():
            return None  # as many maps are alive as this process may hold: copy these rows instead
        try:
            region = map_unchanged(self.root.path(rel), span[0], span[1], identity,
                                   f"{where} ({self.root.url_of(rel)})")
        except BaseException:
            _LIVE_MAPS.give()
            raise
        weakref.finalize(region, _LIVE_MAPS.give)
        return np.frombuffer(region, dtype=spec.dtype).reshape(len(rows), *spec.shape[1:])

    def _shard_bytes(self, name: str, shard: int) -> memoryview | None:
        """The bytes of one shard object (memory-mapped on local disks; checked when verifying), None
        when zarr stored no object (fill values only). The newest shard per array is kept for the
        next rows; when a verified array is read from its first shard or shard after shard, the next
        shard's check starts ahead (see :func:`_check_ahead_pool`)."""
        cached = self._objects.get(name)
        if cached is not None and cached[0] == shard:
            self._note_used(name, shard, cached[1])
            return cached[1].data
        if not self.verify_reads:
            loaded, _ = self._load_object(shard_object(self.manifest, name, shard), self._where(name, shard))
        elif (loaded := self._take_ahead(name, shard)) is _NOT_AHEAD:
            loaded = self._checked_object(name, shard)
        self._objects[name] = (shard, loaded)
        self._note_used(name, shard, loaded)
        sequential = cached[0] == shard - 1 if cached is not None else shard == 0
        if self.verify_reads and sequential:
            started = self._ahead.get(name, {})
            for ahead in range(shard + 1, min(shard + 1 + check_ahead_window(), self.manifest.num_shards)):
                if ahead not in started:
                    self._start_check(name, ahead)
        return loaded.data

    def _note_used(self, name: str, shard: int, loaded: ShardObject) -> None:
        """Remember a checked local object the current read takes bytes from (see :meth:`read`)."""
        recorded = self.sums.recorded(name, shard) if self.verify_reads and loaded.identity is not None else None
        if recorded is not None and recorded[1] != EMPTY_SHARD:
            rel = shard_object(self.manifest, name, shard)
            path = self.root.path(rel)
            self._used[path] = UsedObject(path, loaded.identity, recorded[0], recorded[1], self._where(name, shard),
                                          self.version_id)

    def _start_check(self, name: str, shard: int) -> None:
        """Check one shard object in the check-ahead pool; its result is taken by :meth:`_take_ahead`."""
        self._ahead.setdefault(name, {})[shard] = _check_ahead_pool().submit(self._checked_object, name, shard)

    def _take_ahead(self, name: str, shard: int) -> ShardObject | object:
        """The result of the check started ahead for ``shard`` (its error raised here, where the
        shard is read); ``_NOT_AHEAD`` when none was started for it or the helper has not begun it
        (then the caller checks it itself rather than wait). Checks started for shards outside the
        window after this one are cancelled: that reader went elsewhere."""
        futures = self._ahead.get(name)
        if not futures:
            return _NOT_AHEAD
        future, window = futures.pop(shard, None), check_ahead_window()
        for other in [s for s in futures if not shard < s <= shard + window]:
            futures.pop(other).cancel()
        if future is None or future.cancel():
            return _NOT_AHEAD
        return future.result()

    def _checked_object(self, name: str, shard: int) -> ShardObject:
        """Load one shard object and check it against the checksum recorded at ``_done``
        (ValueError naming version, array, shard and object on a mismatch or a missing object)."""
        rel = shard_object(self.manifest, name, shard)
        recorded = self.sums.recorded(name, shard)
        where = self._where(name, shard)
        hash_kind = recorded[0] if recorded is not None and recorded[1] != EMPTY_SHARD else None
        loaded, found = self._load_object(rel, where, hash_kind)
        data = loaded.data
        if recorded is not None and recorded[1] == EMPTY_SHARD:
            if data is not None:
                raise ValueError(f"{where}: should hold only fill values but an object exists "
                                 f"({self.root.url_of(rel)})")
        elif recorded is not None:
            if data is None:
                raise ValueError(f"{where}: shard object is missing ({self.root.url_of(rel)})")
            kind, digest = recorded
            if found is None:
                found = fast_digest_of(data) if kind == FAST_HASH else hashlib.sha256(data).hexdigest()
            if found != digest:
                raise ValueError(f"{where}: checksum mismatch ({kind} of {self.root.url_of(rel)} differs from "
                                 f"the one recorded at _done); the shard was modified or corrupted, refusing "
                                 f"to read it (run `foresight targets verify {self.version_id}`)")
        return loaded

    def _where(self, name: str, shard: int) -> str:
        return f"target version '{self.version_id}', array '{name}', shard {shard}"

    def _load_object(self, rel: str, where: str, hash_kind: str | None = None) -> tuple[ShardObject, str | None]:
        """One shard object's bytes: a read-only map on a local root (with the identity of the file
        mapped), else read whole; no bytes when zarr stored no object. With ``hash_kind`` (FAST_HASH
        or "sha256") a local object is also hashed, from the descriptor that was mapped (see
        :func:`digest_of_reads`); the digest is None where the caller must hash the bytes itself. An
        object that exists but cannot be read (a folder in its place) is a ValueError naming ``where``."""
        try:
            return self._open_object(rel, hash_kind)
        except FileNotFoundError:
            return ShardObject(None), None
        except OSError as err:
            raise ValueError(f"{where}: shard object cannot be read ({err.strerror or err}, "
                             f"{self.root.url_of(rel)})") from None

    def _open_object(self, rel: str, hash_kind: str | None) -> tuple[ShardObject, str | None]:
        if not self.root.is_local:
            return ShardObject(memoryview(self.root.read_bytes(rel))), None
        handle = open(self.root.path(rel), "rb", buffering=0)
        with handle:
            stat = os.fstat(handle.fileno())
            if stat.st_size == 0:
                return ShardObject(memoryview(b"")), None
            loaded = ShardObject(memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)),
                                 FileIdentity.of(stat))
            digest = digest_of_reads(handle, hash_kind) if hash_kind is not None and HASH_THROUGH_READS else None
        return loaded, digest

    def verify(self, shards: Sequence[int] | None = None) -> list[str]:
        """Re-hash stored shard objects (sha256, the audit hash); one message per missing or corrupt
        shard ([] = intact)."""
        if self.manifest.status != "complete":
            return [f"{self.version_id}: status is '{self.manifest.status}', not complete"]
        problems = []
        indices = range(self.manifest.num_shards) if shards is None else shards
        try:
            sums = self.sums
        except ValueError as err:  # a missing or damaged shard table: one problem naming it
            return [str(err)]
        for index in indices:
            recorded = sums.shard_sha256(index) if 0 <= index < len(sums.cells) else None
            if recorded is None:
                problems.append(f"{self.version_id}: shard {index} has no recorded checksum")
                continue
            for array, digest in sorted(recorded.items()):
                problems.extend(self._check_object(array, index, digest))
        return problems

    def _check_object(self, array: str, index: int, digest: str) -> list[str]:
        rel = shard_object(self.manifest, array, index)
        if digest == EMPTY_SHARD:
            if self.root.file_exists(rel):
                return [f"{self.version_id}: array '{array}' shard {index} should hold only fill values "
                        f"but an object exists ({self.root.url_of(rel)})"]
            return []
        try:  # no exists() first: on an object store that was a HEAD (and a LIST) more per object
            found = self.root.sha256(rel)
        except FileNotFoundError:
            return [f"{self.version_id}: array '{array}' shard {index} is missing ({self.root.url_of(rel)})"]
        except OSError as err:
            return [f"{self.version_id}: array '{array}' shard {index} cannot be read ({err.strerror or err}, "
                    f"{self.root.url_of(rel)})"]
        if found != digest:
            return [f"{self.version_id}: array '{array}' shard {index} is corrupt (sha256 mismatch, "
                    f"{self.root.url_of(rel)})"]
        return []


class UsedObject(NamedTuple):
    """A checked local shard object whose bytes a verified read handed out or decoded: the identity
    of the file when it was checked and the checksum recorded for it at ``_done``."""

    path: str
    identity: FileIdentity
    kind: str
    digest: str
    where: str
    version_id: str

    def confirm(self) -> None:
        """ValueError naming version, array, shard and file if the object was modified since its
        check and its bytes no longer match the recorded checksum (a changed identity alone, e.g. a
        ``touch``, is hashed again and passes)."""
        with contextlib.suppress(OSError):
            if FileIdentity.of(os.stat(self.path)) == self.identity:
                return
        try:
            with open(self.path, "rb", buffering=0) as handle:
                found = digest_of_reads(handle, self.kind)
        except OSError as err:
            raise ValueError(f"{self.where}: the shard object went away while it was being read ({self.path}: "
                             f"{err.strerror or err}); refusing what was read from it") from None
        if found != self.digest:
            raise ValueError(f"{self.where}: the shard object changed while it was being read ({self.kind} of "
                             f"{self.path} no longer matches the one recorded at _done); refusing what was read "
                             f"from it (run `foresight targets verify {self.version_id}`)")


class _ReadLedger(threading.local):
    """The checked local shard objects this thread's verified reads used inside the current
    :func:`answering_for_reads` block (None outside one: nothing is noted)."""

    def __init__(self) -> None:
        self.used: dict[str, UsedObject] | None = None


_LEDGER = _ReadLedger()


@contextlib.contextmanager
def answering_for_reads() -> Iterator[None]:
    """A block (one shard of a build: its reads, its computation and its publication) whose
    publication answers for the block's reads: the shard objects verified reads take bytes from
    inside it are noted, and :func:`confirm_reads_unchanged` checks them again. Reads outside any
    block are confirmed when they end only, so nothing read earlier by the thread can fail a later,
    unrelated publication."""
    outer, _LEDGER.used = _LEDGER.used, {}
    try:
        yield
    finally:
        _LEDGER.used = outer


def confirm_reads_unchanged() -> None:
    """Confirm that every shard object this thread's verified reads used in the current
    :func:`answering_for_reads` block is unchanged since its check (see :meth:`UsedObject.confirm`),
    then forget them; outside a block, nothing to do. Writers call this before they publish what
    they computed (a target shard's ``_done`` marker, an export tar), so bytes modified in place
    while a stage used them (rows handed out as views of the file, or the kept map of a checked
    object) never reach a complete output."""
    if not _LEDGER.used:
        return
    used, _LEDGER.used = list(_LEDGER.used.values()), {}
    for entry in used:
        entry.confirm()


class _MapBudget:
    """How many row maps handed out by readers are alive in this process. CPython keeps a file
    descriptor open per memory map, so a caller holding rows of thousands of clips would otherwise
    run out of descriptors; past ``MAX_LIVE_MAPS`` rows are copied instead."""

    def __init__(self) -> None:
        self.live, self.lock = 0, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.live >= MAX_LIVE_MAPS:
                return False
            self.live += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.live -= 1


MAX_LIVE_MAPS = 256
"""Row maps (views of shard objects, see ``TargetReader._row_view``) alive at once per process."""
_LIVE_MAPS = _MapBudget()


class ShardObject(NamedTuple):
    """A shard object's bytes (None: zarr stored none, fill values only) and, on a local root, the
    identity of the file they map (what a later map of the same rows must still find)."""

    data: memoryview | None
    identity: FileIdentity | None = None


_NOT_AHEAD = object()
"""TargetReader._take_ahead: no check was started ahead for the shard asked for."""
MAX_CHECK_AHEAD = 3
"""At most this many helper threads check shard objects ahead (one process-wide pool), and a
sequential reader has at most this many shards per array checked ahead of the one it reads."""
_CHECK_AHEAD: ThreadPoolExecutor | None = None
_CHECK_AHEAD_LOCK = threading.Lock()


def _check_ahead_pool() -> ThreadPoolExecutor:
    """The process's pool of threads that check shard objects ahead of a sequential reader.

    A verified read hashes the whole shard object before it hands out rows of it: in the reader's
    thread the two passes add up. xxhash releases the GIL while it hashes, so the checks of the next
    shards (up to one per pool thread) overlap the caller's use of this one on the other cores. A
    check the pool has not begun when the shard is asked for is cancelled and done by the reader
    (no waiting on a busy pool)."""
    global _CHECK_AHEAD
    with _CHECK_AHEAD_LOCK:
        if _CHECK_AHEAD is None:
            _CHECK_AHEAD = ThreadPoolExecutor(check_ahead_threads(), thread_name_prefix="shard-check")
        return _CHECK_AHEAD


def check_ahead_threads() -> int:
    """One check-ahead thread per core beyond the reader's, at least 1, at most ``MAX_CHECK_AHEAD``."""
    return helper_threads(MAX_CHECK_AHEAD, MAX_CHECK_AHEAD)


def check_ahead_window() -> int:
    """Shards per array a sequential reader has checked ahead of the one it reads: one per thread."""
    return check_ahead_threads()


def _forget_check_ahead_pool() -> None:
    """In a forked child (store I/O workers): the parent's pool threads do not exist there."""
    global _CHECK_AHEAD, _CHECK_AHEAD_LOCK
    _CHECK_AHEAD, _CHECK_AHEAD_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_check_ahead_pool)


HASH_THROUGH_READS = False
"""Whether checks of local shard objects hash bytes read through the descriptor (``readinto`` a
small per-thread buffer) instead of the read-only map. Reads keep the helpers' page faults out of
this process, but they copy every byte once more: on the 16-core H100 host the export read then ran
at 0.80x unverified against 0.85x through the map, on the 2-CPU VM at 0.47x against 0.63x
(bench_verify's row "xxh3, hashed through reads of the descriptor"). Off; kept for hosts whose
page faults cost more than a copy."""
HASH_READ_CHUNK = 1 << 20
"""Bytes per ``readinto`` of :func:`digest_of_reads`: small enough to stay in a core's L2 cache for the hash."""
_HASH_BUFFERS = threading.local()


def digest_of_reads(handle: io.RawIOBase, kind: str) -> str:
    """Hex digest (``kind``: FAST_HASH or "sha256") of a file's bytes from its current position to
    its end, read through ``handle`` in :data:`HASH_READ_CHUNK` pieces into a buffer of this thread."""
    buffer = getattr(_HASH_BUFFERS, "buffer", None)
    if buffer is None:
        buffer = _HASH_BUFFERS.buffer = memoryview(bytearray(HASH_READ_CHUNK))
    hasher = fast_digest() if kind == FAST_HASH else hashlib.sha256()
    while count := handle.readinto(buffer):
        hasher.update(buffer[:count])
    return hasher.hexdigest()


def fast_digest_of(data: bytes | memoryview) -> str:
    hasher = fast_digest()
    hasher.update(data)
    return hasher.hexdigest()
