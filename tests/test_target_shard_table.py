"""Shard tables (issue 24): a complete version records its shard checksums as columns in
``shards.npy`` beside manifest.json (named and checksummed by it) instead of per-shard JSON objects.

Versions finalized before the table (checksums in the manifest's ``shards`` / ``shard_xxh3``) still
read, verify and export; a flipped, truncated or missing table is refused in one line naming the
file and the version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import integrity_world as iw
from foresight.flows.cli import app
from foresight.schemas.target import TargetRecipe
from foresight.storage import audit, layout, targets
from foresight.storage.fs import Root
from foresight.storage.summary import root_summary
from foresight.storage.targets import SHARD_SUM, TargetStore
from factories import make_version


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return iw.build(tmp_path_factory.mktemp("shard-table") / "root")


@pytest.fixture()
def world(pristine, tmp_path):
    return iw.copy_world(pristine, tmp_path / "root")


def version_file(world: dict[str, str], version: str, name: str) -> Path:
    return Path(Root(world["root"]).path(layout.target_file(version, name)))


def to_legacy(world: dict[str, str], version: str) -> None:
    """Rewrite a version as versions finalized before the shard table were: its checksums in the
    manifest's ``shards`` / ``shard_xxh3``, no shards.npy."""
    sums = TargetStore(world["root"]).open(version).sums
    iw.edit_json(version_file(world, version, layout.MANIFEST),
                 lambda m: m.update(shards=sums.by_shard(), shard_xxh3=sums.by_shard(fast=True)) or
                 (m.pop("shard_table"), m.pop("content_sha256")))  # neither existed then
    os.unlink(version_file(world, version, layout.TARGET_SHARDS))


def test_a_complete_version_records_its_shards_as_columns(world):
    reader = TargetStore(world["root"]).open(world["video"])
    manifest = json.loads(version_file(world, world["video"], layout.MANIFEST).read_text())
    parts = ["frames", "onestep", "seed"]
    assert manifest["shards"] == {} and manifest["shard_xxh3"] == {}
    assert manifest["shard_table"]["name"] == layout.TARGET_SHARDS and manifest["shard_table"]["parts"] == parts
    cells = np.load(version_file(world, world["video"], layout.TARGET_SHARDS), allow_pickle=False)
    assert cells.dtype == SHARD_SUM and cells.shape == (reader.manifest.num_shards, len(parts))
    # the per-shard records are columns: 49 bytes a shard and part, no per-shard objects
    assert SHARD_SUM.itemsize == 49 and reader.sums.cells.nbytes == 49 * len(parts) * reader.manifest.num_shards
    assert isinstance(reader.sums.cells, np.ndarray) and reader.sums.cells.dtype == SHARD_SUM
    assert set(reader.sums.by_shard()) == set(reader.sums.by_shard(fast=True)) == {"0", "1"}
    assert reader.verify() == []


def test_the_manifest_does_not_grow_with_the_shards(tmp_path):
    """Only the table grows (49 bytes a shard and part): manifest.json is the same size at 2 and at 40 shards."""
    sizes, tables = [], []
    for shard_size in (20, 1):
        version = make_version(str(tmp_path), "teacher", "t.grow", {"x": np.arange(40, dtype=np.float32)},
                               {"video": "video-000000000001"}, {"s": shard_size}, shard_size=shard_size)
        sizes.append(os.path.getsize(Root(tmp_path).path(layout.target_manifest(version))))
        tables.append(os.path.getsize(Root(tmp_path).path(layout.target_file(version, layout.TARGET_SHARDS))))
    assert abs(sizes[1] - sizes[0]) <= 4  # digits of shard_size and of the table's size and row count
    assert tables[1] - tables[0] == 49 * 38


