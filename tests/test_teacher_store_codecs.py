"""Teacher versions stored in the export codecs (bf16, companded fp8): values within the codec's
bound, checksums and `targets verify` on coded shards, export, version ids, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from test_export_store import export_world, make_dataset, make_plan, make_video, stock_decoded_samples
from test_teachers_flow import config, write_episodes_and_plan, write_fake_video

from foresight.flows import teachers as tflow
from foresight.flows.cli import app
from foresight.flows.pipeline import TeacherSection
from foresight.flows.runtime import run_flow
from foresight.pipelines.float_codecs import decode_bf16, decode_fp8, encode_bf16, encode_fp8, fp8_error_bound
from foresight.pipelines.teachers import load_teacher
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage import audit
from foresight.storage.fs import Root
from foresight.storage.targets import SCALE_SUFFIX, TargetStore, shard_object

N, SHARD, SHAPE = 6, 4, (3, 4, 4, 8)  # clips, clips per shard, (T, h, w, C) of a clip
BF16_RELATIVE = 2.0 ** -8
"""bfloat16 keeps 8 significant bits: round to nearest is within half an ulp, 2**-8 of the value."""


def teacher_like(seed: int = 0) -> np.ndarray:
    """float16 (N, T, h, w, C) features with per-channel scales spread over two decades."""
    rng = np.random.default_rng(seed)
    scale_C = np.logspace(-1, 1, SHAPE[-1])
    return (rng.standard_normal((N, *SHAPE)) * scale_C).astype(np.float16)


def write_coded(root: str, codec: str, values: np.ndarray, shards: list[int] | None = None) -> str:
    """A teacher version of ``values`` stored in ``codec`` (only ``shards`` written when given:
    left building)."""
    recipe = TargetRecipe(kind="teacher", stage="teachers.dinov2", stage_version=1, params={"codec": codec},
                          inputs={"video": "video-000000000001"})
    writer = TargetStore(root).begin(recipe, [ArraySpec(name="target", shape=[N, *SHAPE], dtype="float16",
                                                        codec=codec)], N, SHARD)
    for shard in writer.pending_shards() if shards is None else shards:
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {"target": values[clips.start:clips.stop]})
    if shards is None:
        writer.finalize()
    return writer.version_id


def expected(codec: str, values: np.ndarray) -> np.ndarray:
    """What a reader of the coded version gets: per clip, the export codec's decode(encode(x))."""
    if codec == "bf16":
        return decode_bf16(encode_bf16(values)).astype(np.float16)
    return np.stack([decode_fp8(*encode_fp8(clip)) for clip in values])


@pytest.mark.parametrize("codec", ["bf16", "fp8"])
def test_coded_version_reads_back_within_the_codecs_bound(tmp_path, codec):
    values = teacher_like()
    version = write_coded(str(tmp_path), codec, values)
    reader = TargetStore(str(tmp_path)).open(version)
    read = reader.read("target")
    assert read.dtype == np.float16 and read.shape == values.shape
    np.testing.assert_array_equal(read, expected(codec, values))
    exact = values.astype(np.float64)
    if codec == "bf16":
        assert (np.abs(read - exact) <= BF16_RELATIVE * np.abs(exact)).all()
    else:
        for clip in range(N):
            _, scales = encode_fp8(values[clip])
            assert (np.abs(read[clip] - exact[clip]) <= fp8_error_bound(values[clip], scales)).all()
    # every selection decodes the same rows, verified or not
    np.testing.assert_array_equal(reader.read("target", 5), read[5])
    np.testing.assert_array_equal(reader.read("target", [4, 1, 4]), read[[4, 1, 4]])
    np.testing.assert_array_equal(TargetStore(str(tmp_path)).open(version, verify=False).read("target", slice(1, 5)),
                                  read[1:5])
    stored = reader.array("target")
    assert np.dtype(stored.dtype) == (np.uint16 if codec == "bf16" else np.uint8)
    parts = {"target", "target" + SCALE_SUFFIX} if codec == "fp8" else {"target"}
    assert set(reader.sums.by_shard()["0"]) == parts and set(reader.sums.by_shard(fast=True)["1"]) == parts


