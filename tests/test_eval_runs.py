"""Trained runs rolled out through `foresight eval`: the S-VAM stack of an action expert, a Shallow-π student.

The world is tiny but real where the eval depends on it: target versions whose manifests record the
`tiny` CLIP text, SVD and DINOv2 models (arrays of the shapes those models produce), an export of
them, a decoupler and an action expert trained one step each on it. The eval must rebuild every model
from those records, run frame -> one-step features -> decoupler -> action expert per chunk, key the
eval by the versions, and refuse other versions unless told to accept (and record) them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.flows.cli.common import user_error_message
from foresight.flows.eval import EvalConfig, load_policy
from foresight.flows.teachers_engine import teacher_recipe
from foresight.pipelines import pi0
from foresight.pipelines.svd import SVDParams
from foresight.pipelines.svd.features import feature_shape
from foresight.pipelines.svd.loading import describe_svd
from foresight.pipelines.teachers import load_teacher
from foresight.pipelines.text import MAX_LENGTH, load_text_model
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.schemas.target import ArraySpec, TargetRecipe, content_id
from foresight.storage.episodes import EpisodeStore
from foresight.storage.evals import EvalStore
from foresight.storage.fs import Root
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore

import trainers_world

FRAMES, SIZE, CLIPS, CHUNK = 4, 32, 4, 5
FEATURES = {"action": FeatureSpec(dtype="float32", shape=[4]), "state": FeatureSpec(dtype="float32", shape=[39])}
runner = CliRunner()


def write_version(root: Root, recipe: TargetRecipe, arrays: dict[str, np.ndarray]) -> str:
    store = TargetStore(root)
    specs = [ArraySpec(name=n, shape=list(a.shape), dtype=str(a.dtype)) for n, a in arrays.items()]
    writer = store.begin(recipe, specs, num_clips=CLIPS, shard_size=CLIPS)
    writer.write_shard(0, arrays)
    writer.finalize()
    return writer.version_id


def make_dataset_and_plan(root: Root) -> str:
    store = EpisodeStore(root, "mw")
    store.write_info(DatasetInfo(name="mw", source_kind="metaworld", source="tests", source_fingerprint="f" * 64,
                                 fps=80.0, cameras={"corner2": [SIZE, SIZE, 3]}, features=FEATURES))
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        record = EpisodeRecord(episode_id=f"reach-{seed:06d}", task="reach", instructions=["reach the goal position"],
                               length=12, success=True, source_path=f"metaworld://reach-v3/seed={seed}",
                               source_checksum=f"c{seed}", extra={"seed": seed, "camera": "corner2"})
        with store.writer(record, FEATURES) as writer:
            writer.append_frames("corner2", rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8))
            writer.set_lowdim({"action": rng.uniform(-1, 1, (12, 4)).astype(np.float32),
                               "state": rng.normal(size=(12, 39)).astype(np.float32)})
    rows = [ClipRow(clip_id=f"c{i}", dataset="mw", episode_id=f"reach-{i % 2:06d}", camera="corner2", start=i,
                    num_frames=FRAMES, stride=1, instruction="reach the goal position") for i in range(CLIPS)]
    params = {"camera": "corner2", "frames": FRAMES}
    plan_id = content_id("plan", {"dataset": "mw", "params": params})
    PlanStore(root).write(PlanInfo(plan_id=plan_id, dataset="mw", dataset_fingerprint=store.fingerprint(),
                                   params=params, num_clips=CLIPS), rows)
    return plan_id


def make_versions(root: Root, plan_id: str, text_seed: int = 0) -> dict[str, str]:
    """text, video and dinov2 versions recorded as the tiny models' (random arrays of their shapes)."""
    rng = np.random.default_rng(text_seed)
    text_model = load_text_model("tiny", "cpu", text_seed)
    text = write_version(root, TargetRecipe(kind="text", stage="clip.text", stage_version=1, model=text_model.identity,
                                            params={"max_length": MAX_LENGTH}, inputs={"plan": plan_id}),
                         {"embedding": rng.normal(size=(CLIPS, MAX_LENGTH, text_model.width)).astype(np.float32)})
    desc = describe_svd("tiny", 0)
    params = SVDParams(num_frames=FRAMES, size=64, steps=2)
    h, w, c = feature_shape(desc.unet_config, desc.vae_config, params.size, params.feature_blocks)
    video = write_version(root, TargetRecipe(kind="video", stage="svd.generate", stage_version=1, model=desc.identity,
                                             params={**params.model_dump(mode="json"), "dtype": "fp32"},
                                             inputs={"plan": plan_id, "text": text}),
                          {"frames": rng.integers(0, 256, (CLIPS, FRAMES, 64, 64, 3), dtype=np.uint8),
                           "onestep": rng.normal(size=(CLIPS, FRAMES, h, w, c)).astype(np.float16),
                           "seed": np.arange(CLIPS, dtype=np.int64)})
    teacher = load_teacher("dinov2", "tiny")
    gh, gw = teacher.grid
    dinov2 = write_version(root, teacher_recipe(teacher, video), {
        "target": rng.normal(size=(CLIPS, FRAMES, gh, gw, teacher.channels)).astype(np.float16),
        "reference": rng.normal(size=(CLIPS, 1, gh, gw, teacher.channels)).astype(np.float16)})
    return {"text": text, "video": video, "dinov2": dinov2}


