"""ShardStream and ZarrClips: exactly-once splits over ranks and workers, exact mid-epoch resume,
pinning, checksum verification while reading, and agreement with the target store."""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from test_export_store import export_world, make_video, make_world

from foresight.pipelines.export import relative_l2
from foresight.storage.exports import ExportStore
from foresight.storage.fs import Root
from foresight.storage.mapped import describe_views
from foresight.storage.targets import TargetStore
from foresight.trainers.data import (
    ShardStream,
    ZarrClips,
    ZeroCopyCollate,
    collate_samples,
    collate_zero_copy,
    fp8_to_float,
    reads_before,
    shuffle_buffer_order,
    worker_context,
)
from foresight.trainers.batching import ResumableLoader
from foresight.trainers.config import LoopConfig

NUM_CLIPS = 23


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    world = make_world(tmp_path_factory.mktemp("stream"), num_clips=NUM_CLIPS)
    world["export"] = export_world(world, shard_size="30KB")
    return world


def pins(world) -> list[str]:
    return [world["video"], world["teacher"]]


def clips_of(samples) -> list[int]:
    return [s["meta"]["clip_index"] for s in samples]


# the split ------------------------------------------------------------------------------------
def test_every_sample_exactly_once_across_2_ranks_x_2_workers(world):
    assert len(ExportStore(world["root"]).index(world["export"]).shards) >= 4
    seen, per_rank = [], []
    for rank in range(2):
        stream = ShardStream(world["root"], world["export"], pins(world), seed=3, shuffle_buffer=4,
                             rank=rank, world_size=2)
        stream.set_epoch(1)
        loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate_samples,
                            multiprocessing_context=worker_context())
        rank_clips = [meta["clip_index"] for batch in loader for meta in batch["meta"]]
        assert len(rank_clips) == len(stream)
        per_rank.append(len(rank_clips))
        seen += rank_clips
    assert sorted(seen) == list(range(NUM_CLIPS)) and max(Counter(seen).values()) == 1
    assert abs(per_rank[0] - per_rank[1]) <= 1


def test_epochs_reshuffle_and_seeds_repeat(world):
    def order(epoch: int, seed: int) -> list[int]:
        stream = ShardStream(world["root"], world["export"], pins(world), seed=seed, shuffle_buffer=5)
        stream.set_epoch(epoch)
        return clips_of(stream)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(1, 1) and sorted(order(1, 1)) == list(range(NUM_CLIPS))
    assert order(0, 1) != order(0, 2)
    stream = ShardStream(world["root"], world["export"], pins(world), seed=1, shuffle_buffer=5)
    assert clips_of(stream) == order(0, 1) and clips_of(stream) == order(1, 1)  # finished: moves on
    stream.set_epoch(0)
    assert clips_of(stream) == order(0, 1)


def test_persistent_workers_move_to_the_next_epoch(world):
    stream = ShardStream(world["root"], world["export"], pins(world), seed=4)
    loader = DataLoader(stream, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=collate_samples,
                        multiprocessing_context=worker_context())
    epochs, numbers = [], []
    for _ in range(2):
        metas = [meta for batch in loader for meta in batch["meta"]]
        epochs.append([m["clip_index"] for m in metas])
        numbers.append({m["stream"]["epoch"] for m in metas})
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_CLIPS)) and epochs[0] != epochs[1]
    assert numbers == [{0}, {1}]


def test_shuffle_buffer_order_is_a_permutation_that_respects_reads():
    rng = np.random.default_rng(0)
    for n, size in [(0, 4), (1, 4), (10, 0), (10, 1), (10, 3), (50, 8), (5, 50)]:
        order = shuffle_buffer_order(n, size, rng)
        assert sorted(order.tolist()) == list(range(n))
        for emission, position in enumerate(order):
            assert position < reads_before(emission, n, size)
            assert reads_before(emission, n, size) - emission <= max(size, 1)  # bounded buffer


