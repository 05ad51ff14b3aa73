"""The pi0-targets flow: a tiny dataset and plan -> a complete, resumable pi0 target version."""

from __future__ import annotations

import numpy as np
import pytest

from typer.testing import CliRunner

from foresight.flows import pi0 as pi0_flow
from foresight.flows.build import build, in_process, write_shards
from foresight.flows.cli import app
from foresight.pipelines import pi0
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.storage.episodes import EpisodeStore
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore

PLAN = "plan-pi0test0001"
FEATURES = {"state": FeatureSpec(dtype="float32", shape=[39]), "action": FeatureSpec(dtype="float32", shape=[4])}


def write_dataset(root: str, lengths=(60, 30)) -> list[ClipRow]:
    rng = np.random.default_rng(3)
    store = EpisodeStore(root, "toy")
    store.write_info(DatasetInfo(name="toy", source_kind="synthetic", source="test", source_fingerprint="f" * 64,
                                 fps=10.0, cameras={"front": [32, 32, 3]}, features=FEATURES))
    for index, length in enumerate(lengths):
        record = EpisodeRecord(episode_id=f"ep{index}", task="reach", instructions=["reach the button"],
                               length=length, source_path="test", source_checksum=f"c{index}")
        with store.writer(record, FEATURES) as writer:
            writer.append_frames("front", rng.integers(0, 256, size=(length, 32, 32, 3), dtype=np.uint8))
            writer.set_lowdim({"state": rng.normal(size=(length, 39)), "action": rng.uniform(-1, 1, (length, 4))})
    starts = [("ep0", 0), ("ep0", 9), ("ep1", 3), ("ep1", 25), ("ep0", 40)]
    rows = [ClipRow(clip_id=f"clip{i}", dataset="toy", episode_id=ep, camera="front", start=start, num_frames=4,
                    stride=1, instruction="reach the button") for i, (ep, start) in enumerate(starts)]
    PlanStore(root).write(PlanInfo(plan_id=PLAN, dataset="toy", dataset_fingerprint=store.fingerprint(),
                                   params={}, num_clips=len(rows)), rows)
    return rows


def config(**overrides) -> pi0_flow.Pi0TargetsConfig:
    values = dict(plan=PLAN, model="tiny", pairs=2, attn_dtype="float32", state_indices=list(range(18)),
                  shard_size=2, batch=2, max_text_tokens=24)
    values.update(overrides)
    return pi0_flow.Pi0TargetsConfig(**values)


def begin(root: str, cfg: pi0_flow.Pi0TargetsConfig):
    """Begin the pi0 version of ``cfg`` (no shard written); its writer."""
    return pi0_flow.PI0.begin(root, cfg, pi0_flow.PI0.recipe(root, cfg)).writer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pi0root"))
    rows = write_dataset(root)
    result = pi0_flow.run_pi0_targets(root, config())
    return root, rows, result


def test_flow_writes_a_complete_pi0_version(built):
    root, rows, result = built
    assert result.status == "complete" and result.clips == 5 and not result.skipped
    reader = TargetStore(root).open(result.version)
    manifest = reader.manifest
    assert manifest.id.startswith("pi0-") and manifest.kind == "pi0" and manifest.num_shards == 3
    assert manifest.recipe.model.source == "tiny" and not manifest.recipe.model.is_real
    assert manifest.recipe.params["attn_layers"] == [1, 2] and manifest.recipe.input_ids()["plan"] == PLAN
    assert reader.verify() == []
    attn = reader.read("attn")
    assert attn.shape == (5, 2, 2, 50, pi0.prefix_length(pi0.tiny_config(), 1, 24))
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    mask = reader.read("action_mask")
    assert mask[3, :5, :4].all() and not mask[3, 5:].any()  # clip3 starts 5 frames before its episode ends
    assert "samples_per_s" in manifest.timings


def test_stored_targets_equal_a_direct_teacher_pass(built):
    root, rows, result = built
    reader = TargetStore(root).open(result.version)
    params = pi0.Pi0TargetParams(**{k: v for k, v in reader.manifest.recipe.params.items() if k != "num_clips"})
    loaded = pi0.load_pi0("tiny")
    sample_reader = pi0_flow.SampleReader(root, params, None)
    samples = pi0.stack_samples([sample_reader.sample(rows[i]) for i in (2, 3)])
    direct = pi0.compute_targets(loaded.model, samples, ["clip2", "clip3"], result.version, params)
    for name, values in direct.items():
        np.testing.assert_array_equal(reader.read(name, [2, 3]), values, err_msg=name)


def test_rerun_of_a_complete_version_does_nothing(built):
    root, _, result = built
    again = build(pi0_flow.PI0, root, config(), in_process)
    assert (again.version, again.status, again.skipped, again.clips, again.seconds) == (result.version, "complete",
                                                                                        True, 0, 0.0)
    cli = CliRunner().invoke(app, ["pi0-targets", "--plan", PLAN, "--pairs", "2", "--attn-dtype", "float32",
                                   "--state-indices", "0-17", "--shard-size", "2", "--batch", "2",
                                   "--max-text-tokens", "24", "--root", root])
    assert cli.exit_code == 0, cli.output
    assert cli.output.strip() == f"{result.version} already complete (nothing to do)"


def test_interrupted_build_resumes_without_rewriting_done_shards(tmp_path, built):
    _, _, complete = built
    root = str(tmp_path)
    write_dataset(root)
    writer = begin(root, config())
    assert writer.version_id == complete.version
    first = write_shards(pi0_flow.PI0, root, writer.version_id, config(), [1])
    assert first.shards == [1] and writer.pending_shards() == [0, 2]
    marker = TargetStore(root).root.read_json(writer.done_path(1))
    result = build(pi0_flow.PI0, root, config(), in_process)
    assert result.status == "complete" and result.clips == 3
    assert TargetStore(root).root.read_json(writer.done_path(1)) == marker
    assert TargetStore(root).open(writer.version_id).sums.by_shard() == \
        TargetStore(built[0]).open(writer.version_id).sums.by_shard()


def test_bad_inputs_name_what_is_wrong(tmp_path):
    root = str(tmp_path)
    write_dataset(root)
    with pytest.raises(ValueError, match=r"clip 'clip0'.*state: 39 elements, more than π0's 32"):
        writer = begin(root, config(state_indices=None))
        write_shards(pi0_flow.PI0, root, writer.version_id, config(state_indices=None), [0])
    with pytest.raises(ValueError, match="no low-dim column 'joints'"):
        begin(root, config(state_key="joints"))
    with pytest.raises(ValueError, match="attn layers"):
        begin(root, config(attn_layers=[7]))
    with pytest.raises(ValueError, match="no statistics"):
        begin(root, config(normalize="dataset"))