@pytest.mark.parametrize("part", ["target", "target" + SCALE_SUFFIX])
def test_a_flipped_byte_in_a_coded_shard_is_caught(tmp_path, part):
    root = str(tmp_path)
    version = write_coded(root, "fp8", teacher_like())
    store = TargetStore(root)
    path = Path(store.root.path(shard_object(store.manifest(version), part, 1)))
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"array '{part}', shard 1: checksum mismatch"):
        store.open(version).read("target", [5])
    np.testing.assert_array_equal(store.open(version).read("target", 0), expected("fp8", teacher_like())[0])
    assert audit.verify_version(store, version) == [f"{version}: array '{part}' shard 1 is corrupt (sha256 mismatch, "
                                                    f"{store.root.url_of(shard_object(store.manifest(version), part, 1))})"]
    result = CliRunner().invoke(app, ["targets", "verify", version, "--root", root])
    assert result.exit_code != 0 and "corrupt" in result.output


def test_resumed_coded_version_has_the_same_bytes(tmp_path):
    values = teacher_like(3)
    whole = write_coded(str(tmp_path / "a"), "fp8", values)
    resumed = write_coded(str(tmp_path / "b"), "fp8", values, shards=[1])
    assert resumed == whole
    assert TargetStore(str(tmp_path / "b")).writer(resumed).pending_shards() == [0]
    assert write_coded(str(tmp_path / "b"), "fp8", values) == whole  # begin() reopens, writes what is left
    a, b = (TargetStore(str(tmp_path / side)).open(whole) for side in ("a", "b"))
    assert b.manifest.status == "complete" and a.sums.by_shard() == b.sums.by_shard()
    assert a.sums.by_shard(fast=True) == b.sums.by_shard(fast=True) and a.sums.by_shard()


def coded_world(tmp_path: Path, codec: str) -> dict[str, str]:
    """The export tests' root (dataset, plan, video) with a teacher version stored in ``codec``."""
    root = Root(tmp_path / "root")
    plan = make_plan(root, make_dataset(root), 8)
    video = make_video(root, plan, 8)
    from test_export_store import GRID, T, TEACHER_C

    rng = np.random.default_rng(4)
    arrays = {"target": rng.standard_normal((8, T, *GRID, TEACHER_C)).astype(np.float16),
              "reference": rng.standard_normal((8, 1, *GRID, TEACHER_C)).astype(np.float16)}
    recipe = TargetRecipe(kind="teacher", stage="teachers.dinov2", stage_version=1, params={"store_codec": codec},
                          inputs={"video": video})
    specs = [ArraySpec(name=n, shape=list(a.shape), dtype="float16", codec=codec) for n, a in arrays.items()]
    writer = TargetStore(root).begin(recipe, specs, 8, shard_size=4)
    for shard in range(writer.num_shards):
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {n: a[clips.start:clips.stop] for n, a in arrays.items()})
    writer.finalize()
    return {"root": root.url, "plan": plan, "video": video, "teacher": writer.version_id}


@pytest.mark.parametrize("store_codec, export_codec", [("bf16", "f16"), ("bf16", "bf16"), ("fp8", "fp8"),
                                                       ("fp8", "f16")])
def test_export_of_a_coded_version(tmp_path, store_codec, export_codec):
    """Exports re-encode what the store decodes: f16 holds the decoded values exactly, bf16 and fp8
    exports of a store in the same codec hold the stored codes unchanged (no error added)."""
    world = coded_world(tmp_path, store_codec)
    export_id = export_world(world, codec=export_codec, shard_size="40KB")
    reader = TargetStore(world["root"]).open(world["teacher"])
    coded = TargetStore(world["root"]).open(world["teacher"])
    samples = stock_decoded_samples(world, export_id)
    assert samples
    for sample in samples:
        clip = sample["json"]["clip_index"]
        decoded = reader.read("target", clip)
        if export_codec == "f16":
            np.testing.assert_array_equal(sample["dinov2.target.npy"], decoded)
        elif export_codec == "bf16":
            np.testing.assert_array_equal(sample["dinov2.target.bf16.npy"], coded.array("target")[clip])
        else:
            np.testing.assert_array_equal(sample["dinov2.target.fp8.npy"], coded.array("target")[clip])
            np.testing.assert_array_equal(sample["dinov2.target.fp8scale.npy"],
                                          coded.array("target" + SCALE_SUFFIX)[clip])


