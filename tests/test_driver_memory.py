"""What the driver holds per clip and per object (issue 24): the export's shard plan as int64
arrays instead of per-clip Python lists, the finalize sweep of temporaries one folder at a time
instead of one info dict per object, and the shard table written from the cells without a
BytesIO copy; every stored byte is what it was."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from factories import make_version
from foresight.storage import fs, layout
from foresight.storage.exports import ShardClipTable
from foresight.storage.fs import Root, remove_dead_temporaries_under, temp_name
from foresight.storage.process import machine_tag
from foresight.storage.targets import SHARD_SUM, RECORDED, TargetStore, shard_table_parts


def np_save_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 2), (625, 11)])
def test_shard_table_pieces_are_the_bytes_np_save_writes(shape):
    cells = np.zeros(shape, SHARD_SUM)
    cells["flags"] = RECORDED
    cells["sha256"] = np.random.default_rng(0).bytes(32)
    pieces = shard_table_parts(cells)
    assert b"".join(bytes(piece) for piece in pieces) == np_save_bytes(cells)
    assert isinstance(pieces[1], memoryview) and pieces[1].nbytes == cells.nbytes  # a view, not a copy


def test_a_finalized_shard_table_is_np_save_of_its_cells(tmp_path):
    version = make_version(str(tmp_path), "teacher", "t.table", {"x": np.arange(40, dtype=np.float32)},
                           {"video": "video-000000000001"}, {})
    store = TargetStore(str(tmp_path))
    path = Path(store.root.path(layout.target_file(version, layout.TARGET_SHARDS)))
    manifest = json.loads(Path(store.root.path(layout.target_manifest(version))).read_text())
    data = path.read_bytes()
    assert data == np_save_bytes(store.shard_sums(store.manifest(version)).cells)
    assert manifest["shard_table"]["bytes"] == len(data) and len(data) - 49 * 10 in (128, 192)  # the .npy header
    assert store.open(version).verify() == []


def test_the_finalize_sweep_lists_one_folder_at_a_time(tmp_path, monkeypatch):
    """Dead writers' temporaries anywhere below the version go, a live one and every other file stay,
    and fsspec's find (an info dict per object, ~0.9 KB each) is not used on a local root."""
    root = Root(str(tmp_path))
    dead = f".tmp-{machine_tag()}-{os.getpid()}-1-0123abcd"  # this pid, another start: an exited writer
    deep, flat = tmp_path / "v" / "a" / "c" / "3" / "0", tmp_path / "v" / "seed" / "c"
    for folder in (deep, flat):
        folder.mkdir(parents=True)
        (folder / dead).write_bytes(b"half a shard")
        (folder / "0").write_bytes(b"a shard")
    live = deep / temp_name()
    live.write_bytes(b"being written")
    monkeypatch.setattr(type(root.fs), "find", lambda *a, **k: pytest.fail("find() listed the whole version"))
    removed = remove_dead_temporaries_under(root, "v")
    assert sorted(removed) == sorted([f"a/c/3/0/{dead}", f"seed/c/{dead}"])
    assert live.exists() and (deep / "0").exists() and (flat / "0").exists()
    assert remove_dead_temporaries_under(root, "absent") == []


def test_the_export_shard_plan_is_two_int64_arrays():
    shard_clips = [[0, 1, 2], [5, 6], [], [9, 100000]]
    table = ShardClipTable.of(shard_clips)
    assert len(table) == 4 and [table.clips(i) for i in range(4)] == shard_clips
    assert [table.size(i) for i in range(4)] == [3, 2, 0, 2]
    assert table.rows.dtype == np.int64 and table.rows.nbytes == 8 * 7
    assert table.starts.tolist() == [0, 3, 5, 5, 7]