def test_markers_are_read_in_batches_into_the_same_table(tmp_path, monkeypatch):
    values = {"x": np.arange(40, dtype=np.float32), "y": np.ones((40, 3), np.uint8)}
    whole = make_version(str(tmp_path / "a"), "teacher", "t.batch", values, {"video": "video-000000000001"}, {},
                         shard_size=3)
    monkeypatch.setattr(targets, "MARKER_BATCH", 4)  # 14 shards: 4 batches, the last one short
    batched = make_version(str(tmp_path / "b"), "teacher", "t.batch", values, {"video": "video-000000000001"}, {},
                           shard_size=3)
    assert whole == batched
    a, b = (Root(tmp_path / side).path(layout.target_file(whole, layout.TARGET_SHARDS)) for side in ("a", "b"))
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_an_old_manifest_still_reads_verifies_and_exports(world):
    video = world["video"]
    before = TargetStore(world["root"]).open(video).read("onestep")
    to_legacy(world, video)
    reader = TargetStore(world["root"]).open(video)
    assert reader.manifest.shard_table is None and set(reader.manifest.shards) == {"0", "1"}
    np.testing.assert_array_equal(reader.read("onestep"), before)
    assert reader.verify() == [] and audit.verify_version(TargetStore(world["root"]), video) == []
    assert iw.export(world, codec="bf16").status == "complete"  # a new export reads it, verified
    for args in (["targets", "verify", "--all"], ["info"], ["targets", "show", video]):
        result = CliRunner().invoke(app, [*args, "--root", world["root"]])
        assert result.exit_code == 0, (args, result.output)
    assert {v["version"]: v["status"] for v in root_summary(Root(world["root"]))["targets"]}[video] == "complete"
    iw.flip_byte(iw.shard_file(world, video, "onestep", 1), 64)
    with pytest.raises(ValueError, match=f"'{video}', array 'onestep', shard 1: checksum mismatch"):
        TargetStore(world["root"]).open(video).read("onestep", slice(8, 10))
    assert TargetStore(world["root"]).open(video).verify() == [
        f"{video}: array 'onestep' shard 1 is corrupt (sha256 mismatch, {iw.shard_file(world, video, 'onestep', 1)})"]


def test_old_and_new_manifests_record_the_same_checksums(world):
    new = TargetStore(world["root"]).open(world["dinov2"]).sums
    to_legacy(world, world["dinov2"])
    old = TargetStore(world["root"]).open(world["dinov2"]).sums
    assert old.parts == new.parts and np.array_equal(old.cells, new.cells)


def damage(path: Path, how: str) -> None:
    if how == "flip":
        iw.flip_byte(path, path.stat().st_size - 7)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-49])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_a_damaged_shard_table_is_refused_in_one_line(world, how):
    video = world["video"]
    table = version_file(world, video, layout.TARGET_SHARDS)
    damage(table, how)
    with pytest.raises(ValueError) as err:
        TargetStore(world["root"]).open(video).read("frames", 0)
    line = iw.one_line(err.value)
    assert str(table) in line and f"shard table of target version '{video}'" in line
    assert ("is missing" if how == "missing" else "does not match its manifest") in line
    [problem] = TargetStore(world["root"]).open(video).verify()
    assert problem == line
    result = CliRunner().invoke(app, ["targets", "verify", video, "--root", world["root"]])
    assert result.exit_code != 0 and line in result.output
    with pytest.raises(ValueError, match="shard table of target version"):
        iw.export(world, codec="bf16")


def test_a_table_of_another_layout_is_refused(world):
    """A table whose bytes match a manifest that was edited to another shard count is still refused
    (its content digest dropped too, or that would refuse the edit first)."""
    path = version_file(world, world["text"], layout.MANIFEST)
    iw.edit_json(path, lambda m: (m["shard_table"].update(rows=m["shard_table"]["rows"] + 1), m.pop("content_sha256")))
    with pytest.raises(ValueError, match=f"manifest of target version '{world['text']}' records a shard table"):
        TargetStore(world["root"]).open(world["text"]).read("embedding", 0)


def test_version_ids_do_not_depend_on_the_table(world):
    manifest = TargetStore(world["root"]).manifest(world["video"])
    assert manifest.shard_table is not None
    assert TargetRecipe.model_validate(manifest.recipe.model_dump()).version_id() == world["video"]
