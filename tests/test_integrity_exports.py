"""Adversarial corpus, exports (issue 23 rows D6, D8, D9, D10, D11, D12) and the plan stage (D5)."""

from __future__ import annotations

import errno
import functools
import json
import subprocess
from pathlib import Path

import pytest

import integrity_world as iw
from foresight.flows.generate import PlanConfig, make_plan
from foresight.storage.exports import ExportStore, ShardTarWriter
from foresight.storage.fs import DiskFullError
from foresight.storage.process import machine_tag
from foresight.trainers.data import ShardStream
from foresight.trainers.config import DataConfig


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return iw.build(tmp_path_factory.mktemp("integrity") / "root")


@pytest.fixture()
def world(pristine, tmp_path):
    return iw.copy_world(pristine, tmp_path / "root")


def pins(world):
    return [world["video"], world["dinov2"]]


def dead_temp(label: str = "") -> str:
    """The name a writer of this machine that was killed (here: exited) would have left."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f".tmp-{machine_tag()}-{child.pid}--0123abcd" + (f"-{label}" if label else "")


# D8: trainers verify by default ------------------------------------------------------------------
def test_d8_a_flipped_export_byte_stops_the_stream_by_default(world):
    index = ExportStore(world["root"]).index(world["export"])
    shard = index.shards[0]
    iw.flip_byte(iw.export_shard_file(world, 0), shard.offsets[1] + 700)
    with pytest.raises(ValueError) as err:
        list(ShardStream(world["root"], world["export"], pins(world), shuffle_shards=False))
    line = iw.one_line(err.value)
    assert f"export '{world['export']}', {shard.name}, sample 1" in line and "checksum mismatch" in line
    assert DataConfig().verify is True  # what `foresight train` reads with unless --no-verify


@pytest.mark.parametrize("pins", [None, "one-string", 3])
def test_stream_pins_of_the_wrong_type_are_one_line(world, pins):
    with pytest.raises(ValueError, match="pin versions as a list of ids or a"):
        ShardStream(world["root"], world["export"], pins)


def test_d8_no_verify_is_explicit_and_recorded(world, monkeypatch):
    monkeypatch.setenv("FORESIGHT_NO_VERIFY", "1")
    assert DataConfig().verify is False
    assert ShardStream(world["root"], world["export"], pins(world)).verify is False
    result = iw.export(world, codec="bf16")
    assert ExportStore(world["root"]).index(result.export_id).verified_inputs is False


def test_d8_a_verifying_run_audits_an_export_built_with_no_verify(world, monkeypatch, caplog):
    monkeypatch.setenv("FORESIGHT_NO_VERIFY", "1")
    result = iw.export(world, codec="bf16")  # inputs intact, but nobody checked them
    monkeypatch.delenv("FORESIGHT_NO_VERIFY")
    with caplog.at_level("WARNING"):
        assert iw.export(world, codec="bf16").export_id == result.export_id  # audited now, then reused
    assert "was built with --no-verify; its inputs" in caplog.text
    iw.flip_byte(iw.shard_file(world, world["dinov2"], "target", 1), 200)
    with pytest.raises(ValueError) as err:
        iw.export(world, codec="bf16")
    line = iw.one_line(err.value)
    assert f"{result.export_id} was built with --no-verify from {world['dinov2']}, which fails its checksums" in line


# D9 / D10: index.json is proven and parsed with its path ------------------------------------------
def test_d9_an_edited_export_recipe_is_refused(world):
    path = Path(world["root"]) / "exports" / world["export"] / "index.json"
    iw.edit_json(path, lambda index: index["recipe"].update(codec="bf16"))
    with pytest.raises(ValueError) as err:
        ExportStore(world["root"]).index(world["export"])
    line = iw.one_line(err.value)
    assert f"export '{world['export']}' does not match its stored recipe" in line and str(path) in line
    with pytest.raises(ValueError, match="does not match its stored recipe"):
        ShardStream(world["root"], world["export"], pins(world))


@pytest.mark.parametrize("edit", [lambda index: index["fields"][next(iter(index["fields"]))].update(shape=[1]),
                                  lambda index: index.update(num_samples=index["num_samples"] + 1),
                                  lambda index: index.update(verified_inputs=not index["verified_inputs"])])
def test_d9_an_edit_anywhere_in_index_json_is_refused(world, edit):
    path = Path(world["root"]) / "exports" / world["export"] / "index.json"
    iw.edit_json(path, edit)
    with pytest.raises(ValueError) as err:
        ExportStore(world["root"]).index(world["export"])
    assert f"{path}: content does not match its recorded content_sha256" in iw.one_line(err.value)


def test_d10_truncated_index_names_the_file(world):
    path = Path(world["root"]) / "exports" / world["export"] / "index.json"
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ValueError) as err:
        ExportStore(world["root"]).index(world["export"])
    assert str(path) in iw.one_line(err.value) and "malformed JSON at line" in str(err.value)


# D6 / D5: usage mistakes get the real reason -------------------------------------------------------
def test_d6_export_without_targets_is_refused(world):
    with pytest.raises(ValueError, match="no target versions given"):
        iw.export(world, targets=[])


def test_d5_plan_of_an_unknown_split_names_the_splits(world):
    with pytest.raises(ValueError, match=r"no episodes of split 'nosuch' \(splits present: \['train', 'val'\]\)"):
        make_plan(world["root"], PlanConfig(dataset="demo", frames=4, split="nosuch"))


def test_d5_plan_of_an_empty_dataset_says_so(world, tmp_path):
    import factories

    factories.make_dataset(world["root"], name="empty")
    with pytest.raises(ValueError, match="dataset 'empty': has no episodes"):
        make_plan(world["root"], PlanConfig(dataset="empty", frames=4))


# D11: disk full and killed writers leave nothing behind ------------------------------------------
class FullDevice:
    """A file handle on a device that fills up after ``room`` bytes."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_d11_disk_full_during_export_is_one_line_and_leaves_no_temporary(world, monkeypatch):
    real_init = ShardTarWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.handle = FullDevice(self.handle, 20_000)

    monkeypatch.setattr(ShardTarWriter, "__init__", init)
    with pytest.raises(DiskFullError) as err:
        iw.export(world, codec="bf16")
    line = iw.one_line(err.value)
    assert "disk full writing " in line and f"/shard-000000.tar: {err.value.needed} bytes needed" in line
    assert iw.stray_temporaries(world["root"]) == []
    monkeypatch.undo()
    result = iw.export(world, codec="bf16")  # space is back: the rerun completes
    assert ExportStore(world["root"]).verify(result.export_id) == [] and iw.stray_temporaries(world["root"]) == []
    shard = ExportStore(world["root"]).index(result.export_id).shards[0]
    assert err.value.needed > 20_000 and abs(err.value.needed - shard.bytes) <= 0.02 * shard.bytes  # the whole shard


