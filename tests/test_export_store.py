"""Export stage on real tiny stores: index.json, content addressing, stock webdataset, tamper and
version checks, splits. ``make_world`` / ``export_world`` are reused by tests/test_export_stream.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import foresight.pipelines.export
from foresight.flows.export import ExportConfig, export_recipe, plan_export, write_shard
from foresight.pipelines.export import decode_fp8, relative_l2
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.storage.episodes import EpisodeStore
from foresight.storage.exports import ExportStore, parse_members
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore

import factories

T, GRID, VIDEO_C, TEACHER_C, ACTION_D, STATE_D = 4, (4, 4), 8, 6, 4, 3
EPISODE_LEN = 12


# builders -------------------------------------------------------------------------------------
def make_dataset(root: Root, episodes: int = 3) -> EpisodeStore:
    """Dataset 'demo': episodes with random frames, actions and state; the last one is 'val'."""
    store = EpisodeStore(root, "demo")
    features = {"action": FeatureSpec(dtype="float32", shape=[ACTION_D]),
                "state": FeatureSpec(dtype="float32", shape=[STATE_D])}
    store.write_info(DatasetInfo(name="demo", source_kind="synthetic", source="tests", source_fingerprint="f" * 64,
                                 fps=10.0, cameras={"front": [8, 8, 3]}, features=features))
    rng = np.random.default_rng(1)
    for e in range(episodes):
        record = EpisodeRecord(episode_id=f"ep{e}", split="val" if e == episodes - 1 else "train", task="pick",
                               instructions=["pick the cube"], length=EPISODE_LEN, source_path=f"gen/ep{e}",
                               source_checksum=f"ep{e}")
        with store.writer(record, features) as writer:
            writer.append_frames("front", rng.integers(0, 256, (EPISODE_LEN, 8, 8, 3), dtype=np.uint8))
            writer.set_lowdim({"action": rng.standard_normal((EPISODE_LEN, ACTION_D)).astype(np.float32),
                               "state": rng.standard_normal((EPISODE_LEN, STATE_D)).astype(np.float32)})
    return store


def make_plan(root: Root, dataset: EpisodeStore, num_clips: int) -> str:
    return factories.make_demo_plan(root, dataset, num_clips, T, lambda i, _: i % EPISODE_LEN)


def make_version(root: Root, kind: str, stage: str, arrays: dict[str, np.ndarray], inputs: dict[str, str],
                 params: dict) -> str:
    return factories.make_version(root, kind, stage, arrays, inputs, params, shard_size=4)


def rendered_frames(num_clips: int, size: int = 8) -> np.ndarray:
    """(N, T, size, size, 3) frames of a flat scene with a moving square: they gzip like renders do."""
    frames = np.full((num_clips, T, size, size, 3), 90, dtype=np.uint8)
    for clip in range(num_clips):
        for t in range(T):
            frames[clip, t, t:t + size // 2, clip % 4:clip % 4 + size // 2] = (200, 60 + clip, 30)
    return frames


def make_video(root: Root, plan_id: str, num_clips: int, seed: int = 0, rendered: bool = False) -> str:
    rng = np.random.default_rng(seed)
    frames = rendered_frames(num_clips) if rendered else rng.integers(0, 256, (num_clips, T, 8, 8, 3), dtype=np.uint8)
    arrays = {"frames": frames,
              "onestep": rng.standard_normal((num_clips, T, *GRID, VIDEO_C)).astype(np.float16),
              "seed": np.arange(num_clips, dtype=np.int64) + seed}
    return make_version(root, "video", "svd.generate", arrays, {"plan": plan_id}, {"seed": seed})


def make_teacher(root: Root, video_id: str, num_clips: int, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    arrays = {"target": rng.standard_normal((num_clips, T, *GRID, TEACHER_C)).astype(np.float16),
              "reference": rng.standard_normal((num_clips, 1, *GRID, TEACHER_C)).astype(np.float16)}
    return make_version(root, "teacher", "teachers.dinov2", arrays, {"video": video_id}, {"seed": seed})


def make_world(tmp_path: Path, num_clips: int = 12, rendered: bool = False) -> dict[str, str]:
    """A root with dataset 'demo', a plan, a video version and a dinov2 teacher version over it
    (``rendered``: frames that gzip well instead of noise)."""
    root = Root(tmp_path / "root")
    dataset = make_dataset(root)
    plan_id = make_plan(root, dataset, num_clips)
    video_id = make_video(root, plan_id, num_clips, rendered=rendered)
    return {"root": root.url, "plan": plan_id, "video": video_id,
            "teacher": make_teacher(root, video_id, num_clips)}


def make_gzip_world(tmp_path: Path, num_clips: int = 12, **options) -> dict[str, str]:
    """A world with rendered frames and its fp8 export ("export"), whose frames are gzip'd members.

    The test frames are tiny, so the size threshold for gzip is lowered while exporting; readers
    need nothing special (the member name says .npy.gz).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(foresight.pipelines.export, "GZIP_MIN_BYTES", 256)
        world = make_world(tmp_path, num_clips, rendered=True)
        world["export"] = export_world(world, codec="fp8", **options)
    return world


