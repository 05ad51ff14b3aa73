"""Whole-shard writes encoded by storage.zarr_shards: the bytes zarr itself writes, read back by zarr."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage.targets import TargetStore, shard_object
from foresight.storage.zarr_shards import shard_codec


def _recipe() -> TargetRecipe:
    return TargetRecipe(kind="teacher", stage="test.shards", stage_version=1, params={"p": 1})


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("dtype", ["float16", "uint8", "int64"])
def test_shard_objects_are_byte_identical_to_zarrs(tmp_path, compression, dtype):
    rng = np.random.default_rng(0)
    shape = (7, 3, 4, 5)  # 7 clips, shards of 3: the last shard is partial
    values = (rng.standard_normal(shape) * 50).astype(dtype)
    values[1] = 0  # a chunk holding only the fill value is stored too
    store = TargetStore(tmp_path)
    spec = ArraySpec(name="target", shape=list(shape), dtype=dtype, compression=compression)
    writer = store.begin(_recipe(), [spec], num_clips=7, shard_size=3)
    assert shard_codec(writer.array("target")) is not None
    for shard in writer.pending_shards():
        sums = writer.write_shard(shard, {"target": values[writer.shard_clips(shard)]})
        # zarr's own encoding of the same shard, into a twin array with the same metadata
        twin = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                                 shards=(3, *shape[1:]), compressors=writer.array("target").compressors,
                                 fill_value=0, config={"write_empty_chunks": True})
        clips = writer.shard_clips(shard)
        twin[clips.start:clips.stop] = values[clips.start:clips.stop]
        key = "/".join([str(shard)] + ["0"] * (len(shape) - 1))
        zarr_bytes = twin.store._store_dict[f"c/{key}"].to_bytes()
        assert sums["target"] == hashlib.sha256(zarr_bytes).hexdigest()
    writer.finalize()
    reader = store.open(writer.version_id)
    assert reader.verify() == []
    np.testing.assert_array_equal(reader.read("target", slice(0, 7)), values)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_direct_slice_reads_equal_zarrs(tmp_path, compression):
    rng = np.random.default_rng(1)
    shape = (8, 2, 3, 4)  # shards of 3 clips; the last shard is partial and shard 1 is never written
    values = (rng.standard_normal(shape) * 10).astype("float16")
    values[3:6] = 0
    store = TargetStore(tmp_path)
    spec = ArraySpec(name="target", shape=list(shape), dtype="float16", compression=compression)
    writer = store.begin(_recipe(), [spec], num_clips=8, shard_size=3)
    for shard in (0, 2):
        writer.write_shard(shard, {"target": values[writer.shard_clips(shard)]})
    reader = store.open(writer.version_id)
    zarr_array = reader.array("target")
    for clips in (slice(None), slice(0, 1), slice(2, 7), slice(5, 8), slice(4, 4), slice(-3, None)):
        direct = reader.read("target", clips)
        assert direct.dtype == np.float16 and direct.shape == zarr_array[clips].shape
        np.testing.assert_array_equal(direct, zarr_array[clips])
    np.testing.assert_array_equal(reader.read("target", [7, 0, 2]), values[[7, 0, 2]])  # through zarr


def test_direct_reads_of_one_dimensional_arrays(tmp_path):
    seeds = np.arange(5, dtype=np.int64) * 1_000_000_007
    store = TargetStore(tmp_path)
    writer = store.begin(_recipe(), [ArraySpec(name="seed", shape=[5], dtype="int64")], num_clips=5, shard_size=2)
    for shard in writer.pending_shards():
        writer.write_shard(shard, {"seed": seeds[writer.shard_clips(shard)]})
    reader = store.open(writer.version_id)
    np.testing.assert_array_equal(reader.read("seed"), seeds)
    np.testing.assert_array_equal(reader.read("seed", slice(1, 4)), reader.array("seed")[1:4])


def test_a_corrupt_shard_index_is_reported_by_name(tmp_path):
    store = TargetStore(tmp_path)
    spec = ArraySpec(name="target", shape=[2, 4], dtype="float32")
    writer = store.begin(_recipe(), [spec], num_clips=2, shard_size=2)
    writer.write_shard(0, {"target": np.ones((2, 4), dtype=np.float32)})
    path = Path(store.root.path(shard_object(writer.manifest, "target", 0)))
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the index, before its crc32c
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"'{writer.version_id}', array 'target', shard 0: shard index checksum"):
        store.open(writer.version_id).read("target", slice(0, 2))


def test_other_layouts_fall_back_to_zarr(tmp_path):
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 6), dtype="float32", chunks=(2, 6),
                              shards=(4, 6), fill_value=0)
    assert shard_codec(array) is None  # chunks of two clips: not the target store's layout
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 6), dtype="float32", chunks=(1, 6), fill_value=0)
    assert shard_codec(array) is None  # no sharding at all


def _finished_version(tmp_path: Path, compression: str) -> tuple[TargetStore, str, np.ndarray]:
    values = (np.random.default_rng(1).standard_normal((7, 3, 4)) * 9).astype(np.float16)
    store = TargetStore(tmp_path)
    spec = ArraySpec(name="target", shape=[7, 3, 4], dtype="float16", compression=compression)
    writer = store.begin(_recipe(), [spec], num_clips=7, shard_size=3)
    for shard in writer.pending_shards():
        writer.write_shard(shard, {"target": values[writer.shard_clips(shard)]})
    writer.finalize()
    return store, writer.version_id, values


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array`` views a memory map (follows .base)."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = getattr(array, "base", None)
    return False


@pytest.mark.parametrize("verify", [True, False])
def test_rows_of_one_uncompressed_shard_are_views_of_a_private_map(tmp_path, verify):
    from foresight.storage.mapped import describe_views

    store, version_id, values = _finished_version(tmp_path, "none")
    path = Path(store.root.path(shard_object(store.manifest(version_id), "target", 1)))
    before = path.read_bytes()
    reader = store.open(version_id, verify=verify)
    rows = reader.read("target", slice(3, 5))
    assert _mapped(rows) and rows.flags.writeable  # no copy, still the caller's to edit
    assert describe_views({"rows": rows}) == {}  # DataLoader workers hand it on as a copy (not an allowed file)
    np.testing.assert_array_equal(rows, values[3:5])
    rows[:] = 0  # private pages: neither the file nor a later read sees it
    np.testing.assert_array_equal(reader.read("target", slice(3, 6)), values[3:6])
    np.testing.assert_array_equal(reader.read("target", 4), values[4])
    assert path.read_bytes() == before
    across = reader.read("target", slice(2, 5))  # two shards: decoded into one new array
    assert not _mapped(across)
    np.testing.assert_array_equal(across, values[2:5])


def test_compressed_rows_are_decoded_copies(tmp_path):
    store, version_id, values = _finished_version(tmp_path, "zstd")
    rows = store.open(version_id).read("target", slice(3, 5))
    assert not _mapped(rows)
    np.testing.assert_array_equal(rows, values[3:5])


@pytest.mark.parametrize("verify", [True, False])
def test_a_shard_replaced_after_it_was_mapped_is_refused(tmp_path, verify):
    store, version_id, values = _finished_version(tmp_path, "none")
    reader = store.open(version_id, verify=verify)
    np.testing.assert_array_equal(reader.read("target", slice(0, 2)), values[0:2])
    path = Path(store.root.path(shard_object(store.manifest(version_id), "target", 0)))
    replacement = path.with_name(path.name + ".new")
    replacement.write_bytes(path.read_bytes())
    replacement.replace(path)  # same bytes, another file: the reader's kept map is not of it
    with pytest.raises(ValueError, match=f"'{version_id}', array 'target', shard 0 .*changed after this reader"):
        reader.read("target", slice(0, 2))


def test_checks_ahead_follow_the_reader_and_are_dropped_when_it_jumps(tmp_path, monkeypatch):
    from foresight.storage import targets

    monkeypatch.setattr(targets, "check_ahead_window", lambda: 2)
    store, version_id, values = _finished_version(tmp_path, "none")  # 3 shards of 3, 3, 1 clips
    reader = store.open(version_id)
    np.testing.assert_array_equal(reader.read("target", slice(0, 3)), values[0:3])
    assert sorted(reader._ahead["target"]) == [1, 2]  # the next two shards are being checked
    np.testing.assert_array_equal(reader.read("target", 6), values[6])  # a jump past shard 1
    assert reader._ahead["target"] == {}  # shard 2's check was taken, shard 1's dropped
    np.testing.assert_array_equal(reader.read("target", [4, 1]), values[[4, 1]])  # back again: checked anew


def test_rows_are_copied_once_too_many_maps_are_alive(tmp_path, monkeypatch):
    """CPython holds a file descriptor per map: a caller keeping the rows of many clips gets copies
    past the budget, and maps again once earlier rows are gone."""
    import gc

    from foresight.storage import targets

    store, version_id, values = _finished_version(tmp_path, "none")
    reader = store.open(version_id)
    monkeypatch.setattr(targets, "MAX_LIVE_MAPS", targets._LIVE_MAPS.live + 2)
    kept = [reader.read("target", clip) for clip in range(4)]
    assert [_mapped(rows) for rows in kept] == [True, True, False, False]
    for clip, rows in enumerate(kept):
        np.testing.assert_array_equal(rows, values[clip])
    del kept
    gc.collect()
    assert _mapped(reader.read("target", 5))
