"""Adversarial corpus, target versions (issue 23 rows D7, D9, D10, D11 and the fsync probe).

Each test tampers with a copy of one pristine tiny root and checks that the damage is refused with
one line naming the version, array and shard (or the file), and that nothing corrupt is copied on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import integrity_world as iw
from foresight.storage import layout, targets
from foresight.storage.exports import ExportStore
from foresight.storage.fs import FAST_HASH, DiskFullError, Root, temp_name
from foresight.storage.process import machine_tag
from foresight.storage.summary import root_summary
from foresight.storage.targets import TargetStore
from foresight.trainers.data import ZarrClips


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return iw.build(tmp_path_factory.mktemp("integrity") / "root")


@pytest.fixture()
def world(pristine, tmp_path):
    return iw.copy_world(pristine, tmp_path / "root")


# D7: a flipped byte in a complete version never reaches an export -------------------------------
def test_d7_export_refuses_a_flipped_byte_in_a_teacher_shard(world):
    iw.flip_byte(iw.shard_file(world, world["dinov2"], "target", 1), 200)
    with pytest.raises(ValueError) as err:
        iw.export(world, codec="bf16")  # a new export id: nothing cached
    line = iw.one_line(err.value)
    assert f"target version '{world['dinov2']}', array 'target', shard 1: checksum mismatch" in line
    assert ExportStore(world["root"]).ids() == [world["export"]]  # no second export was published
    assert iw.stray_temporaries(world["root"]) == []


@pytest.mark.parametrize("read", ["slice", "list", "int"])
def test_d7_every_read_path_checks_the_shard(world, read):
    iw.flip_byte(iw.shard_file(world, world["video"], "onestep", 0), 64)
    reader = TargetStore(world["root"]).open(world["video"])
    clips = {"slice": slice(0, 3), "list": [5, 1], "int": 2}[read]
    with pytest.raises(ValueError, match=f"'{world['video']}', array 'onestep', shard 0: checksum mismatch"):
        reader.read("onestep", clips)
    assert reader.read("frames", clips).shape[-1] == 3  # other arrays of the version still read
    unverified = TargetStore(world["root"]).open(world["video"], verify=False)
    try:  # --no-verify: only zstd's own frame check can still notice, as one line naming the shard
        unverified.read("onestep", clips)
    except ValueError as err:
        assert "array 'onestep', shard 0: chunk" in iw.one_line(err)


@pytest.mark.parametrize("through_reads", [True, False], ids=["hash-of-reads", "hash-of-map"])
def test_d7_both_hash_paths_refuse_a_flipped_byte_and_pass_intact_shards(world, monkeypatch, through_reads):
    monkeypatch.setattr(targets, "HASH_THROUGH_READS", through_reads)
    iw.flip_byte(iw.shard_file(world, world["dinov2"], "target", 1), 200)
    reader = TargetStore(world["root"]).open(world["dinov2"])
    plain = TargetStore(world["root"]).open(world["dinov2"], verify=False)
    np.testing.assert_array_equal(reader.read("target", slice(0, 2)), plain.read("target", slice(0, 2)))
    with pytest.raises(ValueError, match=f"'{world['dinov2']}', array 'target', shard 1: checksum mismatch"):
        reader.read("target", [reader.manifest.shard_size])


def test_d7_bytes_changed_in_place_while_in_use_are_refused_before_publication(world):
    """The campaign's case: a check passes, then the file is modified in place (bit rot, a stray
    writer) while a stage still uses the rows, which are views of the file: the block's
    publication refuses; a changed identity with the same bytes (touch) passes."""
    reader = TargetStore(world["root"]).open(world["text"])
    with targets.answering_for_reads():
        rows = reader.read("embedding", slice(0, 2))
        os.utime(iw.shard_file(world, world["text"], "embedding", 0))  # identity changes, bytes do not
        targets.confirm_reads_unchanged()
        reader.read("embedding", slice(0, 2))
        iw.flip_byte(iw.shard_file(world, world["text"], "embedding", 0), 100)
        with pytest.raises(ValueError) as err:
            targets.confirm_reads_unchanged()
        targets.confirm_reads_unchanged()  # reported once: the block's notes are clear again
    line = iw.one_line(err.value)
    assert f"target version '{world['text']}', array 'embedding', shard 0: the shard object changed while it was " \
           "being read" in line and str(iw.shard_file(world, world["text"], "embedding", 0)) in line
    assert rows.shape[0] == 2
    with pytest.raises(ValueError, match="the shard object changed while it was being read"):
        reader.read("embedding", slice(0, 2))  # outside a block the read itself still refuses it


def test_d7_a_shard_object_deleted_while_in_use_is_refused_and_reads_outside_a_block_are_not_noted(world):
    reader = TargetStore(world["root"]).open(world["text"])
    with targets.answering_for_reads():
        reader.read("embedding", slice(0, 2))
        os.unlink(iw.shard_file(world, world["text"], "embedding", 0))
        with pytest.raises(ValueError, match="array 'embedding', shard 0: the shard object went away while it"):
            targets.confirm_reads_unchanged()
    TargetStore(world["root"]).open(world["video"]).read("frames", slice(0, 2))  # no block: not noted
    iw.flip_byte(iw.shard_file(world, world["video"], "frames", 0), 100)
    with targets.answering_for_reads():
        targets.confirm_reads_unchanged()  # a later build shard does not answer for it


def test_d7_export_refuses_a_source_shard_changed_before_its_tar_is_published(world, monkeypatch):
    from foresight.storage.exports import ShardTarWriter

    real_publish, flipped = ShardTarWriter.publish, []

    def publish(self):
        if not flipped:  # the first tar's samples were read and checked: now their source changes
            iw.flip_byte(iw.shard_file(world, world["dinov2"], "target", 0), 300)
            flipped.append(True)
        return real_publish(self)

    monkeypatch.setattr(ShardTarWriter, "publish", publish)
    with pytest.raises(ValueError) as err:
        iw.export(world, codec="bf16")
    assert f"target version '{world['dinov2']}', array 'target', shard 0: the shard object changed" in \
        iw.one_line(err.value)
    assert ExportStore(world["root"]).ids() == [world["export"]] and iw.stray_temporaries(world["root"]) == []


@pytest.mark.parametrize("size", [0, 1, targets.HASH_READ_CHUNK - 1, targets.HASH_READ_CHUNK, 3 * targets.HASH_READ_CHUNK + 7])
def test_digest_of_reads_equals_the_digest_of_the_bytes(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "object"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as handle:
        assert targets.digest_of_reads(handle, FAST_HASH) == targets.fast_digest_of(data)
    with open(path, "rb", buffering=0) as handle:
        assert targets.digest_of_reads(handle, "sha256") == hashlib.sha256(data).hexdigest()


def test_d7_verified_reads_equal_unverified_reads(world):
    verified = TargetStore(world["root"]).open(world["dinov2"])
    plain = TargetStore(world["root"]).open(world["dinov2"], verify=False)
    for clips in (slice(None), slice(3, 11), [9, 2, 2, 15], 7):
        np.testing.assert_array_equal(verified.read("target", clips), plain.read("target", clips))


def test_d7_zarr_clips_refuse_a_flipped_byte(world):
    iw.flip_byte(iw.shard_file(world, world["dinov2"], "reference", 0), 10)
    clips = ZarrClips(world["root"], world["plan"], [world["video"], world["dinov2"]])
    with pytest.raises(ValueError, match="array 'reference', shard 0: checksum mismatch"):
        clips[0]


def test_missing_shard_object_is_refused(world):
    os.unlink(iw.shard_file(world, world["video"], "frames", 1))
    with pytest.raises(ValueError, match="array 'frames', shard 1: shard object is missing"):
        TargetStore(world["root"]).open(world["video"]).read("frames", slice(8, 9))


def test_flipped_bytes_are_caught_by_targets_verify(world):
    """Probe that already held: the audit hash (sha256) names the corrupt shard."""
    iw.flip_byte(iw.shard_file(world, world["text"], "embedding", 0), 5)
    problems = TargetStore(world["root"]).open(world["text"]).verify()
    assert problems == [f"{world['text']}: array 'embedding' shard 0 is corrupt (sha256 mismatch, "
                        f"{iw.shard_file(world, world['text'], 'embedding', 0)})"]


def test_a_folder_in_place_of_a_shard_object_is_one_line_and_verify_goes_on(world):
    path = iw.shard_file(world, world["dinov2"], "target", 0)
    os.unlink(path)
    os.mkdir(path)
    with pytest.raises(ValueError) as err:
        iw.export(world, codec="bf16")
    line = iw.one_line(err.value)
    assert f"target version '{world['dinov2']}', array 'target', shard 0: shard object cannot be read" in line
    assert str(path) in line
    problems = TargetStore(world["root"]).open(world["dinov2"]).verify()
    assert any("array 'target' shard 0 cannot be read" in p for p in problems)  # reported, not raised


# D9: ids are proven ------------------------------------------------------------------------------
def test_d9_an_edited_recipe_is_refused_on_open(world):
    manifest = Root(world["root"]).path(layout.target_dir(world["dinov2"]), layout.MANIFEST)
    iw.edit_json(Path(manifest), lambda m: m["recipe"]["params"].update(dtype="float32"))
    with pytest.raises(ValueError) as err:
        TargetStore(world["root"]).open(world["dinov2"])
    line = iw.one_line(err.value)
    assert f"target version '{world['dinov2']}' does not match its stored recipe" in line and manifest in line
    with pytest.raises(ValueError, match="does not match its stored recipe"):
        iw.export(world, codec="bf16")


def test_d9_targets_verify_reports_the_mismatch(world):
    from foresight.flows.cli.targets import _verify_problems

    path = Path(Root(world["root"]).path(layout.target_dir(world["text"]), layout.MANIFEST))
    iw.edit_json(path, lambda m: m["recipe"].update(stage_version=7))
    [problem] = _verify_problems(TargetStore(world["root"]), world["text"], skip_building=False)
    assert "does not match its stored recipe" in problem


def test_d9_a_manifest_copied_under_another_id_is_refused(world):
    root = Path(world["root"])
    (root / "targets" / "text-000000000000").mkdir()
    (root / "targets" / "text-000000000000" / "manifest.json").write_bytes(
        (root / "targets" / world["text"] / "manifest.json").read_bytes())
    with pytest.raises(ValueError, match="'text-000000000000' does not match its stored recipe"):
        TargetStore(world["root"]).manifest("text-000000000000")


@pytest.mark.parametrize("edit", [lambda spec: spec.update(dtype="uint16"), lambda spec: spec["shape"].__setitem__(1, 2)])
def test_d9_an_edited_array_layout_is_refused_on_read(world, edit):
    from foresight.storage.audit import verify_version

    """A manifest without its content digest (written before it existed) is still held to its arrays."""
    manifest = Path(Root(world["root"]).path(layout.target_dir(world["dinov2"]), layout.MANIFEST))
    iw.edit_json(manifest, lambda m: (edit(next(a for a in m["arrays"] if a["name"] == "reference")),
                                      m.pop("content_sha256")))
    with pytest.raises(ValueError) as err:
        iw.export(world, codec="bf16")
    line = iw.one_line(err.value)
    assert f"target version '{world['dinov2']}', array 'reference': stored " in line and "the manifest's" in line
    assert ExportStore(world["root"]).ids() == [world["export"]]
    assert any("array 'reference': stored " in p for p in verify_version(TargetStore(world["root"]), world["dinov2"]))


@pytest.mark.parametrize("edit", [lambda m: m.update(verified_inputs=False), lambda m: m.update(num_clips=3),
                                  lambda m: m["arrays"][0].update(dtype="uint16")])
def test_d9_an_edit_anywhere_in_a_manifest_is_refused(world, edit):
    manifest = Path(Root(world["root"]).path(layout.target_dir(world["video"]), layout.MANIFEST))
    iw.edit_json(manifest, edit)
    with pytest.raises(ValueError) as err:
        TargetStore(world["root"]).manifest(world["video"])
    assert f"{manifest}: content does not match its recorded content_sha256" in iw.one_line(err.value)


# D10: a truncated manifest names its file; info shows the rest of the root -----------------------
def test_d10_truncated_manifest_names_the_file_and_info_survives(world):
    path = Path(Root(world["root"]).path(layout.target_dir(world["video"]), layout.MANIFEST))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        TargetStore(world["root"]).manifest(world["video"])
    line = iw.one_line(err.value)
    assert str(path) in line and "malformed JSON at line" in line
    summary = root_summary(Root(world["root"]))
    status = {v["version"]: v["status"] for v in summary["targets"]}
    assert status[world["video"]] == "unreadable" and status[world["dinov2"]] == "complete"


def test_d10_a_folder_in_place_of_a_manifest_names_it_and_info_survives(world):
    path = Path(Root(world["root"]).path(layout.target_dir(world["video"]), layout.MANIFEST))
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match=f"{path}: cannot be read"):
        TargetStore(world["root"]).manifest(world["video"])
    status = {v["version"]: v["status"] for v in root_summary(Root(world["root"]))["targets"]}
    assert status[world["video"]] == "unreadable" and status[world["dinov2"]] == "complete"


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b""])
def test_d10_non_utf8_list_or_empty_manifest(world, content):
    path = Path(Root(world["root"]).path(layout.target_dir(world["text"]), layout.MANIFEST))
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        TargetStore(world["root"]).manifest(world["text"])
    assert str(path) in iw.one_line(err.value)


# D11: failures leave nothing behind ------------------------------------------------------------
def test_d11_atomic_write_removes_its_temporary_on_any_exception(tmp_path):
    root = Root(tmp_path)

    def parts():
        yield b"first part"
        raise KeyboardInterrupt  # not even an Exception: the temporary still goes

    with pytest.raises(KeyboardInterrupt):
        root.write_parts_atomic("a/b.bin", parts())
    assert iw.stray_temporaries(tmp_path) == [] and not root.exists("a/b.bin")


def test_d11_disk_full_is_one_line_with_path_and_bytes(tmp_path, monkeypatch):
    root = Root(tmp_path)
    real_open = open

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullFile(real_open(path, mode, *a, **k))
                        if ".tmp-" in str(path) and "w" in mode else real_open(path, mode, *a, **k))
    with pytest.raises(DiskFullError) as err:
        root.write_parts_atomic("targets/v/x.zarr/c/0", [b"x" * 1000])
    line = iw.one_line(err.value)
    assert line.startswith(f"disk full writing {tmp_path}/targets/v/x.zarr/c/0: 1000 bytes needed, ")
    with pytest.raises(DiskFullError) as err:  # lazily encoded parts: the ones not reached count too
        root.write_parts_atomic("targets/v/x.zarr/c/1", (b"y" * size for size in (300, 200, 100)))
    assert err.value.needed == 600 and ": 600 bytes needed, " in iw.one_line(err.value)
    monkeypatch.undo()
    assert iw.stray_temporaries(tmp_path) == []


def test_d11_rerun_removes_a_dead_writers_temporary_never_a_live_one(world):
    writer = TargetStore(world["root"]).writer(world["video"])
    folder = iw.shard_file(world, world["video"], "frames", 0).parent
    child = subprocess.Popen(["true"])  # a writer of this machine that has exited (kill -9 alike)
    child.wait()
    dead = f".tmp-{machine_tag()}-{child.pid}--0123abcd"
    (folder / dead).write_bytes(b"half a shard")
    live = folder / temp_name()  # this process: alive
    live.write_bytes(b"being written")
    writer._sweep_temporaries()
    assert not (folder / dead).exists() and live.exists()
    # Taking a shard's claim removes whatever is in its folders (only the claimer may write there).
    assert writer.remove_stale_temporaries(0) == [live.name]


def test_d11_data_is_fsynced_before_its_marker(tmp_path, monkeypatch):
    """Probe: the shard objects' bytes (file and folder) reach the disk before the _done marker."""
    import foresight.storage.fs as fs

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}"),
                                                    real_fsync(fd))[1])
    monkeypatch.setattr(fs.os, "replace", lambda a, b: (events.append(f"publish {b}"), real_replace(a, b))[1])
    root = tmp_path / "root"
    iw.tw.make_version(Root(root), "text", "text.clip", {"embedding": np.ones((4, 2), np.float16)}, {"plan": "p"}, {})
    [version] = TargetStore(root).ids()
    data = next(i for i, e in enumerate(events) if e.startswith("publish") and "/embedding.zarr/c/0/" in e)
    marker = next(i for i, e in enumerate(events) if e.startswith("publish") and e.endswith("/_done/0"))
    assert data < marker
    assert any(e.startswith("fsync") and ".tmp-" in e for e in events[:data])  # the file, before its rename
    folder = str(root / "targets" / version / "embedding.zarr" / "c" / "0")
    assert f"fsync {folder}" in events[data:marker]  # its folder, after the rename


