"""The target store: content-addressed versions of zarr arrays, written shard by shard."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import zarr

from schemas.base import check_format_version, validate
from schemas.target import ArraySpec, TargetRecipe, TargetVersion
from storage import layout
from storage.claims import claim_shard
from storage.fs import Root, open_root
from storage.provenance import git_commit, host, now_iso, package_versions
from storage.zarr_shards import ShardCodec, shard_codec

log = logging.getLogger(__name__)
ZSTD = zarr.codecs.ZstdCodec(level=3)
COMPRESSORS = {"zstd": ZSTD, "none": None}
"""ArraySpec.compression -> zarr compressor of the stored chunks."""
EMPTY_SHARD = "fill-value-only"
"""Checksum recorded for a shard whose every value is the fill value (zarr writes no object)."""


class TargetStore:
    """All target versions under ``<root>/targets/``."""

    def __init__(self, root: Root | str | None):
        self.root = open_root(root)

    def ids(self, kind: str | None = None) -> list[str]:
        """Version ids that have a manifest (building or complete), optionally of one kind."""
        names = [n for n in self.root.ls("targets") if self.root.exists(layout.target_dir(n), layout.MANIFEST)]
        return [n for n in names if kind is None or n.startswith(f"{kind}-")]

    def status(self, version_id: str) -> str | None:
        """None when absent, else the manifest's status ('building' or 'complete')."""
        if not self.root.exists(layout.target_dir(version_id), layout.MANIFEST):
            return None
        return self.manifest(version_id).status

    def manifest(self, version_id: str) -> TargetVersion:
        rel = f"{layout.target_dir(version_id)}/{layout.MANIFEST}"
        if not self.root.exists(rel):
            raise ValueError(f"target version '{version_id}': not found under {self.root.url}")
        data = self.root.read_json(rel)
        check_format_version(data.get("format_version"), self.root.url_of(rel))
        return validate(TargetVersion, data, self.root.url_of(rel))

    def write_manifest(self, manifest: TargetVersion) -> None:
        self.root.write_json_atomic(f"{layout.target_dir(manifest.id)}/{layout.MANIFEST}",
                                    manifest.model_dump(mode="json"))

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
                created=now_iso(), git_commit=git_commit(), host=host(), packages=package_versions())
            self._create_arrays(manifest)
            self.write_manifest(manifest)
        return TargetWriter(self, manifest)

    def _create_arrays(self, manifest: TargetVersion) -> None:
        for spec in manifest.arrays:
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

    def open(self, version_id: str) -> "TargetReader":
        return TargetReader(self, self.manifest(version_id))

    def delete(self, version_id: str) -> None:
        self.root.rm(layout.target_dir(version_id))


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


def shard_object(manifest: TargetVersion, array: str, shard_index: int) -> str:
    """Path (relative to the root) of the stored object holding shard ``shard_index`` of ``array``."""
    ndim = len(manifest.array_spec(array).shape)
    key = "/".join([str(shard_index)] + ["0"] * (ndim - 1))
    return f"{layout.target_array(manifest.id, array)}/c/{key}"


class _VersionHandle:
    """One version's manifest and its lazily opened zarr arrays."""

    read_only = True

    def __init__(self, store: TargetStore, manifest: TargetVersion):
        self.store, self.manifest, self.root = store, manifest, store.root
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: dict[str, ShardCodec | None] = {}

    @property
    def version_id(self) -> str:
        return self.manifest.id

    def array(self, name: str) -> zarr.Array:
        """The zarr array ``name`` of this version (opened once)."""
        self.manifest.array_spec(name)
        if name not in self._arrays:
            store = self.root.zarr_store(layout.target_array(self.version_id, name), read_only=self.read_only)
            self._arrays[name] = zarr.open_array(store, mode="r" if self.read_only else "r+")
        return self._arrays[name]

    def _codec(self, name: str) -> ShardCodec | None:
        """storage.zarr_shards' encoder/decoder of the array's shards (None: zarr does the work)."""
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
        return f"{layout.target_dir(self.version_id)}/{layout.DONE_DIR}/{shard_index}"

    def is_done(self, shard_index: int) -> bool:
        return self.root.exists(self.done_path(shard_index))

    def claim(self, shard_index: int, ttl_s: float | None = None):
        """``with writer.claim(i) as owned:`` -- owned is truthy when this process should write
        shard ``i`` (None when it is done or a live builder holds it); see storage.claims."""
        return claim_shard(self.root, self.version_id, shard_index, is_done=lambda: self.is_done(shard_index),
                           ttl_s=ttl_s)

    def pending_shards(self) -> list[int]:
        done = set(self.root.ls(layout.target_dir(self.version_id), layout.DONE_DIR))
        return [i for i in range(self.num_shards) if str(i) not in done]

    def write_shard(self, shard_index: int, arrays: dict[str, np.ndarray]) -> dict[str, str]:
        """Write every array of one shard, then its ``_done`` marker with the shard checksums."""
        clips = self.shard_clips(shard_index)
        if len(clips) == 0:
            raise ValueError(f"target version '{self.version_id}': shard {shard_index} is out of range")
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
        sums = {spec.name: self._store_shard(spec.name, shard_index,
                                             np.asarray(arrays[spec.name]).astype(spec.dtype, copy=False))
                for spec in self.manifest.arrays}
        self.root.write_json_atomic(self.done_path(shard_index), sums)
        return sums

    def _store_shard(self, array: str, shard_index: int, data: np.ndarray) -> str:
        """Store one shard of ``array``; returns the stored object's sha256 (or EMPTY_SHARD)."""
        codec = self._codec(array)
        if codec is None:  # a layout storage.zarr_shards does not encode: let zarr write it
            clips = self.shard_clips(shard_index)
            self.array(array)[clips.start:clips.stop] = data
            return self._object_digest(array, shard_index)
        return self.root.write_parts_atomic(shard_object(self.manifest, array, shard_index), codec.parts(data))

    def _object_digest(self, array: str, shard_index: int) -> str:
        rel = shard_object(self.manifest, array, shard_index)
        # zarr stores no object for a shard that holds only the fill value.
        return self.root.sha256(rel) if self.root.exists(rel) else EMPTY_SHARD

    def finalize(self, timings: dict[str, float] | None = None) -> TargetVersion:
        """Mark the version complete once every shard is done; returns the final manifest."""
        current = self.store.manifest(self.version_id)
        if current.status == "complete":
            return current
        pending = self.pending_shards()
        if pending:
            raise ValueError(f"target version '{self.version_id}': shards {pending} are not written yet")
        shards = {str(i): self.root.read_json(self.done_path(i)) for i in range(self.num_shards)}
        current.shards, current.status, current.completed = shards, "complete", now_iso()
        current.timings = {**current.timings, **(timings or {})}
        self.store.write_manifest(current)
        self.manifest = current
        log.info("target version %s complete (%d clips, %d shards)", current.id, current.num_clips, len(shards))
        return current


