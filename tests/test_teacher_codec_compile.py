"""The teachers loop's compiled fp8 store codec (float_codecs.compiled_fp8_encode_core): it gives the
eager kernels' bytes, it is used only where it does, and the loop stores the same bytes with it.
On the CPU through the aot_eager backend (traces the graph, runs the eager kernels); on CUDA
through inductor (marked gpu)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from test_teacher_graphs import N, T, write_fake_video

from foresight.flows import teachers_engine as engine
from foresight.flows import teachers_io
from foresight.pipelines import float_codecs
from foresight.pipelines.teachers import load_teacher
from foresight.storage.targets import TargetStore


def test_compiled_encoding_equals_the_eager_one_for_every_shape():
    """One dynamic graph for every batch size and row count (target and reference maps)."""
    assert float_codecs.compiled_fp8_is_exact([(2, 48, 8), (3, 5, 8)], "cpu", "aot_eager")
    values = torch.randn(4, 10, 6).mul(40).half()
    values[1, :, 2] = 0  # an all-zero channel: the smallest scale
    eager = float_codecs.fp8_encode_blocks(values)
    compiled = float_codecs.fp8_encode_blocks(values, compiled="aot_eager")
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def test_a_compiled_encoding_that_differs_is_not_used(tmp_path, monkeypatch, caplog):
    """compiled_codec keeps the eager encoding (and says so) where the compiled bytes differ or the
    compile fails; off CUDA it never compiles."""
    writer = fp8_writer(str(tmp_path), load_teacher("dinov2", "tiny"), write_fake_video(str(tmp_path)))
    assert engine.compiled_codec(writer, torch.device("cpu"), batch=2) is None
    monkeypatch.setattr(float_codecs, "compiled_fp8_is_exact", lambda shapes, device, backend: False)
    with caplog.at_level("WARNING"):
        assert engine.compiled_codec(writer, torch.device("cuda"), batch=2) is None
    assert "differs from the eager kernels' bytes" in caplog.text and writer.version_id in caplog.text
    caplog.clear()

    def no_compiler(shapes, device, backend):
        raise RuntimeError("no C compiler found\nmore detail")

    monkeypatch.setattr(float_codecs, "compiled_fp8_is_exact", no_compiler)
    with caplog.at_level("WARNING"):
        assert engine.compiled_codec(writer, torch.device("cuda"), batch=2) is None
    assert "could not be compiled (RuntimeError: no C compiler found)" in caplog.text
    shapes = []
    monkeypatch.setattr(float_codecs, "compiled_fp8_is_exact", lambda s, device, backend: shapes.extend(s) or True)
    assert engine.compiled_codec(writer, torch.device("cuda"), batch=2) == "inductor"
    assert shapes == [(clips, int(np.prod(spec.shape[1:-1])), spec.shape[-1]) for clips in (1, 2)
                      for spec in writer.manifest.arrays]
    teacher = load_teacher("dinov2", "tiny")
    f16 = TargetStore(str(tmp_path / "f16")).begin(engine.teacher_recipe(teacher, "v", store_codec="f16"),
                                                   engine.teacher_arrays(N, T, teacher), N, shard_size=4)
    assert engine.compiled_codec(f16, torch.device("cuda"), batch=2) is None  # nothing to compile


def fp8_writer(root: str, teacher, video: str, out: str = "out"):
    return TargetStore(os.path.join(root, out)).begin(
        engine.teacher_recipe(teacher, video, store_codec="fp8"),
        engine.teacher_arrays(N, T, teacher, store_codec="fp8"), N, shard_size=4)


def stored_with(root: str, teacher, video: str, backend: str | None) -> dict[str, np.ndarray]:
    writer = fp8_writer(root, teacher, video, f"out-{backend}")
    reader = TargetStore(root).open(video)
    engine.encode_shards(teacher, reader, teachers_io.ObservedFrames(root, reader), writer, [0, 1], batch=2,
                         writers=2, readers=2, codec_backend=backend)
    writer.finalize()
    written = TargetStore(os.path.join(root, f"out-{backend}")).open(writer.version_id)
    return {name: written.read(name) for name in ("target", "reference")}


def test_the_loop_stores_the_eager_bytes_with_the_compiled_codec_cpu(tmp_path):
    root = str(tmp_path)
    video = write_fake_video(root)
    teacher = load_teacher("dinov2", "tiny")
    eager, compiled = (stored_with(root, teacher, video, backend) for backend in (None, "aot_eager"))
    for name in eager:
        np.testing.assert_array_equal(compiled[name], eager[name])


@pytest.mark.gpu
def test_the_loop_stores_the_eager_bytes_with_the_compiled_codec_cuda(tmp_path):
    root = str(tmp_path)
    video = write_fake_video(root)
    teacher = load_teacher("dinov2", "tiny", device="cuda")
    writer = fp8_writer(root, teacher, video, "probe")
    assert engine.compiled_codec(writer, teacher.device, batch=2) == "inductor"  # inductor's bytes are eager's
    eager, compiled = (stored_with(root, teacher, video, backend) for backend in (None, "inductor"))
    for name in eager:
        np.testing.assert_array_equal(compiled[name], eager[name])


def test_the_loop_reuses_the_compile_of_the_check(tmp_path):
    """The check compiles in inference mode for the batch's shapes, as the loop encodes: no graph is
    compiled again inside the loop, also for a last batch of another size (dynamic shapes)."""
    from torch._dynamo.utils import counters

    root = str(tmp_path)
    video = write_fake_video(root)
    teacher = load_teacher("dinov2", "tiny")
    torch._dynamo.reset()
    probe = fp8_writer(root, teacher, video, "probe")
    shapes = []
    checked = float_codecs.compiled_fp8_is_exact
    with pytest.MonkeyPatch.context() as patch:  # what compiled_codec asks for, checked on the CPU
        patch.setattr(float_codecs, "compiled_fp8_is_exact",
                      lambda s, device, backend: shapes.extend(s) or checked(s, "cpu", "aot_eager"))
        assert engine.compiled_codec(probe, torch.device("cuda"), batch=2) == "inductor"
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1 and {clips for clips, _, _ in shapes} == {1, 2}
    stored_with(root, teacher, video, "aot_eager")  # batches of 2, 2 and 1 clips (shards of 4 and 1)
    assert counters["stats"]["unique_graphs"] == compiled