def train(root: Root, export_id: str) -> None:
    from foresight.trainers.action_expert import ActionExpertRunConfig, train_action_expert
    from foresight.trainers.decoupler import DecouplerRunConfig, train_decoupler
    from foresight.trainers.config import LoopConfig

    loop = LoopConfig(steps=1, batch_size=2, num_workers=0, device="cpu", progress=False)
    train_decoupler(root, export_id, DecouplerRunConfig(teacher="dinov2", size="tiny", loop=loop), run_id="dec")
    train_action_expert(root, export_id, ActionExpertRunConfig(decouplers=["dec"], size="tiny", loop=loop),
                        run_id="expert")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = Root(tmp_path_factory.mktemp("svam"))
    plan_id = make_dataset_and_plan(root)
    ids = make_versions(root, plan_id)
    export_id = trainers_world.export(root, plan_id, [ids["video"], f"dinov2={ids['dinov2']}", ids["text"]], None,
                                      chunk=CHUNK)
    train(root, export_id)
    return root, ids, plan_id


def invoke(root: Root, *args: str):
    return runner.invoke(app, ["eval", "metaworld", "--run", "expert", "--tasks", "reach", "--episodes", "1",
                               "--max-steps", "12", "--root", root.url, "--json", *args])


def test_the_stack_runs_from_the_runs_recorded_versions(world):
    root, ids, _ = world
    result = invoke(root)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("{"):])["record"]
    policy = record["key"]["policy"]
    assert policy["run_id"] == "expert" and policy["step"] == 1
    assert set(policy["versions"].values()) == {ids["video"], ids["dinov2"], ids["text"]}
    assert set(policy["models"]) == {"text", "svd", "teacher.dinov2"}
    assert any(name.startswith("dec/") for name in policy["checkpoint_sha256"])
    assert record["key"]["size"] == SIZE and record["key"]["camera"] == "corner2"  # the training data's
    (episode,) = EvalStore(root).episodes(record["eval_id"])
    assert episode.steps == 12 and episode.policy_calls == 3  # chunks of 5, re-planned after each
    assert set(record["latency_ms"]) == {"backbone", "references", "decouplers", "action_expert"}
    listing = runner.invoke(app, ["targets", "show", ids["dinov2"], "--root", root.url])
    assert record["eval_id"] in listing.output


def test_other_versions_are_refused_unless_allowed_and_then_recorded(world):
    root, ids, plan_id = world
    other_text = make_versions(root, plan_id, text_seed=1)["text"]
    refused = invoke(root, "--versions", f"text={other_text}")
    message = user_error_message(refused.exception)
    assert refused.exit_code != 0 and "--allow-version-change" in message and other_text in message
    allowed = invoke(root, "--versions", f"text={other_text}", "--allow-version-change", "--max-steps", "5")
    assert allowed.exit_code == 0, allowed.output
    record = json.loads(allowed.output[allowed.output.index("{"):])["record"]
    assert record["version_changes"] == [{"field": "text", "trained": ids["text"], "used": other_text,
                                          "reason": "--versions"}]


def test_eval_seeds_that_were_demo_seeds_are_refused(world):
    root, _, _ = world
    result = invoke(root, "--seeds", "0,5")
    assert result.exit_code != 0 and "demonstration seeds" in user_error_message(result.exception)