# probes that already held ------------------------------------------------------------------------
def test_path_traversal_in_ids_is_refused(world):
    for bad in ("../../etc", "a/b", "v\x00"):
        with pytest.raises(ValueError, match="only letters, digits"):
            TargetStore(world["root"]).manifest(bad)
        with pytest.raises(ValueError, match="only letters, digits"):
            ExportStore(world["root"]).index(bad)


def test_complete_versions_are_immutable(world):
    from foresight.schemas.target import TargetRecipe

    manifest = TargetStore(world["root"]).manifest(world["text"])
    with pytest.raises(ValueError, match="complete and immutable"):
        TargetStore(world["root"]).begin(TargetRecipe(**manifest.recipe.model_dump()), manifest.arrays,
                                         manifest.num_clips, manifest.shard_size)


def test_shard_checksums_recorded_twice(world):
    """sha256 (audit) and xxh3 (read path) are both recorded for every shard of every array."""
    reader = TargetStore(world["root"]).open(world["video"])
    manifest, sha256, xxh3 = reader.manifest, reader.sums.by_shard(), reader.sums.by_shard(fast=True)
    assert set(sha256) == set(xxh3) == {"0", "1"}
    assert all(set(m) == {"frames", "onestep", "seed"} for m in (*sha256.values(), *xxh3.values()))
    assert json.loads(json.dumps(manifest.verified_inputs)) is True