def test_d11_killed_export_writer_leftovers_are_removed_by_the_rerun(world):
    config = iw.export_config(world, codec="bf16")
    from foresight.flows.export import export_recipe, plan_export, write_shard

    recipe = export_recipe(world["root"], config)
    store = ExportStore(world["root"])
    store.begin(plan_export(world["root"], recipe))
    write_shard(world["root"], recipe.export_id(), 0)
    folder = Path(world["root"]) / "exports" / recipe.export_id()
    for name in (dead_temp("shard-000001.tar"), dead_temp()):  # a half tar, a half json record
        (folder / name).write_bytes(b"half written")
    (folder / "_done" / dead_temp()).write_bytes(b"{")
    iw.export(world, codec="bf16")
    assert iw.stray_temporaries(world["root"]) == []
    assert sorted(p.name for p in folder.iterdir()) == \
        sorted([s.name for s in store.index(recipe.export_id()).shards] + ["index.json", "samples.npy"])


# D12: concurrent identical exports -------------------------------------------------------------------
def test_d12_two_identical_exports_at_once_both_succeed_writing_each_shard_once(world, tmp_path):
    codes, lines = iw.race([functools.partial(iw.export, world, codec="bf16", shard_size="20KB")] * 2,
                           tmp_path / "publish.log")
    assert codes == [0, 0], lines
    names = [line.split()[1] for line in lines]
    result = iw.export(world, codec="bf16", shard_size="20KB")
    assert result.skipped
    index = ExportStore(world["root"]).index(result.export_id)
    assert sorted(names) == sorted(s.name for s in index.shards)  # every shard published exactly once
    assert ExportStore(world["root"]).verify(result.export_id) == [] and iw.stray_temporaries(world["root"]) == []
    assert json.loads((Path(world["root"]) / "exports" / result.export_id / "index.json").read_text())["num_samples"]