def export_world(world: dict[str, str], **options) -> str:
    """Run the export stage's steps in-process (the flow's tasks without Prefect); returns the id."""
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], **options)
    recipe = export_recipe(world["root"], config)
    store = ExportStore(world["root"])
    if not store.exists(recipe.export_id()):
        store.begin(plan_export(world["root"], recipe))
        for shard in store.pending_shards(recipe.export_id()):
            write_shard(world["root"], recipe.export_id(), shard, config.read_batch)
        store.finalize(recipe.export_id())
    return recipe.export_id()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return make_world(tmp_path_factory.mktemp("export"))


# index and content addressing -----------------------------------------------------------------
def test_index_records_shards_versions_and_stats(world):
    export_id = export_world(world, shard_size="12KB")
    store = ExportStore(world["root"])
    index = store.index(export_id)
    assert index.num_samples == 12 and len(index.shards) > 1
    assert index.versions["onestep"] == world["video"] and index.versions["dinov2.target"] == world["teacher"]
    assert index.version_ids == sorted([world["video"], world["teacher"]])
    assert sorted(c for s in index.shards for c in s.clips) == list(range(12))
    root = Root(world["root"])
    for shard in index.shards:
        assert root.size(f"exports/{export_id}/{shard.name}") == shard.bytes
        assert root.sha256(f"exports/{export_id}/{shard.name}") == shard.sha256
    assert index.fields["actions"].shape == [10, ACTION_D] and index.fields["state"].shape == [STATE_D]
    assert len(index.stats["actions"].mean) == ACTION_D and index.stats["state"].count == 3 * EPISODE_LEN
    assert sorted(root.ls(f"exports/{export_id}")) == ["index.json", "samples.npy"] + [s.name for s in index.shards]
    assert store.verify(export_id) == []


def test_export_id_is_content_addressed_and_reruns_skip(world):
    first = export_world(world, shard_size="12KB")
    index_bytes = Root(world["root"]).read_bytes(f"exports/{first}/index.json")
    assert export_world(world, shard_size="12KB") == first
    assert Root(world["root"]).read_bytes(f"exports/{first}/index.json") == index_bytes
    assert export_world(world, shard_size="12KB", codec="fp8") != first
    assert export_world(world, shard_size="12KB", fields=["onestep"]) != first


def test_shards_are_byte_reproducible(tmp_path, world):
    export_id = export_world(world, shard_size="12KB")
    other = make_world(tmp_path)
    assert export_world(other, shard_size="12KB") == export_id
    mine, theirs = ExportStore(world["root"]).index(export_id), ExportStore(other["root"]).index(export_id)
    assert [s.sha256 for s in mine.shards] == [s.sha256 for s in theirs.shards]


def test_split_selects_episodes(world):
    store = ExportStore(world["root"])
    val = store.index(export_world(world, split="val"))
    train = store.index(export_world(world, split="train"))
    assert val.num_samples == 4 and train.num_samples == 8
    assert val.stats["actions"].count == EPISODE_LEN
    with pytest.raises(ValueError, match="no clips of split 'test'"):
        export_world(world, split="test")


# stock webdataset -----------------------------------------------------------------------------
def stock_decoded_samples(world: dict[str, str], export_id: str) -> list[dict]:
    """Every sample of an export's first shard through stock webdataset's default decoder."""
    import webdataset as wds

    store = ExportStore(world["root"])
    shard = store.index(export_id).shards[0]
    samples = list(wds.WebDataset(store.url(export_id, shard.name), shardshuffle=False, empty_check=False).decode())
    assert len(samples) == shard.samples
    return samples