@pytest.fixture(scope="module")
def shallow_pi_run(world):
    """A 2-layer student distilled one step from tiny pi0 teacher targets on the same dataset."""
    from foresight.flows.export import ExportConfig, run_export
    from foresight.flows.pi0 import Pi0TargetsConfig, pi0_targets_flow
    from foresight.flows.runtime import RunnerChoice, run_flow

    root, _, plan_id = world
    config = Pi0TargetsConfig(plan=plan_id, model="tiny", tiny_layers=4, pairs=1, attn_layers=[1, 2],
                              state_indices=list(range(18)) + [36, 37, 38], shard_size=4)
    version = run_flow(pi0_targets_flow, RunnerChoice(), root_url=root.url, config=config).version
    export = run_export(root.url, ExportConfig(plan=plan_id, targets=[version], action_chunk=50))
    result = runner.invoke(app, ["train", "shallow-pi", "--export", export.export_id, "--layers", "2",
                                 "--attn-layers", "1", "--steps", "1", "--batch-size", "2", "--workers", "0",
                                 "--device", "cpu", "--run-id", "student", "--root", root.url])
    assert result.exit_code == 0, result.output
    return root, version


@pytest.mark.parametrize("extra, kind, components", [((), "shallow-pi", {"preprocess", "sampler"}),
                                                      (("--pi0-teacher",), "pi0", {"preprocess", "sampler"})])
def test_shallow_pi_student_and_its_teacher_roll_out_through_the_chunk_sampler(shallow_pi_run, extra, kind,
                                                                                components):
    root, version = shallow_pi_run
    result = runner.invoke(app, ["eval", "metaworld", "--run", "student", "--tasks", "reach", "--episodes", "1",
                                 "--max-steps", "8", "--execute", "4", "--root", root.url, "--json", *extra])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("{"):])["record"]
    assert record["key"]["policy"]["kind"] == kind and set(record["key"]["policy"]["versions"].values()) == {version}
    (episode,) = EvalStore(root).episodes(record["eval_id"])
    assert episode.policy_calls == 2 and set(episode.latency_ms) == components  # 50-action chunks, 4 executed
    config = EvalConfig(policy="student", tasks=["reach"], pi0_teacher=bool(extra))
    policy, _ = load_policy(root.url, config)  # the process's cached policy is the one evaluated
    assert policy.identity().kind == kind and pi0.num_layers(policy.model) == (4 if extra else 2)


def test_the_stack_is_a_function_of_the_episode_seed(world):
    from foresight.pipelines.eval.policy import Observation

    root, _, _ = world
    policy, _ = load_policy(root.url, EvalConfig(policy="expert", tasks=["reach"]))
    rng = np.random.default_rng(3)
    obs = Observation("reach", "reach the goal position", rng.normal(size=39),
                      rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), 0)

    def chunks(seed: int) -> list[np.ndarray]:
        policy.reset(obs.task, obs.instruction, seed)
        return [policy.act(obs) for _ in range(2)]

    first, again, other = chunks(7), chunks(7), chunks(8)
    assert first[0].shape == (CHUNK, 4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # same seed: same noise, same chunks
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[0], other[0])


def test_weights_other_than_the_recorded_ones_are_refused_unless_allowed(world):
    from foresight.flows.eval_runs import check_weight_changes, resolve_run
    from foresight.pipelines.eval.svam import load_stack

    root, _, _ = world
    resolved = resolve_run(root, EvalConfig(policy="expert", tasks=["reach"]))
    stack = resolved.stack
    # The same spec resolving to other weights (here: a recorded config the tiny model no longer has).
    stack.text = stack.text.model_copy(update={"config": {**stack.text.config, "edited": True}})
    _, changed = load_stack(stack, "cpu")
    assert changed == ["text"]
    with pytest.raises(ValueError, match="not the ones its versions recorded"):
        check_weight_changes(changed, EvalConfig(policy="expert", tasks=["reach"]), resolved.identity)
    allowed = check_weight_changes(changed, EvalConfig(policy="expert", tasks=["reach"], allow_version_change=True),
                              resolved.identity)
    assert allowed == [{"field": "text", "reason": "weights differ from the recorded identity"}]
