"""The export's sample table (samples.npy beside a small index.json, issue 24): it round-trips, exports
made before it (per-sample lists inside index.json) read the same, a damaged table is refused in one
line naming it, and the index costs 64 bytes a sample as one numpy array, not Python objects."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_export_store import export_world, make_world

from foresight.storage.exports import (SAMPLE_ROW, ExportStore, SampleTableFile, ShardEntry, parse_members,
                             parse_sample_table, sample_table_bytes)
from foresight.storage.fs import content_digest
from foresight.trainers.data import ShardStream
from foresight.trainers.exports import export_sample

NUM_CLIPS = 10


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, str]:
    world = make_world(tmp_path_factory.mktemp("index"), num_clips=NUM_CLIPS)
    world["export"] = export_world(world, shard_size="30KB")
    return world


@pytest.fixture()
def world(pristine, tmp_path) -> dict[str, str]:
    """A private copy of the pristine root (tests here damage its files)."""
    shutil.copytree(Path(pristine["root"]), tmp_path / "root")
    return {**pristine, "root": str(tmp_path / "root")}


def export_path(world: dict[str, str], name: str) -> Path:
    return Path(world["root"]) / "exports" / world["export"] / name


def pins(world: dict[str, str]) -> list[str]:
    return [world["video"], world["teacher"]]


def stream_samples(world: dict[str, str]) -> list[tuple[int, bytes]]:
    stream = ShardStream(world["root"], world["export"], pins(world), shuffle_shards=False)
    return [(s["meta"]["clip_index"], np.asarray(s["onestep"]).tobytes()) for s in stream]


def as_legacy(world: dict[str, str]) -> None:
    """Rewrite the export as a release before samples.npy wrote it: per-sample lists in index.json."""
    index = ExportStore(world["root"]).index(world["export"])
    data = json.loads(export_path(world, "index.json").read_text())
    for entry, shard in zip(data["shards"], index.shards, strict=True):
        del entry["xxh3"]
        entry.update(clips=shard.clips.tolist(), offsets=shard.offsets.tolist(),
                     sample_sha256=[bytes(r["sha256"]).hex() for r in shard.rows],
                     sample_xxh3=[bytes(r["xxh3"]).hex() for r in shard.rows])
    del data["sample_table"], data["content_sha256"]  # neither existed then
    export_path(world, "index.json").write_text(json.dumps(data))
    export_path(world, "samples.npy").unlink()


def test_sample_table_round_trips_and_points_at_each_sample(pristine):
    index = ExportStore(pristine["root"]).index(pristine["export"])
    assert len(index.shards) > 1 and index.sample_table.rows == index.num_samples == NUM_CLIPS
    stored = np.load(export_path(pristine, "samples.npy"), allow_pickle=False)
    assert stored.dtype == SAMPLE_ROW and np.array_equal(stored, index.sample_rows())
    assert sorted(stored["clip"].tolist()) == list(range(NUM_CLIPS))
    data = sample_table_bytes(stored)
    record = SampleTableFile(name="samples.npy", rows=len(stored), bytes=len(data),
                             sha256=hashlib.sha256(data).hexdigest(), row_dtype=str(SAMPLE_ROW.descr))
    assert np.array_equal(parse_sample_table(data, record, "t.npy"), stored)
    shard = index.shards[1]
    with ExportStore(pristine["root"]).open_shard(pristine["export"], shard.name) as handle:
        tar = handle.read()
    for position in range(shard.samples):  # each row's offset is the sample's first tar header
        start, end = shard.sample_range(position)
        assert parse_members(bytearray(tar[start:end]), shard.name)[0][0].startswith(f"c{shard.clip(position):09d}.")
        assert hashlib.sha256(tar[start:end]).digest() == bytes(shard.rows[position]["sha256"])
    assert len(json.loads(export_path(pristine, "index.json").read_text())["shards"][0]) == 6  # no per-sample lists


def test_an_export_made_before_the_table_reads_the_same(world):
    new_rows = ExportStore(world["root"]).index(world["export"]).sample_rows()
    new_samples = stream_samples(world)
    as_legacy(world)
    index = ExportStore(world["root"]).index(world["export"])
    assert index.sample_table is None and np.array_equal(index.sample_rows(), new_rows)
    assert stream_samples(world) == new_samples
    assert export_sample(world["root"], world["export"], ["onestep"], clip=3)["meta"]["clip_index"] == 3


def test_an_old_export_without_xxh3_is_checked_by_sha256(world):
    as_legacy(world)
    data = json.loads(export_path(world, "index.json").read_text())
    for entry in data["shards"]:
        entry["sample_xxh3"] = []
    data["shards"][0]["sample_sha256"][1] = "00" * 32
    export_path(world, "index.json").write_text(json.dumps(data))
    index = ExportStore(world["root"]).index(world["export"])
    assert not any(shard.xxh3 for shard in index.shards)
    with pytest.raises(ValueError, match=rf"{index.shards[0].name}, sample 1 .*checksum mismatch"):
        stream_samples(world)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_sample_table_is_refused_in_one_line_naming_it(world, damage):
    path = export_path(world, "samples.npy")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) - 30] ^= 0x01  # inside the last row's digests: the .npy still parses
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-64]))
    else:
        path.unlink()
    for read in (lambda: ExportStore(world["root"]).index(world["export"]),
                 lambda: ShardStream(world["root"], world["export"], pins(world))):
        with pytest.raises(ValueError) as err:
            read()
        line = str(err.value)
        assert "\n" not in line and str(path) in line
        assert ("missing" if damage == "missing" else "does not match index.json") in line


def test_a_table_that_does_not_add_up_to_the_shards_is_refused(world):
    rows = ExportStore(world["root"]).index(world["export"]).sample_rows()[:-1]
    data = sample_table_bytes(rows)
    export_path(world, "samples.npy").write_bytes(data)
    index = json.loads(export_path(world, "index.json").read_text())
    index["sample_table"].update(rows=len(rows), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    index["content_sha256"] = content_digest(index)  # a consistent index over a table one row short
    export_path(world, "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"samples.npy: {len(rows)} sample rows for {NUM_CLIPS} samples"):
        ExportStore(world["root"]).index(world["export"])


def test_the_index_holds_64_bytes_a_sample_in_one_array(pristine):
    index = ExportStore(pristine["root"]).index(pristine["export"])
    table = index.shards[0].rows.base
    assert all(shard.rows.base is table for shard in index.shards)  # views of one array, no copies
    assert table.nbytes == SAMPLE_ROW.itemsize * index.num_samples == 64 * NUM_CLIPS
    for shard in index.shards:  # per shard: scalars only, nothing that grows with its samples
        assert set(ShardEntry.model_fields) == set(shard.model_dump())
        assert all(isinstance(v, (int, str, bool)) for v in shard.model_dump().values())