# resuming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffer", [0, 6])
def test_resume_mid_epoch_yields_exactly_the_remaining_samples(world, buffer):
    def stream() -> ShardStream:
        s = ShardStream(world["root"], world["export"], pins(world), seed=7, shuffle_buffer=buffer)
        s.set_epoch(2)
        return s

    full = clips_of(stream())
    first = stream()
    iterator = iter(first)
    consumed = [next(iterator)["meta"]["clip_index"] for _ in range(9)]
    state = first.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    assert consumed + clips_of(resumed) == full


def test_resume_with_dataloader_workers_after_prefetch(world):
    """Through ResumableLoader (the one resume protocol): the loader's state after 4 batches, while
    the workers prefetched well past them, continues with exactly the batches an uninterrupted run reads."""
    loop = LoopConfig(batch_size=2, num_workers=2, prefetch_factor=4, device="cpu")

    def batches(state: dict | None, count: int) -> tuple[list[list[dict]], dict]:
        stream = ShardStream(world["root"], world["export"], pins(world), seed=11, shuffle_buffer=3)
        loader = ResumableLoader(collate_samples, stream, loop, torch.device("cpu"))
        if state is not None:
            loader.load_state_dict(state)
        taken = [next(iter(loader))["meta"] for _ in range(count)]
        loader.close()
        return taken, loader.state_dict()

    full, _ = batches(None, 12)  # 24 samples: the first epoch (23) and one of the next
    consumed, state = batches(None, 4)
    rest, _ = batches(state, 8)
    assert [[m["clip_index"] for m in b] for b in consumed + rest] == [[m["clip_index"] for m in b] for b in full]
    first_epoch = [m["clip_index"] for b in full for m in b if m["stream"]["epoch"] == 0]
    assert sorted(first_epoch) == list(range(NUM_CLIPS))
    with pytest.raises(ValueError, match="num_workers=2"):
        ResumableLoader(collate_samples, ShardStream(world["root"], world["export"], pins(world)),
                        loop.model_copy(update={"num_workers": 1}), torch.device("cpu")).load_state_dict(state)


def test_resume_refuses_another_stream_configuration(world):
    stream = ShardStream(world["root"], world["export"], pins(world), seed=1)
    other = ShardStream(world["root"], world["export"], pins(world), seed=2)
    with pytest.raises(ValueError, match="does not match this stream"):
        other.load_state_dict(stream.state_dict())


# pinning and integrity ------------------------------------------------------------------------
def test_version_mismatch_is_refused_clearly(world):
    other_video = make_video(Root(world["root"]), world["plan"], NUM_CLIPS, seed=9)
    with pytest.raises(ValueError, match=rf"pinned target versions \['{other_video}'\] are not in this source"):
        ShardStream(world["root"], world["export"], [other_video, world["teacher"]])
    with pytest.raises(ValueError, match=r"field '(onestep|dinov2\.target)' comes from target version .*not the pinned"):
        ShardStream(world["root"], world["export"], {"onestep": world["teacher"], "dinov2.target": world["video"]})
    with pytest.raises(ValueError, match="no target versions pinned"):
        ShardStream(world["root"], world["export"], [])
    only_teacher = ShardStream(world["root"], world["export"], [world["teacher"]], fields=["dinov2.target"])
    assert set(next(iter(only_teacher))) == {"__key__", "meta", "dinov2.target"}
    with pytest.raises(ValueError, match=f"field 'frames' comes from target version '{world['video']}'"):
        ShardStream(world["root"], world["export"], [world["teacher"]])