def check_stock_sample(world: dict[str, str], sample: dict, codec: str, fields) -> None:
    """The stock-decoded sample holds every field as an ndarray, with the stored values."""
    reader = TargetStore(world["root"]).open(world["video"])
    meta = sample["json"]
    assert "." not in sample["__key__"] and meta["versions"]["onestep"] == world["video"]
    expected = reader.read("onestep", meta["clip_index"])
    if codec == "fp8":
        assert sample["onestep.fp8.npy"].dtype == np.uint8 and sample["onestep.fp8scale.npy"].dtype == np.uint8
        decoded = decode_fp8(sample["onestep.fp8.npy"], sample["onestep.fp8scale.npy"])
        assert relative_l2(decoded, expected) < 0.025
    elif codec == "bf16":
        assert sample["onestep.bf16.npy"].dtype == np.uint16
    else:
        np.testing.assert_array_equal(sample["onestep.npy"], expected)
    frames_key = next(k for k in sample if k.startswith("frames."))
    np.testing.assert_array_equal(sample[frames_key], reader.read("frames", meta["clip_index"]))
    arrays = [k for k in sample if k.endswith((".npy", ".npy.gz"))]
    assert all(isinstance(sample[k], np.ndarray) for k in arrays)
    decoded_fields = {k.split(".npy")[0].removesuffix(".fp8").removesuffix(".bf16")
                      for k in arrays if not k.endswith("fp8scale.npy")}
    assert decoded_fields == set(fields)


def test_stock_webdataset_decodes_every_field(world):
    for codec in ("f16", "bf16", "fp8"):
        export_id = export_world(world, codec=codec, shard_size="12KB")
        fields = ExportStore(world["root"]).index(export_id).fields
        for sample in stock_decoded_samples(world, export_id):
            check_stock_sample(world, sample, codec, fields)
            assert "frames.npy" in sample  # noise frames do not gzip: they stay plain .npy


def test_stock_webdataset_decodes_gzipped_frames(tmp_path):
    world = make_gzip_world(tmp_path, num_clips=6, shard_size="12KB")
    fields = ExportStore(world["root"]).index(world["export"]).fields
    for sample in stock_decoded_samples(world, world["export"]):
        assert "frames.npy.gz" in sample and "frames.npy" not in sample
        check_stock_sample(world, sample, "fp8", fields)


def test_gzipped_frames_stream_back_and_tampering_is_caught(tmp_path):
    from foresight.trainers.data import ShardStream

    world = make_gzip_world(tmp_path, num_clips=6, shard_size="40KB")
    store, pins = ExportStore(world["root"]), [world["video"], world["teacher"]]
    index = store.index(world["export"])
    video = TargetStore(world["root"]).open(world["video"])
    for sample in ShardStream(world["root"], world["export"], pins, verify=True):
        np.testing.assert_array_equal(sample["frames"], video.read("frames", sample["meta"]["clip_index"]))
    # Flip one byte inside the gzip'd frames of the first sample.
    shard = index.shards[0]
    path = Path(Root(world["root"]).path(f"exports/{world['export']}/{shard.name}"))
    with tarfile.open(path) as tar:
        member = tar.getmember(f"c{shard.clips[0]:09d}.frames.npy.gz")
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("corrupt" in p for p in store.verify(world["export"]))
    with pytest.raises(ValueError, match="checksum mismatch"):
        next(iter(ShardStream(world["root"], world["export"], pins, shuffle_shards=False, verify=True)))
    # Unverified (--no-verify), the damaged member is still caught when it is decoded.
    with pytest.raises(ValueError, match=r"frames.npy.gz: (corrupt|truncated)"):
        next(iter(ShardStream(world["root"], world["export"], pins, shuffle_shards=False, verify=False)))
    # Fields not selected are never inflated: the tampered member does not stop reading the others.
    first = next(iter(ShardStream(world["root"], world["export"], pins, fields=["onestep"], shuffle_shards=False,
                                  verify=False)))
    assert first["meta"]["clip_index"] == shard.clips[0] and "frames" not in first