def test_a_building_export_holds_its_plan_as_arrays(tmp_path, monkeypatch):
    """The driver's and every shard task's ExportOutput keep the recipe and a ShardClipTable, not the
    build plan's per-clip lists; the export it writes is unchanged (the same id and index as the plan's)."""
    from test_export_store import make_world

    from foresight.flows.export import EXPORT, ExportConfig, export_recipe, plan_export, write_shard
    from foresight.storage.exports import ExportStore

    world = make_world(tmp_path)
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], shard_size="12KB")
    recipe = export_recipe(world["root"], config)
    build = plan_export(world["root"], recipe)
    ExportStore(world["root"]).begin(build)
    output = EXPORT.reopen(world["root"], recipe.export_id())
    assert output.recipe == build.recipe and len(output.shard_plan) == len(build.shard_clips)
    assert [output.shard_plan.clips(i) for i in range(len(build.shard_clips))] == build.shard_clips
    held = [value for value in vars(output).values() if isinstance(value, (list, dict))]
    assert held == [] and output.shard_plan.rows.dtype == np.int64
    for shard in output.pending():
        write_shard(world["root"], recipe.export_id(), shard)
    output.finalize({})
    index = ExportStore(world["root"]).index(recipe.export_id())
    assert [shard.clips.tolist() for shard in index.shards] == build.shard_clips


def test_shard_tasks_of_one_process_parse_the_build_plan_once(tmp_path, monkeypatch):
    """Every shard task reopens the export; _build.json (every clip) is parsed once per process, and
    again only when the file changed (a build begun over again after its folder was deleted)."""
    from test_export_store import make_world

    from foresight.flows.export import EXPORT, ExportConfig, export_recipe, plan_export
    from foresight.storage.exports import ExportStore

    world = make_world(tmp_path)
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], shard_size="12KB")
    recipe = export_recipe(world["root"], config)
    ExportStore(world["root"]).begin(plan_export(world["root"], recipe))
    first = EXPORT.reopen(world["root"], recipe.export_id()).shard_plan
    reads: list[str] = []
    original = fs.Root.read_json
    monkeypatch.setattr(fs.Root, "read_json", lambda self, *a: reads.append(a[-1]) or original(self, *a))
    assert EXPORT.reopen(world["root"], recipe.export_id()).shard_plan is first and reads == []
    build_file = Path(Root(world["root"]).path(layout.export_file(recipe.export_id(), layout.EXPORT_BUILD)))
    build_file.write_text(build_file.read_text() + " ")  # another file: read again
    assert EXPORT.reopen(world["root"], recipe.export_id()).shard_plan is not first and len(reads) == 1
    build_file.unlink()
    with pytest.raises(ValueError, match="no build in progress"):
        EXPORT.reopen(world["root"], recipe.export_id()).shard_plan


def test_a_worker_thread_opens_an_exports_sources_once_and_checks_reads_again(tmp_path):
    """Each shard task of an export reads through its thread's ClipSource (opening one reads the
    whole plan and every version's shard table); what one task read and verified is verified again
    by the next, so a target object changed in between is still refused."""
    import threading

    from test_export_store import make_world

    from foresight.flows.export import ExportConfig, clip_source, export_recipe
    from foresight.storage.targets import shard_object

    world = make_world(tmp_path)
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], shard_size="12KB")
    recipe = export_recipe(world["root"], config)
    source = clip_source(world["root"], recipe)
    assert source.read([0, 1])[0].keys() == source.read([0])[0].keys()
    assert clip_source(world["root"], recipe) is source
    other: list = []
    thread = threading.Thread(target=lambda: other.append(clip_source(world["root"], recipe)))
    thread.start()
    thread.join()
    assert other[0] is not source
    store = TargetStore(world["root"])
    manifest = store.manifest(world["teacher"])
    target = Path(store.root.path(shard_object(manifest, manifest.arrays[0].name, 0)))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        clip_source(world["root"], recipe).read([0])


def test_a_version_on_an_object_store_is_not_listed_for_temporaries(monkeypatch):
    """On an object store every write of a version is one PUT (no temporary is ever made), so
    neither a shard's claim nor finalize lists the version's folders looking for them."""
    root_url = f"memory://no-temporaries-{os.getpid()}"
    listed: list[str] = []
    for name in ("ls", "find"):
        original = getattr(type(Root(root_url).fs), name)
        monkeypatch.setattr(type(Root(root_url).fs), name,
                            lambda self, path, *a, _o=original, **k: listed.append(path) or _o(self, path, *a, **k))
    version = make_version(root_url, "teacher", "t.object-store", {"x": np.arange(12, dtype=np.float32)},
                           {"video": "video-000000000001"}, {})
    writer = TargetStore(root_url).writer(version)
    assert writer.remove_stale_temporaries(0) == []
    assert not [path for path in listed if "/x" in path or path.rstrip("/").endswith(version)], listed
    assert TargetStore(root_url).open(version).verify() == []