def test_verify_while_reading_detects_a_tampered_shard(tmp_path):
    world = make_world(tmp_path, num_clips=6)
    export_id = export_world(world, shard_size="40KB")
    store = ExportStore(world["root"])
    shard = store.index(export_id).shards[-1]
    path = Path(Root(world["root"]).path(f"exports/{export_id}/{shard.name}"))
    data = bytearray(path.read_bytes())
    data[shard.offsets[-1] + 1024] ^= 0x40
    path.write_bytes(bytes(data))
    unverified = ShardStream(world["root"], export_id, pins(world), shuffle_shards=False, verify=False)
    assert len(list(unverified)) == 6  # the flipped bit lands in array data: only checksums can tell
    verified = ShardStream(world["root"], export_id, pins(world), shuffle_shards=False, verify=True)
    with pytest.raises(ValueError, match=f"{shard.name}, sample {shard.samples - 1}.*checksum mismatch"):
        list(verified)


# content --------------------------------------------------------------------------------------
def test_samples_match_the_target_store_and_the_documented_format(world):
    video = TargetStore(world["root"]).open(world["video"])
    teacher = TargetStore(world["root"]).open(world["teacher"])
    stream = ShardStream(world["root"], world["export"], pins(world))
    samples = list(stream)
    assert len(samples) == NUM_CLIPS
    for sample in samples:
        clip = sample["meta"]["clip_index"]
        assert sample["__key__"] == f"c{clip:09d}"
        np.testing.assert_array_equal(sample["onestep"], video.read("onestep", clip))
        np.testing.assert_array_equal(sample["frames"], video.read("frames", clip))
        np.testing.assert_array_equal(sample["dinov2.reference"], teacher.read("reference", clip))
        assert sample["seed"].shape == () and sample["actions"].shape == (10, 4)
        assert sample["actions"].dtype == np.float32 and sample["actions_mask"].dtype == bool
        assert sample["meta"]["versions"]["dinov2.target"] == world["teacher"]
        assert sample["meta"]["codecs"]["onestep"] == "f16" and sample["meta"]["codecs"]["frames"] == "raw"
    assert set(stream.stats) == {"actions", "state"}
    batch = collate_samples(samples[:3])
    assert tuple(batch["onestep"].shape) == (3, *samples[0]["onestep"].shape)
    assert len(batch["meta"]) == 3


def test_actions_chunk_pads_past_the_episode_end(world):
    samples = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], world["export"], pins(world))}
    late = next(s for s in samples.values() if s["meta"]["start"] == 11)  # 12-frame episodes, chunk 10
    assert late["actions_mask"].tolist() == [True] + [False] * 9
    np.testing.assert_array_equal(late["actions"][1:], np.repeat(late["actions"][:1], 9, axis=0))


def test_fp8_stream_decodes_within_the_documented_error(world):
    export_id = export_world(world, shard_size="30KB", codec="fp8")
    video = TargetStore(world["root"]).open(world["video"])
    for sample in ShardStream(world["root"], export_id, pins(world), float_dtype="float32"):
        reference = video.read("onestep", sample["meta"]["clip_index"])
        assert sample["onestep"].dtype == np.float32
        assert relative_l2(sample["onestep"], reference) < 0.025
        np.testing.assert_array_equal(sample["frames"], video.read("frames", sample["meta"]["clip_index"]))


def test_fp8_codes_kept_for_gpu_decoding(world):
    export_id = export_world(world, shard_size="30KB", codec="fp8")
    decoded = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], export_id, pins(world))}
    coded = ShardStream(world["root"], export_id, pins(world), decode_fp8=False)
    batch = collate_samples(list(coded)[:3])
    assert batch["onestep"].dtype == torch.uint8 and tuple(batch["onestep.fp8scale"].shape) == (3, 8)
    assert batch["onestep.fp8scale"].dtype == torch.uint8  # E8M0 bytes: 1 byte per channel
    values = fp8_to_float(batch["onestep"], batch["onestep.fp8scale"], torch.float32)
    for row, meta in enumerate(batch["meta"]):
        expected = decoded[meta["clip_index"]]["onestep"].astype(np.float32)
        np.testing.assert_allclose(values[row].numpy(), expected, rtol=2 ** -10, atol=1e-6)
        single = fp8_to_float(batch["onestep"][row], batch["onestep.fp8scale"][row], torch.float32)
        torch.testing.assert_close(single, values[row], rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8 E8M0 scales.*re-export"):
        fp8_to_float(batch["onestep"], batch["onestep.fp8scale"].float())


def test_zarr_clips_random_access_matches_shard_stream(world):
    clips = ZarrClips(world["root"], world["plan"], pins(world), verify=True)
    assert len(clips) == NUM_CLIPS
    streamed = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], world["export"], pins(world))}
    for index in (0, 17, 22):
        sample = clips[index]
        assert sample["meta"]["clip_index"] == index and sample["meta"]["export_id"] is None
        for field in ("onestep", "frames", "dinov2.target", "dinov2.reference", "actions", "actions_mask", "state"):
            np.testing.assert_array_equal(sample[field], streamed[index][field])
    loader = DataLoader(clips, batch_size=4, shuffle=True, collate_fn=collate_samples)
    assert sorted(m["clip_index"] for b in loader for m in b["meta"]) == list(range(NUM_CLIPS))