@pytest.fixture(scope="module")
def teacher_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coded-teachers"))
    observed = write_episodes_and_plan(root)
    video, frames = write_fake_video(root)
    return root, video, frames, observed


def test_store_codec_keys_the_version_and_the_flow_stores_coded_values(teacher_world):
    root, video, frames, observed = teacher_world
    default = run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video))
    assert tflow.TEACHERS.recipe(root, config(video, store_codec="f16")).version_id() == default.version
    coded = run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video, store_codec="fp8"))
    assert coded.status == "complete" and coded.version != default.version
    store = TargetStore(root)
    manifest = store.manifest(coded.version)
    assert manifest.recipe.params["store_codec"] == "fp8" and "store_codec" not in store.manifest(
        default.version).recipe.params
    assert {spec.codec for spec in manifest.arrays} == {"fp8"} and store.open(coded.version).verify() == []
    direct_target, direct_ref = load_teacher("dinov2", "tiny").encode_clips(torch.from_numpy(frames),
                                                                           torch.from_numpy(observed))
    reader = store.open(coded.version)
    np.testing.assert_array_equal(reader.read("target"), expected("fp8", direct_target.numpy()))
    np.testing.assert_array_equal(reader.read("reference"), expected("fp8", direct_ref.numpy()))
    bf16 = run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video, store_codec="bf16"))
    assert len({default.version, coded.version, bf16.version}) == 3
    np.testing.assert_array_equal(store.open(bf16.version).read("target"), expected("bf16", direct_target.numpy()))


def test_store_codec_is_checked_in_config_pipeline_and_cli(teacher_world):
    root, video, _, _ = teacher_world
    with pytest.raises(ValueError, match="store_codec"):
        tflow.TeachersConfig(video=video, teacher="dinov2", model="tiny", store_codec="fp4")
    assert TeacherSection(teacher="dinov2", model="tiny", store_codec="bf16").store_codec == "bf16"
    with pytest.raises(ValueError, match="store_codec"):
        TeacherSection(teacher="dinov2", model="tiny", store_codec="int8")
    result = CliRunner().invoke(app, ["teachers", "--video", video, "--teacher", "dinov2", "--model", "tiny",
                                      "--store-codec", "fp4", "--root", root])
    assert result.exit_code == 2 and "fp4" in result.output
    with pytest.raises(ValueError, match="codec 'fp8' stores float values"):
        ArraySpec(name="frames", shape=[2, 3], dtype="uint8", codec="fp8")


def test_values_fp8_cannot_store_are_refused_naming_the_shard(tmp_path):
    values = teacher_like()
    values[5, 0, 1, 1, 2] = np.inf
    with pytest.raises(ValueError, match=r"shard 1, array 'target.fp8scale': rows \[1\] hold NaN, inf"):
        write_coded(str(tmp_path), "fp8", values)
    writer = TargetStore(str(tmp_path)).writer(TargetStore(str(tmp_path)).ids("teacher")[0])
    assert writer.pending_shards() == [1]  # shard 0 stored; shard 1 has no marker
    with pytest.raises(ValueError, match="uint8 .* given, expected uint16"):
        bits = np.zeros((2, *SHAPE), np.uint8)
        TargetStore(str(tmp_path / "b")).begin(
            TargetRecipe(kind="teacher", stage="teachers.dinov2", stage_version=1, params={}, inputs={}),
            [ArraySpec(name="target", shape=[N, *SHAPE], dtype="float16", codec="bf16")], N, SHARD
        ).write_shard(1, {"target": bits}, encoded=True)
