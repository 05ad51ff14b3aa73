"""Version ids follow docs/ARCHITECTURE.md, Version rules: the same recipe gives the same id; any keyed change
a new one."""

from __future__ import annotations

import pytest

from foresight.schemas.base import validate
from foresight.schemas.model import ModelIdentity, ModelSpec
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage.targets import TargetStore


def _recipe(**changes) -> TargetRecipe:
    model = ModelIdentity(spec="dir:/w", family="dinov2", source="dir", ref="/w", weights_sha256={"m.safetensors": "aa"})
    base = dict(kind="teacher", stage="teachers.dinov2", stage_version=1, model=model,
                params={"resolution": 224, "dtype": "bf16"}, inputs={"video": "video-0123456789ab"})
    base.update(changes)
    return TargetRecipe(**base)


def test_identical_recipes_share_an_id():
    assert _recipe().version_id() == _recipe().version_id()
    assert _recipe().version_id().startswith("teacher-") and len(_recipe().version_id()) == len("teacher-") + 12


def test_model_path_and_git_commit_are_not_identity():
    moved = ModelIdentity(spec="dir:/elsewhere", family="dinov2", source="dir", ref="/elsewhere",
                          weights_sha256={"m.safetensors": "aa"})
    assert _recipe(model=moved).version_id() == _recipe().version_id()


@pytest.mark.parametrize("change", [
    {"model": ModelIdentity(spec="dir:/w", family="dinov2", source="dir", ref="/w", weights_sha256={"m.safetensors": "bb"})},
    {"params": {"resolution": 448, "dtype": "bf16"}},
    {"params": {"resolution": 224, "dtype": "fp16"}},
    {"stage_version": 2},
    {"inputs": {"video": "video-ffffffffffff"}},
    {"model": ModelIdentity(spec="tiny", family="dinov2", source="tiny", seed=0, config={"hidden": 32})},
])
def test_any_keyed_change_gives_a_new_id(change):
    assert _recipe(**change).version_id() != _recipe().version_id()


def test_model_spec_parsing():
    assert ModelSpec.parse("hf:facebook/dinov2-with-registers-base@main").revision == "main"
    assert ModelSpec.parse("dir:/tmp/x").ref == "/tmp/x"
    assert ModelSpec.parse("tiny").source == "tiny"
    with pytest.raises(ValueError, match="model spec 'foo'"):
        ModelSpec.parse("foo")


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="unknown key 'colour'.*missing key 'stage'|missing key 'stage'.*unknown key 'colour'"):
        validate(TargetRecipe, {"kind": "video", "stage_version": 1, "colour": "red"}, "pipeline.toml")


def test_complete_versions_are_immutable(tmp_path):
    import numpy as np

    store = TargetStore(tmp_path)
    arrays = [ArraySpec(name="target", shape=[3, 2], dtype="float16")]
    writer = store.begin(_recipe(), arrays, num_clips=3, shard_size=2)
    for shard in writer.pending_shards():
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {"target": np.full((len(clips), 2), shard + 1.0)})
    writer.finalize()
    assert store.open(writer.version_id).verify() == []
    with pytest.raises(ValueError, match="complete and immutable"):
        store.begin(_recipe(), arrays, num_clips=3, shard_size=2)


def test_uncompressed_arrays_round_trip_under_the_same_id(tmp_path, caplog):
    import numpy as np

    values = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float16)
    stored = {}
    for codec in ("zstd", "none"):
        store = TargetStore(tmp_path / codec)
        arrays = [ArraySpec(name="target", shape=[3, 4, 8], dtype="float16", compression=codec)]
        writer = store.begin(_recipe(), arrays, num_clips=3, shard_size=2)
        shard = writer.pending_shards()[0]
        writer.write_shard(shard, {"target": values[writer.shard_clips(shard)]})
        # Resuming with another codec keeps the one the version was begun with, and says so.
        other = "none" if codec == "zstd" else "zstd"
        resumed = store.begin(_recipe(), [arrays[0].model_copy(update={"compression": other})], 3, 2)
        assert "compression" in caplog.text and resumed.manifest.arrays[0].compression == codec
        for shard in resumed.pending_shards():
            resumed.write_shard(shard, {"target": values[resumed.shard_clips(shard)]})
        resumed.finalize()
        reader = store.open(writer.version_id)
        assert reader.verify() == []
        np.testing.assert_array_equal(reader.read("target", slice(0, 3)), values)
        stored[codec] = (writer.version_id, store.root.du(f"targets/{writer.version_id}"))
    assert stored["zstd"][0] == stored["none"][0]  # storage only: the version id does not change
    assert stored["none"][1] >= values.nbytes