def test_zarr_clips_refuses_mixed_versions(world):
    other_video = make_video(Root(world["root"]), world["plan"], NUM_CLIPS, seed=13)
    with pytest.raises(ValueError, match="refusing to mix versions"):
        ZarrClips(world["root"], world["plan"], [other_video, world["teacher"]])


# zero-copy hand-over from DataLoader workers ---------------------------------------------------
def mapped_file_of(array: np.ndarray) -> str | None:
    """File name of the np.memmap an array is a view of (following .base), None for a copy."""
    obj = array
    while obj is not None:
        if isinstance(obj, np.memmap):
            return obj.filename
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
    return None


def shard_files(world, export_id: str) -> set[str]:
    store = ExportStore(world["root"])
    return {store.root.path(f"exports/{export_id}/{shard.name}") for shard in store.index(export_id).shards}


def test_zero_copy_workers_yield_every_sample_once_with_the_in_process_bytes(world):
    expected = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], world["export"], pins(world))}
    stream = ShardStream(world["root"], world["export"], pins(world), seed=5, shuffle_buffer=3)
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=collate_zero_copy,
                        multiprocessing_context=worker_context())
    seen, workers, positions = [], set(), {}
    for sample in loader:
        clip = sample["meta"]["clip_index"]
        seen.append(clip)
        workers.add(sample["meta"]["stream"]["worker"])
        positions.setdefault(sample["meta"]["stream"]["worker"], []).append(sample["meta"]["stream"]["position"])
        assert sample["__key__"] == expected[clip]["__key__"]
        for field in ("onestep", "frames", "dinov2.target", "seed", "actions", "actions_mask", "state"):
            assert isinstance(sample[field], torch.Tensor)
            np.testing.assert_array_equal(sample[field].numpy(), expected[clip][field])
            assert sample[field].numpy().dtype == expected[clip][field].dtype
    assert sorted(seen) == list(range(NUM_CLIPS)) and len(seen) == len(set(seen))
    assert workers == {0, 1}
    assert all(sorted(p) == list(range(len(p))) for p in positions.values())  # each worker's positions, once


def test_zero_copy_arrays_in_the_main_process_are_private_views_of_the_shard(world):
    files = shard_files(world, world["export"])
    expected = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], world["export"], pins(world))}
    stream = ShardStream(world["root"], world["export"], pins(world), seed=2)
    loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=ZeroCopyCollate(as_tensors=False),
                        multiprocessing_context=worker_context())
    samples = [sample for batch in loader for sample in batch]  # batch_size=k: a list, not stacked
    assert sorted(s["meta"]["clip_index"] for s in samples) == list(range(NUM_CLIPS))
    for sample in samples:
        for field in ("onestep", "frames", "dinov2.reference", "actions"):
            assert mapped_file_of(sample[field]) in files, field  # a view of the shard file: no copy
            assert sample[field].flags.writeable
    first = samples[0]
    clip, original = first["meta"]["clip_index"], expected[first["meta"]["clip_index"]]["onestep"].copy()
    first["onestep"][...] = 0  # copy-on-write: the shard and later reads keep the stored bytes
    again = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], world["export"], pins(world))}
    np.testing.assert_array_equal(again[clip]["onestep"], original)