def test_no_verify_is_recorded_in_the_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FORESIGHT_NO_VERIFY", "1")
    version = iw.tw.make_version(Root(tmp_path), "text", "text.clip", {"embedding": np.ones((4, 2), np.float16)},
                                 {"plan": "p"}, {})
    assert TargetStore(tmp_path).manifest(version).verified_inputs is False


def test_malicious_pickles_are_refused():
    """Probe that already held: the restricted unpickler admits no callables."""
    import pickle

    from foresight.pipelines.ingest.safe_pickle import restricted_loads

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with pytest.raises(Exception, match="not allowed|refus|forbidden|global"):
        restricted_loads(pickle.dumps(Evil()), "evil.npy")


def test_tar_members_that_are_links_are_refused():
    """Probe that already held: export shards are parsed from headers, links are never followed."""
    import tarfile

    from foresight.storage.exports import parse_ustar_header

    info = tarfile.TarInfo("sample.npy")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ValueError, match="not a regular file"):
        parse_ustar_header(info.tobuf(format=tarfile.USTAR_FORMAT), "shard-000000.tar")


def test_episode_files_are_fsynced_before_its_marker(tmp_path, monkeypatch):
    """Probe: every staged file of an episode (frame chunks, lowdim, record) reaches the disk before
    the staging folder is renamed into place and its _COMPLETE marker written."""
    import foresight.storage.fs as fs
    from factories import make_dataset, write_episode

    synced: set[str] = set()
    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")),
                                                    real_fsync(fd))[1])
    store = make_dataset(tmp_path, name="toy")
    staged: list[str] = []

    def record_rename(self, src_rel, dst_rel, _real=fs.Root.rename):
        if ".staging" in src_rel:
            folder = self.path(src_rel)
            staged.extend(os.path.join(d, f) for d, _, fs_ in os.walk(folder) for f in fs_)
            events.append(f"unsynced {sorted(p for p in staged if p not in synced)}")
        return _real(self, src_rel, dst_rel)

    monkeypatch.setattr(fs.Root, "rename", record_rename)
    write_episode(store, "ep0", length=9)
    assert any(p.endswith("lowdim.parquet") for p in staged) and any("/frames.zarr/" in p for p in staged)
    assert events == ["unsynced []"]
    assert store.episode_ids() == ["ep0"]