def test_tar_members_are_plain_read_only_files(world):
    export_id = export_world(world, shard_size="12KB")
    store = ExportStore(world["root"])
    shard = store.index(export_id).shards[0]
    with store.open_shard(export_id, shard.name) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        members = list(tar)
    assert all(m.isfile() and m.mode == 0o444 and m.mtime == 0 and "/" not in m.name for m in members)


# integrity and versions -----------------------------------------------------------------------
def test_tampered_shard_is_detected(tmp_path):
    world = make_world(tmp_path, num_clips=6)
    export_id = export_world(world, shard_size="40KB")
    store = ExportStore(world["root"])
    shard = store.index(export_id).shards[0]
    path = Path(Root(world["root"]).path(f"exports/{export_id}/{shard.name}"))
    data = bytearray(path.read_bytes())
    start, end = shard.sample_range(0)
    data[end - 700] ^= 0x01  # one bit inside the last array payload of the first sample
    path.write_bytes(bytes(data))
    assert any("corrupt" in p and shard.name in p for p in store.verify(export_id))
    index = store.index(export_id)
    with pytest.raises(ValueError, match="checksum mismatch"):
        store.read_sample(index, 0, 0, verify=True)
    assert len(store.read_sample(index, 0, 1, verify=True)[1]) > 0  # other samples stay readable


def test_non_regular_tar_members_are_refused():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        link = tarfile.TarInfo("c000000000.onestep.npy")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ValueError, match="not a regular file"):
        parse_members(bytearray(buffer.getvalue()[:512]), "test")


def test_mixed_versions_are_refused(world):
    root = Root(world["root"])
    other_video = make_video(root, world["plan"], 12, seed=5)
    config = ExportConfig(plan=world["plan"], targets=[other_video, world["teacher"]])
    with pytest.raises(ValueError, match=f"computed from video '{world['video']}'.*refusing to mix"):
        export_recipe(world["root"], config)


def test_missing_or_incomplete_versions_are_refused(world):
    config = ExportConfig(plan=world["plan"], targets=["video-000000000000"])
    with pytest.raises(ValueError, match="'video-000000000000': not found"):
        export_recipe(world["root"], config)
    config = ExportConfig(plan=world["plan"], targets=[world["video"]], fields=["dinov2.target"])
    with pytest.raises(ValueError, match=r"fields \['dinov2.target'\] are not available"):
        export_recipe(world["root"], config)


def test_index_json_is_plain_json(world):
    export_id = export_world(world, shard_size="12KB")
    data = json.loads(Root(world["root"]).read_bytes(f"exports/{export_id}/index.json"))
    assert data["export_id"] == export_id and data["recipe"]["plan_id"] == world["plan"]
    assert {"shards", "versions", "stats", "num_samples", "total_bytes"} <= set(data)


def test_buffered_and_memory_mapped_reads_agree(world):
    from foresight.storage.exports import BufferPool

    export_id = export_world(world, shard_size="30KB")
    store = ExportStore(world["root"])
    index = store.index(export_id)
    shard = index.shards[0]
    pool = BufferPool(2)
    mapped = list(store.read_samples(index, 0, 0, shard.samples, verify=True))
    buffered = list(store.read_samples(index, 0, 0, shard.samples, verify=True, pool=pool, mmap=False))
    assert [c for c, _ in mapped] == [c for c, _ in buffered] == shard.clips.tolist()
    for (_, a), (_, b) in zip(mapped, buffered):
        assert [(n, bytes(p)) for n, p in a] == [(n, bytes(p)) for n, p in b]


def test_corrupt_tar_header_is_refused(world):
    export_id = export_world(world, shard_size="30KB")
    store = ExportStore(world["root"])
    index = store.index(export_id)
    start, end = index.shards[0].sample_range(0)
    with store.open_shard(export_id, index.shards[0].name) as handle:
        data = bytearray(handle.read(end))[start:]
    data[5] ^= 0x01  # a byte of the first member's name: the header checksum no longer matches
    with pytest.raises(ValueError, match="corrupt tar header"):
        parse_members(data, "shard-000000.tar")


def test_contiguous_runs():
    from foresight.storage.exports import contiguous_runs

    assert contiguous_runs([3, 4, 5, 9, 11, 12]) == [(3, 6), (9, 10), (11, 13)]
    assert contiguous_runs([]) == []
    assert contiguous_runs([2, 3, 4, 5, 7, 8], block=4) == [(2, 4), (4, 6), (7, 8), (8, 9)]
