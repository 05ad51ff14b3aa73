"""Verified reads checked ahead of the consumer (storage/lookahead.py, ExportStore.read_pieces): a
flipped byte is still refused on the first read, nothing after a refused sample is handed out, and a
stream left mid-epoch leaves no thread running."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
from test_export_store import export_world, make_world

from foresight.storage import exports, lookahead
from foresight.storage.exports import BufferPool, ExportStore
from foresight.storage.fs import Root
from foresight.storage.lookahead import PreparedAhead, helper_threads, prepared_lazily
from foresight.trainers.data import ShardStream

NUM_CLIPS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    world = make_world(tmp_path_factory.mktemp("lookahead"), num_clips=NUM_CLIPS)
    world["export"] = export_world(world, shard_size="40KB")
    return world


def pins(world) -> list[str]:
    return [world["video"], world["teacher"]]


def verify_threads(export_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"verify-{export_id}-") and t.is_alive()]


def flip_a_byte(world: dict[str, str], export_id: str, shard_position: int, sample: int) -> Path:
    """Flip one bit inside the array data of a sample (its tar headers stay valid)."""
    shard = ExportStore(world["root"]).index(export_id).shards[shard_position]
    path = Path(Root(world["root"]).path(f"exports/{export_id}/{shard.name}"))
    data = bytearray(path.read_bytes())
    data[shard.offsets[sample] + 1024] ^= 0x40
    path.write_bytes(bytes(data))
    return path


@pytest.fixture()
def tampered(tmp_path) -> dict[str, str]:
    world = make_world(tmp_path, num_clips=NUM_CLIPS)
    world["export"] = export_world(world, shard_size="40KB")
    index = ExportStore(world["root"]).index(world["export"])
    assert len(index.shards) >= 3
    world["shard"] = index.shards[1].name
    world["path"] = str(flip_a_byte(world, world["export"], 1, 0))
    world["before"] = index.shards[0].clips.tolist()  # what may reach the consumer: the samples before the flip
    return world


def test_a_flipped_byte_is_refused_on_the_first_read_with_the_look_ahead_on(tampered, monkeypatch):
    started = []
    original = lookahead.PreparedAhead.__init__

    def spy(self, items, prepare, depth, name="prepared-ahead", helpers=1):
        started.append((name, depth, helpers))
        original(self, items, prepare, depth, name, helpers)

    monkeypatch.setattr(lookahead.PreparedAhead, "__init__", spy)
    exports._VERIFIED._seen.clear()
    stream = ShardStream(tampered["root"], tampered["export"], pins(tampered), shuffle_shards=False)
    consumed = []
    with pytest.raises(ValueError) as refused:
        for sample in stream:
            consumed.append(sample["meta"]["clip_index"])
    # checked in the look-ahead threads, as many as this machine has cores beyond the consumer's (at most 3)
    assert started == [(f"verify-{tampered['export']}", exports.LOOKAHEAD, lookahead.helper_threads(exports.LOOKAHEAD))]
    message = str(refused.value)
    assert "\n" not in message and "checksum mismatch" in message
    assert f"export '{tampered['export']}', {tampered['shard']}, sample 0" in message
    assert Root(tampered["root"]).url_of(f"exports/{tampered['export']}/{tampered['shard']}") in message
    assert consumed == tampered["before"]  # every sample before the flipped one, and not that one
    assert verify_threads(tampered["export"]) == []


def test_a_flipped_byte_is_refused_by_a_buffered_read_checked_ahead(tampered):
    store = ExportStore(tampered["root"])
    index = store.index(tampered["export"])
    pieces = [(position, 0, shard.samples) for position, shard in enumerate(index.shards)]
    read = store.read_pieces(index, pieces, verify=True, pool=BufferPool(4), mmap=False, lookahead=2)
    consumed = []
    with pytest.raises(ValueError, match=f"{tampered['shard']}, sample 0 .*checksum mismatch"):
        for clip, _ in read:
            consumed.append(clip)
    assert consumed == tampered["before"]
    assert verify_threads(tampered["export"]) == []


def test_a_stream_stopped_mid_epoch_leaves_no_running_thread(world):
    exports._VERIFIED._seen.clear()
    stream = ShardStream(world["root"], world["export"], pins(world), shuffle_shards=False)
    samples = iter(stream)
    first = next(samples)
    assert verify_threads(world["export"]), "first read of the epoch: checked ahead in a thread"
    samples.close()
    assert verify_threads(world["export"]) == []
    # dropped without close (a loop left by break): the generator's finalizer stops the thread
    exports._VERIFIED._seen.clear()
    for sample in ShardStream(world["root"], world["export"], pins(world), shuffle_shards=False):
        break
    del sample
    gc.collect()
    assert verify_threads(world["export"]) == []
    assert first["meta"]["clip_index"] == ExportStore(world["root"]).index(world["export"]).shards[0].clips[0]


def test_look_ahead_keeps_the_order_and_resume_of_the_consumer_thread_check(world):
    def epoch(verify_ahead: int, shuffle_buffer: int = 3) -> list[int]:
        exports._VERIFIED._seen.clear()
        stream = ShardStream(world["root"], world["export"], pins(world), seed=5, shuffle_buffer=shuffle_buffer,
                             verify_ahead=verify_ahead)
        return [s["meta"]["clip_index"] for s in stream]

    assert epoch(4) == epoch(0) and sorted(epoch(1)) == list(range(NUM_CLIPS))
    exports._VERIFIED._seen.clear()
    stream = ShardStream(world["root"], world["export"], pins(world), seed=5, shuffle_buffer=3)
    samples = iter(stream)
    head = [next(samples)["meta"]["clip_index"] for _ in range(3)]
    state = stream.state_dict()
    samples.close()
    resumed = ShardStream(world["root"], world["export"], pins(world), seed=5, shuffle_buffer=3)
    resumed.load_state_dict(state)
    assert head + [s["meta"]["clip_index"] for s in resumed] == epoch(0)


def test_later_epochs_over_checked_samples_start_no_thread(world):
    exports._VERIFIED._seen.clear()
    stream = ShardStream(world["root"], world["export"], pins(world), shuffle_shards=False)
    list(stream)
    started = []
    for _ in ShardStream(world["root"], world["export"], pins(world), shuffle_shards=False):
        started.append(bool(verify_threads(world["export"])))
    assert started and not any(started)


def test_prepared_ahead_raises_in_order_and_wastes_at_most_depth():
    prepared = []

    def prepare(item: int) -> int:
        if item == 3:
            raise ValueError("item 3: refused")
        prepared.append(item)
        return item * 10

    out = []
    with pytest.raises(ValueError, match="item 3: refused"):
        for value in prepared_lazily(iter(range(6)), lambda item: True, prepare, depth=2, name="unit"):
            out.append(value)
    assert out == [0, 10, 20] and {0, 1, 2} <= set(prepared) <= {0, 1, 2, 4}  # 4: queued, maybe prepared

    items = iter(range(100))
    ahead = PreparedAhead(items, lambda item: item, depth=2, name="unit-bounded")
    assert next(ahead) == 0
    time.sleep(0.2)  # let the helper run ahead as far as it may (the bound holds however far it got)
    ahead.close()
    assert not ahead.running and next(items) == 3  # only the consumer takes items: 1 consumed + 2 queued
    with pytest.raises(ValueError, match="depth 0"):
        PreparedAhead(iter(()), lambda item: item, depth=0)


def test_several_helpers_prepare_the_next_items_at_once_each_exactly_once_in_order():
    # items 1-3 wait until three preparations run at once: the consumer can be at most one of them
    # (it prepares only the item it asks for), so this passes only with several helpers at work
    at_once = threading.Barrier(3, timeout=10)
    prepared: list[int] = []

    def prepare(item: int) -> int:
        if item in (1, 2, 3):
            at_once.wait()
        prepared.append(item)
        return item * 10

    ahead = PreparedAhead(iter(range(40)), prepare, depth=4, name="unit-helpers", helpers=3)
    assert list(ahead) == [item * 10 for item in range(40)]
    assert sorted(prepared) == list(range(40)) and not ahead.running
    with pytest.raises(ValueError, match="helpers 5 must be between 1 and depth 4"):
        PreparedAhead(iter(()), lambda item: item, depth=4, helpers=5)


def test_helper_threads_leave_the_consumer_a_core_and_stay_within_depth(monkeypatch):
    for cores, depth, expected in ((1, 4, 1), (2, 4, 1), (3, 4, 2), (16, 4, 3), (16, 2, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert helper_threads(depth) == expected
