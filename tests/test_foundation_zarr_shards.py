"""Whole-shard writes encoded by storage.zarr_shards: the bytes zarr itself writes, read back by zarr."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zarr

from schemas.target import ArraySpec, TargetRecipe
from storage.targets import TargetStore
from storage.zarr_shards import shard_codec


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


def test_other_layouts_fall_back_to_zarr(tmp_path):
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 6), dtype="float32", chunks=(2, 6),
                              shards=(4, 6), fill_value=0)
    assert shard_codec(array) is None  # chunks of two clips: not the target store's layout
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 6), dtype="float32", chunks=(1, 6), fill_value=0)
    assert shard_codec(array) is None  # no sharding at all