def test_zero_copy_keeps_copying_arrays_that_are_not_mapped(world):
    export_id = export_world(world, shard_size="30KB", codec="fp8")
    decoded = {s["meta"]["clip_index"]: s for s in ShardStream(world["root"], export_id, pins(world))}
    stream = ShardStream(world["root"], export_id, pins(world), fields=["onestep", "frames", "actions"])
    loader = DataLoader(stream, batch_size=None, num_workers=1, collate_fn=ZeroCopyCollate(as_tensors=False),
                        multiprocessing_context=worker_context())
    samples = list(loader)
    assert len(samples) == NUM_CLIPS
    for sample in samples:
        clip = sample["meta"]["clip_index"]
        assert mapped_file_of(sample["onestep"]) is None  # decoded from fp8 codes in the worker: copied
        assert mapped_file_of(sample["actions"]) in shard_files(world, export_id)
        for field in ("onestep", "frames", "actions"):
            np.testing.assert_array_equal(sample[field], decoded[clip][field])
    in_process = collate_zero_copy(next(iter(ShardStream(world["root"], export_id, pins(world)))))
    assert isinstance(in_process["onestep"], torch.Tensor) and isinstance(in_process["meta"], dict)


def test_descriptors_outside_the_file_or_of_unknown_files_are_refused(world):
    sample = next(iter(ShardStream(world["root"], world["export"], pins(world))))
    view = describe_views(sample)["onestep"]
    name = Path(view.region.path).name
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(view)), sample["onestep"])
    size = view.region.identity.size
    outside = dataclasses.replace(view.region, start=size - 100, length=4096)
    with pytest.raises(ValueError, match=rf"{name}.*\[{size - 100}, {size - 100 + 4096}\) is outside the file"):
        pickle.loads(pickle.dumps(outside))
    past_region = dataclasses.replace(view, offset=view.region.length)
    with pytest.raises(ValueError, match=rf"{name}: view of .* runs outside its mapped region"):
        pickle.loads(pickle.dumps(past_region))
    with pytest.raises(ValueError, match="may only hold numeric arrays"):
        pickle.loads(pickle.dumps(dataclasses.replace(view, dtype="|O")))
    stranger = dataclasses.replace(view.region, path=str(Path(world["root"]) / "index.json"))
    with pytest.raises(ValueError, match="index.json: not a shard file of an export read in this process"):
        pickle.loads(pickle.dumps(stranger))


def test_descriptors_of_a_changed_deleted_or_replaced_shard_are_refused(tmp_path):
    world = make_world(tmp_path, num_clips=4)
    export_id = export_world(world, shard_size="40KB")
    stream = ShardStream(world["root"], export_id, pins(world), shuffle_shards=False)
    sample = next(iter(stream))
    view = describe_views(sample)["onestep"]
    path = Path(view.region.path)
    data = path.read_bytes()
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # same bytes, modified in place
    with pytest.raises(ValueError, match=rf"{path.name}.*changed after the sender mapped it"):
        pickle.loads(pickle.dumps(view))
    path.unlink()
    with pytest.raises(ValueError, match=rf"{path.name}.*deleted or replaced"):
        pickle.loads(pickle.dumps(view))
    replacement = path.with_name(".tmp-replacement")
    replacement.write_bytes(data)  # the same bytes under a new inode: still not the file the worker mapped
    replacement.rename(path)
    with pytest.raises(ValueError, match=rf"{path.name}.*changed after the sender mapped it"):
        pickle.loads(pickle.dumps(view))
    fresh = describe_views(next(iter(ShardStream(world["root"], export_id, pins(world), shuffle_shards=False))))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fresh["onestep"])), sample["onestep"])
