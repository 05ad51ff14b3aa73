"""The text and generate flows end to end on tiny models: manifests, arrays, versions, resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from foresight.flows.generate import GENERATE, GenerateConfig, PlanConfig, TextConfig, generate_flow, make_plan, text_flow, \
    video_recipe
from foresight.flows.runtime import RunnerChoice, run_flow
from foresight.pipelines.svd import SVDParams, clip_seed, load_svd, one_step_features, save_svd
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.storage import layout
from foresight.storage.episodes import EpisodeStore
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore, shard_object

REPO = Path(__file__).resolve().parent.parent
FEATURES = {"action": FeatureSpec(dtype="float32", shape=[2])}
INSTRUCTIONS = ["open the drawer", "push the block"]


def write_dataset(root: str) -> None:
    store = EpisodeStore(root, "toy")
    store.write_info(DatasetInfo(name="toy", source_kind="synthetic", source="test", source_fingerprint="a" * 64,
                                 fps=10.0, cameras={"front": [24, 24, 3]}, features=FEATURES))
    rng = np.random.default_rng(1)
    for index, length in enumerate((20, 14)):
        record = EpisodeRecord(episode_id=f"ep{index}", task="toy", instructions=[INSTRUCTIONS[index]],
                               length=length, source_path="test", source_checksum=f"c{index}")
        with store.writer(record, FEATURES) as writer:
            writer.append_frames("front", rng.integers(0, 256, size=(length, 24, 24, 3), dtype=np.uint8))
            writer.set_lowdim({"action": rng.normal(size=(length, 2)).astype(np.float32)})


def generate_config(plan: str, text: str, **overrides) -> GenerateConfig:
    values = dict(plan=plan, text=text, model="tiny", params=SVDParams(num_frames=4, size=32, steps=1),
                  batch=2, shard_size=2)
    values.update(overrides)
    return GenerateConfig(**values)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("svdroot"))
    write_dataset(root)
    plan = make_plan(root, PlanConfig(dataset="toy", frames=4, stride=2, every=4, limit=4))
    text = run_flow(text_flow, RunnerChoice(), None, root_url=root,
                    config=TextConfig(plan=plan.plan_id, model="tiny", shard_size=4))
    config = generate_config(plan.plan_id, text.version)
    video = run_flow(generate_flow, RunnerChoice(), None, root_url=root, config=config)
    return root, plan, text, config, video


def test_text_version(built):
    root, plan, text, _, _ = built
    reader = TargetStore(root).open(text.version)
    assert reader.manifest.status == "complete" and reader.verify() == []
    assert reader.manifest.recipe.input_ids() == {"plan": plan.plan_id}
    states = reader.read("embedding")
    assert states.shape == (4, 20, 16) and states.dtype == np.float32
    rows = PlanStore(root).rows(plan.plan_id)
    same = [i for i, r in enumerate(rows) if r.instruction == rows[0].instruction]
    assert len(same) > 1 and all(np.array_equal(states[i], states[same[0]]) for i in same)


def test_video_manifest_names_model_digest_and_every_parameter(built):
    root, plan, text, config, video = built
    manifest = TargetStore(root).manifest(video.version)
    assert video.status == "complete" and manifest.status == "complete"
    assert manifest.kind == "video" and manifest.id.startswith("video-")
    model = manifest.recipe.model
    assert model.family == "svd" and model.source == "tiny" and model.seed == 0
    assert model.config["unet"]["block_out_channels"] == [32, 32, 64, 64]
    # every setting but the sampler, which the reference loop does not record (tests/test_svd_fast.py)
    assert set(manifest.recipe.params) == set(SVDParams.model_fields) - {"sampler"} | {"dtype"}
    assert manifest.recipe.params["steps"] == 1 and manifest.recipe.params["dtype"] == "fp32"
    assert manifest.recipe.input_ids() == {"plan": plan.plan_id, "text": text.version}
    assert manifest.num_shards == 2 and manifest.shard_table is not None
    assert set(TargetStore(root).shard_sums(manifest).by_shard()) == {"0", "1"}
    assert "clips_per_hour" in manifest.timings
    assert TargetStore(root).open(video.version).verify() == []


def test_video_arrays(built):
    root, plan, _, _, video = built
    reader = TargetStore(root).open(video.version)
    frames, onestep, seeds = reader.read("frames"), reader.read("onestep"), reader.read("seed")
    assert frames.shape == (4, 4, 32, 32, 3) and frames.dtype == np.uint8
    assert onestep.shape == (4, 4, 8, 8, 128) and onestep.dtype == np.float16
    rows = PlanStore(root).rows(plan.plan_id)
    assert seeds.dtype == np.int64
    assert seeds.tolist() == [clip_seed(video.version, r.clip_id) for r in rows]


def test_stored_capture_equals_standalone_extraction(built):
    root, plan, text, config, video = built
    rows = PlanStore(root).rows(plan.plan_id)
    store = EpisodeStore(root, "toy")
    observed = np.stack([store.read_frames(r.episode_id, r.camera, [r.start])[0] for r in rows[:2]])
    states = TargetStore(root).open(text.version).read("embedding", slice(0, 2))
    seeds = TargetStore(root).open(video.version).read("seed", slice(0, 2))
    standalone = one_step_features(load_svd("tiny"), config.params, observed, states, seeds)
    assert np.array_equal(standalone, TargetStore(root).open(video.version).read("onestep", slice(0, 2)))


def test_rerun_skips_a_complete_version(built):
    root, _, _, config, video = built
    again = run_flow(generate_flow, RunnerChoice(), None, root_url=root, config=config)
    assert again.skipped and again.version == video.version


def test_changed_parameter_model_or_input_gives_a_new_version(built, tmp_path):
    root, _, _, config, video = built
    version = video_recipe(root, config)[0].version_id()
    assert version == video.version
    changed = [
        config.model_copy(update={"params": config.params.model_copy(update={"steps": 3})}),
        config.model_copy(update={"params": config.params.model_copy(update={"max_guidance": 2.5})}),
        config.model_copy(update={"params": config.params.model_copy(update={"feature_blocks": [0]})}),
        config.model_copy(update={"dtype": "bf16"}),
        config.model_copy(update={"dtype": "fp8"}),
        config.model_copy(update={"seed": 1}),
        config.model_copy(update={"compile": "unet"}),  # compiled kernels round differently (issue 17)
    ]
    ids = {video_recipe(root, c)[0].version_id() for c in changed}
    assert len(ids) == len(changed) and version not in ids
    # runtime choices are not part of the version
    runtime = config.model_copy(update={"batch": 1, "device": "cpu", "compile": "none"})
    assert video_recipe(root, runtime)[0].version_id() == version


def test_dir_weights_are_keyed_by_their_digest(built, tmp_path):
    root, _, _, config, video = built
    save_svd(load_svd("tiny"), tmp_path / "svd")
    recipe, _, _ = video_recipe(root, config.model_copy(update={"model": f"dir:{tmp_path / 'svd'}"}))
    assert recipe.model.source == "dir" and recipe.model.is_real
    assert sorted(recipe.model.weights_sha256) == ["unet/diffusion_pytorch_model.safetensors",
                                                   "vae/diffusion_pytorch_model.safetensors"]
    assert recipe.version_id() != video.version
    # the same weights in another folder are the same model
    shutil.copytree(tmp_path / "svd", tmp_path / "copy")
    moved, _, _ = video_recipe(root, config.model_copy(update={"model": f"dir:{tmp_path / 'copy'}"}))
    assert moved.version_id() == recipe.version_id()


def test_plan_frames_must_match_or_are_adopted(built):
    root, _, _, config, video = built
    with pytest.raises(ValueError, match="clips of 4 frames"):
        video_recipe(root, config.model_copy(update={"params": config.params.model_copy(update={"num_frames": 8})}))
    unset = config.model_copy(update={"params": SVDParams(size=32, steps=1)})  # num_frames left to the plan
    assert video_recipe(root, unset)[0].version_id() == video.version


WORKER = """
import sys
import torch
torch.set_num_threads(int(sys.argv[5]))
from foresight.flows.build import write_shards
from foresight.flows.generate import GENERATE, GenerateConfig
config = GenerateConfig.model_validate_json(sys.argv[3])
write_shards(GENERATE, sys.argv[1], sys.argv[2], config, list(range(int(sys.argv[4]))))
"""


def copy_inputs(src: str, dst: str, text_id: str) -> None:
    for rel in ("datasets", "plans", f"targets/{text_id}"):
        shutil.copytree(Path(src) / rel, Path(dst) / rel)


def kill_after_first_shard(root: str, version_id: str, config: GenerateConfig, shards: int) -> None:
    """Run the shard worker in a subprocess; SIGKILL it as soon as shard 0 is marked done.

    The worker uses this process's torch thread count: CPU reductions round by thread count, and
    its shard is compared byte for byte with shards computed here.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, root, version_id, config.model_dump_json(), str(shards),
                             str(torch.get_num_threads())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done0 = Path(root) / layout.target_dir(version_id) / layout.DONE_DIR / "0"
    deadline = time.monotonic() + 240
    while not done0.exists():
        if proc.poll() is not None:
            pytest.fail(f"shard worker exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("shard worker did not finish shard 0 in time")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def test_resume_after_sigkill_part_way(built, tmp_path):
    root, _, text, config, video = built
    copy_inputs(root, str(tmp_path), text.version)
    writer = GENERATE.begin(str(tmp_path), config, GENERATE.recipe(str(tmp_path), config)).writer
    version_id = writer.version_id
    assert version_id == video.version  # content addressed: the same version in another root
    kill_after_first_shard(str(tmp_path), version_id, config, writer.num_shards)
    pending = writer.pending_shards()
    assert 0 not in pending and pending, "the kill should land before the last shard is done"
    shard0 = Path(writer.root.path(shard_object(writer.manifest, "onestep", 0)))
    before = shard0.stat().st_mtime_ns

    resumed = run_flow(generate_flow, RunnerChoice(), None, root_url=str(tmp_path), config=config)
    assert resumed.status == "complete" and not resumed.skipped
    assert resumed.shards_written == len(pending)  # finished shards were not recomputed
    assert shard0.stat().st_mtime_ns == before
    fresh, original = TargetStore(str(tmp_path)).open(version_id), TargetStore(root).open(video.version)
    assert fresh.verify() == []
    for name in ("frames", "onestep", "seed"):
        assert fresh.read(name).tobytes() == original.read(name).tobytes(), name


def test_uncompressed_features_keep_the_version_and_the_values(built, tmp_path):
    root, plan, text, config, video = built
    import shutil

    other = str(tmp_path / "raw")
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("targets"))
    shutil.copytree(f"{root}/targets/{text.version}", f"{other}/targets/{text.version}")
    raw = run_flow(generate_flow, RunnerChoice(), None, root_url=other,
                   config=config.model_copy(update={"compression": "none"}))
    assert raw.version == video.version  # storage only
    stored = TargetStore(other).open(raw.version)
    assert stored.manifest.array_spec("onestep").compression == "none"
    np.testing.assert_array_equal(stored.read("onestep"), TargetStore(root).open(video.version).read("onestep"))