def test_d7_sequential_reads_check_the_next_shard_ahead_and_refuse_it_only_when_read(world):
    """Read from the first shard on, the next shard's check runs ahead in a helper thread; a
    corrupt shard fails there without a word and is refused with the usual line when it is read."""
    import threading

    from foresight.storage import targets

    reader = TargetStore(world["root"]).open(world["dinov2"])
    plain = TargetStore(world["root"]).open(world["dinov2"], verify=False)
    size, last = reader.manifest.shard_size, reader.manifest.num_shards - 1
    assert last >= 1, "the world needs 2 shards for a check to start ahead"
    checked_by = []
    check = targets.TargetReader._checked_object

    def spy(self, name, shard):
        checked_by.append((shard, threading.current_thread().name))
        return check(self, name, shard)

    iw.flip_byte(iw.shard_file(world, world["dinov2"], "target", last), 200)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(targets.TargetReader, "_checked_object", spy)
        for shard in range(last):
            rows = slice(shard * size, (shard + 1) * size)
            np.testing.assert_array_equal(reader.read("target", rows), plain.read("target", rows))
        future = reader._ahead["target"][last]
        assert isinstance(future.exception(timeout=60), ValueError)  # failed ahead, silently
        with pytest.raises(ValueError) as err:
            reader.read("target", slice(last * size, (last + 1) * size))
    assert f"array 'target', shard {last}: checksum mismatch" in iw.one_line(err.value)
    assert sorted(shard for shard, _ in checked_by) == list(range(last + 1))  # each shard checked once
    assert dict(checked_by)[last].startswith("shard-check")


