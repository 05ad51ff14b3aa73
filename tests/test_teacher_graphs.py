"""CUDA graphs of the teachers loop (pipelines/teachers/graphs.py): replays equal the eager batches
and the stored bytes equal those of the eager loop. GPU only; imports only the engine's own modules
(the device image runs it with few packages carried)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from foresight.flows import teachers_engine as engine
from foresight.flows import teachers_io
from foresight.pipelines.teachers import load_teacher
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage.targets import TargetStore

N, T, SIZE = 5, 3, 40


def write_fake_video(root: str) -> str:
    """A complete `video` version (frames, observed), 2 clips per shard."""
    rng = np.random.default_rng(1)
    data = {"frames": rng.integers(0, 256, (N, T, 48, 48, 3), dtype=np.uint8),
            "observed": rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)}
    arrays = [ArraySpec(name=name, shape=list(value.shape), dtype="uint8") for name, value in data.items()]
    recipe = TargetRecipe(kind="video", stage="test.fake-video", stage_version=1, params={}, inputs={"frames": "test"})
    writer = TargetStore(root).begin(recipe, arrays, N, shard_size=2)
    for shard in range(writer.num_shards):
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {k: v[clips.start:clips.stop] for k, v in data.items()})
    writer.finalize()
    return writer.version_id


@pytest.mark.gpu
@pytest.mark.parametrize("teacher_name", ["dinov2", "da3"])
def test_cuda_graph_replays_equal_eager_batches(teacher_name):
    """First batch of a shape eager, then captured graphs used in turn; every output equals the eager
    call on the same batch, also after the other graph replayed in between; a third shape runs eagerly."""
    from foresight.pipelines.teachers.graphs import GraphedBatches

    teacher = load_teacher(teacher_name, "tiny", device="cuda")

    def encode(frames, observed):
        target, reference = teacher.encode_clips(frames, observed)
        return {"target": target, "reference": reference}

    graphed = GraphedBatches(encode, copies=2, max_shapes=2)
    rng = np.random.default_rng(3)
    copy_stream = torch.cuda.Stream()
    for batch, clips in enumerate([3, 3, 3, 3, 3, 2, 2, 2, 1, 1]):
        frames = torch.from_numpy(rng.integers(0, 256, (clips, T, 48, 48, 3), dtype=np.uint8)).cuda()
        observed = torch.from_numpy(rng.integers(0, 256, (clips, SIZE, SIZE, 3), dtype=np.uint8)).cuda()
        outputs, slot = graphed(frames, observed)
        assert (slot is None) == (batch in (0, 5, 8, 9))  # first of each shape, and the third shape, eager
        copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(copy_stream):
            host = {name: tensor.to("cpu", non_blocking=False) for name, tensor in outputs.items()}
        done = torch.cuda.Event()
        done.record(copy_stream)
        graphed.release_after(slot, done)
        expected = encode(frames, observed)
        for name in expected:
            torch.testing.assert_close(host[name], expected[name].cpu(), rtol=0, atol=0)
    assert graphed.replays == 6 and graphed.failed is None


@pytest.mark.gpu
@pytest.mark.parametrize("store_codec", ["f16", "fp8"])
def test_encode_shards_with_cuda_graphs_stores_the_eager_bytes(tmp_path, store_codec):
    root = str(tmp_path)
    video = write_fake_video(root)
    teacher = load_teacher("dinov2", "tiny", device="cuda")
    reader = TargetStore(root).open(video)
    stored = {}
    for graphs in (False, True):
        writer = TargetStore(os.path.join(root, f"out-{graphs}")).begin(
            engine.teacher_recipe(teacher, video, store_codec=store_codec),
            engine.teacher_arrays(N, T, teacher, store_codec=store_codec), N, shard_size=4)
        result = engine.encode_shards(teacher, reader, teachers_io.ObservedFrames(root, reader), writer, [0, 1],
                                      batch=1, writers=2, readers=2, cuda_graphs=graphs)
        assert result.graph_replays == (N - 1 if graphs else 0) and result.graphs_failed is None
        writer.finalize()
        written = TargetStore(os.path.join(root, f"out-{graphs}")).open(writer.version_id)
        stored[graphs] = {name: written.read(name) for name in ("target", "reference")}
    for name in ("target", "reference"):
        np.testing.assert_array_equal(stored[True][name], stored[False][name])