class TargetReader(_VersionHandle):
    """Read access to one version's arrays, with checksum verification."""

    def read(self, name: str, clips: slice | int | Sequence[int] = slice(None)) -> np.ndarray:
        """Rows of one array by clip index (an int, a slice or a list of indices)."""
        array = self.array(name)
        if isinstance(clips, slice) and self.root.is_local:
            start, stop, step = clips.indices(self.manifest.num_clips)
            codec = self._codec(name)
            if step == 1 and codec is not None:
                return self._read_direct(name, codec, range(start, max(start, stop)))
        if isinstance(clips, (slice, int, np.integer)):
            return array[clips]
        return array.get_orthogonal_selection((np.asarray(clips, dtype=np.int64),))

    def _read_direct(self, name: str, codec: ShardCodec, clips: range) -> np.ndarray:
        """Rows ``clips`` decoded from the shard objects without zarr (same layout, see zarr_shards)."""
        spec = self.manifest.array_spec(name)
        out = np.zeros((len(clips), *spec.shape[1:]), dtype=spec.dtype)  # zarr's fill value is 0
        size = self.manifest.shard_size
        for shard in range(clips.start // size, (clips.stop - 1) // size + 1) if len(clips) else []:
            first, last = max(clips.start, shard * size), min(clips.stop, (shard + 1) * size)
            rel = shard_object(self.manifest, name, shard)
            where = f"target version '{self.version_id}', array '{name}', shard {shard}"
            try:
                handle = open(self.root.path(rel), "rb")
            except FileNotFoundError:
                continue  # zarr stores no object for a shard of fill values only
            with handle:
                codec.read_rows(handle, range(first - shard * size, last - shard * size),
                                out[first - clips.start:last - clips.start], where)
        return out

    def verify(self, shards: Sequence[int] | None = None) -> list[str]:
        """Re-hash stored shard objects; one message per missing or corrupt shard ([] = intact)."""
        if self.manifest.status != "complete":
            return [f"{self.version_id}: status is '{self.manifest.status}', not complete"]
        problems = []
        indices = range(self.manifest.num_shards) if shards is None else shards
        for index in indices:
            recorded = self.manifest.shards.get(str(index))
            if recorded is None:
                problems.append(f"{self.version_id}: shard {index} has no recorded checksum")
                continue
            for array, digest in sorted(recorded.items()):
                problems.extend(self._check_object(array, index, digest))
        return problems

    def _check_object(self, array: str, index: int, digest: str) -> list[str]:
        rel = shard_object(self.manifest, array, index)
        if digest == EMPTY_SHARD:
            if self.root.exists(rel):
                return [f"{self.version_id}: array '{array}' shard {index} should hold only fill values "
                        f"but an object exists ({self.root.url_of(rel)})"]
            return []
        if not self.root.exists(rel):
            return [f"{self.version_id}: array '{array}' shard {index} is missing ({self.root.url_of(rel)})"]
        if self.root.sha256(rel) != digest:
            return [f"{self.version_id}: array '{array}' shard {index} is corrupt (sha256 mismatch, "
                    f"{self.root.url_of(rel)})"]
        return []
