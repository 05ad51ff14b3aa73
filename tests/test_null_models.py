"""The ``null`` model of every stage: shapes as declared, deterministic, keyed ``null``, and refused
by exports and trainers unless explicitly allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foresight.flows.generate import TextConfig, text_recipe, video_arrays
from foresight.pipelines import pi0
from foresight.pipelines.null_models import pattern
from foresight.pipelines.svd import generate_clips, load_svd
from foresight.pipelines.svd.loading import describe_svd
from foresight.pipelines.svd.sampler import SVDParams
from foresight.pipelines.teachers import load_teacher
from foresight.pipelines.text import embed_instructions, load_text_model
from foresight.schemas.model import ModelIdentity, ModelSpec
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage.exports import ExportStore, resolve_sources
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore
from factories import make_dataset, write_episode

CLIPS = 6


def test_null_is_a_spec_whose_identity_is_never_real():
    spec = ModelSpec.parse(" null ")
    assert (spec.source, str(spec)) == ("null", "null")
    identity = load_text_model("null").identity
    assert identity.source == "null" and identity.is_null and not identity.is_real
    tiny = load_text_model("tiny").identity
    assert identity.key() != tiny.key()
    config = TextConfig(plan="plan-000000000000", model="null")
    assert text_recipe(config, identity).version_id() != text_recipe(config, tiny).version_id()


def test_pattern_is_deterministic_and_differs_by_salt():
    a = pattern(np.array([3, 4]), (2, 5), np.float16)
    assert a.shape == (2, 2, 5) and a.dtype == np.float16
    assert np.array_equal(a, pattern(np.array([3, 4]), (2, 5), np.float16))
    assert not np.array_equal(a[0], a[1])


def test_null_text_states_follow_the_instructions():
    model = load_text_model("null")
    states = embed_instructions(model, ["reach", "push", "reach"], max_length=20)
    assert states.shape == (3, 20, model.width) and states.dtype == np.float32
    assert np.array_equal(states[0], states[2]) and not np.array_equal(states[0], states[1])


def test_null_svd_writes_the_declared_video_arrays():
    params = SVDParams(num_frames=3, size=32, steps=1)
    desc = describe_svd("null")
    assert desc.identity.source == "null"
    declared = {spec.name: spec for spec in video_arrays(desc, params, 4)}
    out = generate_clips(load_svd("null"), params, None, None, np.arange(4, dtype=np.int64))
    assert list(out.frames.shape) == declared["frames"].shape and out.frames.dtype == np.uint8
    assert list(out.onestep.shape) == declared["onestep"].shape and out.onestep.dtype == np.float16
    again = generate_clips(load_svd("null"), params, None, None, np.arange(4, dtype=np.int64))
    assert np.array_equal(out.onestep, again.onestep)


@pytest.mark.parametrize("name", ["dinov2", "da3", "hf"])
def test_null_teachers_give_their_grid(name):
    teacher = load_teacher(name, "null", {"preprocess": {"height": 28, "width": 56}})
    assert teacher.identity.source == "null" and teacher.family == name
    frames = torch.randint(0, 255, (2, 3, 20, 20, 3), dtype=torch.uint8)
    target, reference = teacher.encode_clips(frames, frames[:, 0])
    assert tuple(target.shape) == (2, 3, *teacher.grid, teacher.channels) and target.dtype == torch.float16
    assert tuple(reference.shape) == (2, 1, *teacher.grid, teacher.channels)
    assert teacher.grid[1] == 2 * teacher.grid[0]


def test_null_pi0_targets_have_the_declared_shapes():
    loaded = pi0.load_pi0("null", tiny_layers=3)
    assert loaded.identity.source == "null"
    params = pi0.Pi0TargetParams(pairs=2, attn_layers=[0, 2], attn_dtype="float16", cameras=["cam"],
                                 state_key="state", action_key="action", state_indices=None, normalization={},
                                 max_text_tokens=8, tokenizer="bytes", image_size=pi0.image_size(loaded.model.config),
                                 dtype="float32", chunk_size=loaded.model.config.chunk_size,
                                 max_dim=loaded.model.config.max_action_dim)
    shapes = pi0.array_shapes(params, loaded.model.config)
    sample = pi0.assemble_sample(np.zeros((1, 16, 16, 3), np.uint8), "reach", np.zeros(6), np.zeros((5, 4)),
                                 params, None)
    arrays = pi0.compute_targets(loaded.model, pi0.stack_samples([sample, sample]), ["a", "b"], "pi0-x", params)
    for name, (shape, dtype) in shapes.items():
        assert arrays[name].shape == (2, *shape) and arrays[name].dtype == np.dtype(dtype), name


# ---------------------------------------------------------------- refusal by exports and trainers
def _null_world(root) -> tuple[str, str, str]:
    """A plan of CLIPS clips, a null-model text version and a tiny-model one over it."""
    store = make_dataset(root, "toy")
    write_episode(store, "ep0", length=CLIPS + 2)
    rows = [ClipRow(clip_id=f"c{i}", dataset="toy", episode_id="ep0", camera="cam", start=i, num_frames=1,
                    stride=1, instruction="reach") for i in range(CLIPS)]
    plan = "plan-nulltest0001"
    PlanStore(root).write(PlanInfo(plan_id=plan, dataset="toy", dataset_fingerprint=store.fingerprint(),
                                   params={}, num_clips=CLIPS), rows)
    null = _text_version(root, plan, ModelIdentity(spec="null", family="clip-text", source="null"))
    tiny = _text_version(root, plan, ModelIdentity(spec="tiny", family="clip-text", source="tiny", seed=0))
    return plan, null, tiny


def _text_version(root, plan: str, model: ModelIdentity) -> str:
    recipe = TargetRecipe(kind="text", stage="clip.text", stage_version=1, model=model, inputs={"plan": plan})
    writer = TargetStore(root).begin(recipe, [ArraySpec(name="embedding", shape=[CLIPS, 2, 4], dtype="float32")],
                                     CLIPS, 4)
    for shard in writer.pending_shards():
        writer.write_shard(shard, {"embedding": np.ones((len(writer.shard_clips(shard)), 2, 4), np.float32)})
    return writer.finalize().id


def test_exports_refuse_null_versions_unless_allowed(tmp_path):
    from foresight.flows.build import build, in_process
    from foresight.flows.export import EXPORT, ExportConfig
    from foresight.trainers.data import ShardStream, ZarrClips

    root = str(tmp_path)
    plan, null, tiny = _null_world(root)
    assert resolve_sources(root, plan, [tiny], None)  # a tiny version is fine
    with pytest.raises(ValueError) as err:
        resolve_sources(root, plan, [null], None)
    assert null in str(err.value) and "null model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=null):
        ZarrClips(root, plan, [null])
    assert len(ZarrClips(root, plan, [null], allow_null=True)) == CLIPS

    config = ExportConfig(plan=plan, targets=[null], shard_size="1MB")
    with pytest.raises(ValueError, match="allow-null"):
        build(EXPORT, root, config, in_process)
    allowed = config.model_copy(update={"allow_null": True})
    result = build(EXPORT, root, allowed, in_process)
    assert ExportStore(root).index(result.export_id).null_versions == [null]
    with pytest.raises(ValueError) as err:
        ShardStream(root, result.export_id, [null])
    assert result.export_id in str(err.value) and null in str(err.value)
    assert len(list(ShardStream(root, result.export_id, [null], allow_null=True))) == CLIPS

    real = build(EXPORT, root, ExportConfig(plan=plan, targets=[tiny], shard_size="1MB"), in_process)
    assert ExportStore(root).index(real.export_id).null_versions == []


def test_versions_computed_from_a_null_version_are_refused_too(tmp_path):
    root = str(tmp_path)
    plan, null, _ = _null_world(root)
    recipe = TargetRecipe(kind="teacher", stage="teacher", stage_version=1, inputs={"video": null},
                          model=ModelIdentity(spec="tiny", family="dinov2", source="tiny", seed=0))
    writer = TargetStore(root).begin(recipe, [ArraySpec(name="target", shape=[CLIPS, 2], dtype="float16")], CLIPS, 4)
    for shard in writer.pending_shards():
        writer.write_shard(shard, {"target": np.zeros((len(writer.shard_clips(shard)), 2), np.float16)})
    downstream = writer.finalize().id
    with pytest.raises(ValueError, match=f"computed from '{null}'"):
        resolve_sources(root, plan, [downstream], None)