def test_d7_check_ahead_starts_every_arrays_shard_check_at_once_and_refuses_only_when_read(world):
    """A reader about to read several arrays (the export's ClipSource) starts all their shard checks
    in helper threads first; a corrupt one fails there silently and is refused when it is read."""
    from foresight.storage import targets

    reader = TargetStore(world["root"]).open(world["dinov2"])
    plain = TargetStore(world["root"]).open(world["dinov2"], verify=False)
    size = reader.manifest.shard_size
    checked = []
    check = targets.TargetReader._checked_object

    def spy(self, name, shard):
        checked.append((name, shard))
        return check(self, name, shard)

    iw.flip_byte(iw.shard_file(world, world["dinov2"], "reference", 0), 40)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(targets.TargetReader, "_checked_object", spy)
        for name in ("target", "reference"):
            reader.check_ahead(name, 1)
            plain.check_ahead(name, 1)
        assert {name: sorted(started) for name, started in reader._ahead.items()} == {"target": [0], "reference": [0]}
        assert plain._ahead == {}  # an unverified reader checks nothing
        np.testing.assert_array_equal(reader.read("target", slice(0, size)), plain.read("target", slice(0, size)))
        with pytest.raises(ValueError) as err:
            reader.read("reference", slice(0, size))
    assert "array 'reference', shard 0: checksum mismatch" in iw.one_line(err.value)
    assert sorted(checked).count(("target", 0)) == 1 and sorted(checked).count(("reference", 0)) == 1
