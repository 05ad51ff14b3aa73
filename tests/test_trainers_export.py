"""Trainers over real exports (ShardStream): CLI, held-out metrics, exact resume, version guard, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.storage.exports import ExportStore
from foresight.storage.fs import Root
from foresight.trainers.action_expert import load_action_expert
from foresight.trainers.decoupler import DecouplerRunConfig, train_decoupler
from foresight.storage.runs import RunDir, read_metrics
from foresight.trainers.config import LoopConfig, OptimConfig
from trainers_world import export, make_targets, make_world

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return make_world(tmp_path_factory.mktemp("trainers"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "run.toml"
    path.write_text('size = "tiny"\n[optim]\nlr = 0.01\nwarmup_steps = 2\n'
                    '[loop]\nbatch_size = 4\nlog_every = 1\ncheckpoint_every = 10\ndevice = "cpu"\n')
    return path


def cli(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=True)
    return result


@pytest.fixture(scope="module")
def decoupler_runs(world, config_file):
    """dinov2 and da3 decouplers trained through the CLI (30 steps, 1 worker)."""
    for teacher in ("dinov2", "da3"):
        result = cli("train", "decoupler", "--root", world["root"], "--export", world["train"], "--teacher", teacher,
                     "--config", str(config_file), "--steps", "30", "--workers", "1", "--run-id", f"dec-{teacher}",
                     "--eval-export", world["val"])
        assert result.exit_code == 0, result.output + repr(result.exception)
    return ["dec-dinov2", "dec-da3"]


def test_decoupler_cli_trains_and_evaluates_per_teacher(world, decoupler_runs):
    root = Root(world["root"])
    for run_id, teacher in zip(decoupler_runs, ("dinov2", "da3")):
        metrics = read_metrics(root, run_id)
        losses = [m["loss"] for m in metrics if m["split"] == "train"]
        assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
        val = [m for m in metrics if m["split"] == "val"][-1]
        assert {f"{teacher}/cosine", f"{teacher}/rel_l2"} <= set(val) and val[f"{teacher}/cosine"] > 0.3
        info = RunDir(root, run_id).info(30)
        index = ExportStore(root).index(world["train"])
        assert info.export_id == world["train"]
        assert info.target_versions == {f: index.versions[f] for f in ("onestep", f"{teacher}.target",
                                                                       f"{teacher}.reference")}
        assert info.config["architecture"]["teacher_channels"] == {"dinov2": 8, "da3": 12}[teacher]


def test_exact_resume_over_shard_stream_with_two_workers(world):
    root = Root(world["root"])
    cfg = DecouplerRunConfig(size="tiny", optim=OptimConfig(lr=3e-3, warmup_steps=2),
                             loop=LoopConfig(steps=12, batch_size=3, num_workers=2, log_every=1, checkpoint_every=4,
                                             device="cpu"))
    train_decoupler(root, world["train"], cfg, run_id="whole")
    stopped = train_decoupler(root, world["train"], cfg, run_id="parts", stop_at=5)
    assert stopped.step == 5
    resumed = train_decoupler(root, world["train"], cfg, run_id="parts")
    assert resumed.resumed_from == 5
    loss = lambda run: [m["loss"] for m in read_metrics(root, run) if m["split"] == "train"]  # noqa: E731
    assert len(loss("whole")) == 12 and loss("parts") == loss("whole")


def test_version_guard_on_another_teacher_version(world, config_file, tmp_path):
    root = Root(world["root"])
    other = make_targets(root, world["plan"], 24, teacher_seed=2)  # same video, a new dinov2 version
    assert other["video"] == world["video"] and other["dinov2"] != world["dinov2"]
    changed = export(root, world["plan"], [world["video"], other["dinov2"]], "train")
    args = ["train", "decoupler", "--root", world["root"], "--teacher", "dinov2", "--config", str(config_file),
            "--workers", "0", "--run-id", "guarded"]
    assert cli(*args, "--export", world["train"], "--steps", "4").exit_code == 0
    refused = cli(*args, "--export", changed, "--steps", "8")
    assert refused.exit_code != 0 and isinstance(refused.exception, ValueError)
    message = str(refused.exception)
    assert world["dinov2"] in message and other["dinov2"] in message and "--allow-version-change" in message
    allowed = cli(*args, "--export", changed, "--steps", "8", "--allow-version-change")
    assert allowed.exit_code == 0, allowed.output
    info = RunDir(root, "guarded").info(8)
    assert info.target_versions["dinov2.target"] == other["dinov2"]
    assert info.version_changes[0]["from_versions"]["dinov2.target"] == world["dinov2"]
    assert info.version_changes[0]["from_export"] == world["train"] and info.version_changes[0]["to_export"] == changed


def test_action_expert_cli_and_predict(world, config_file, decoupler_runs, tmp_path):
    root = Root(world["root"])
    result = cli("train", "action-expert", "--root", world["root"], "--export", world["train"], "--decouplers",
                 ",".join(decoupler_runs), "--config", str(config_file), "--steps", "20", "--workers", "1",
                 "--run-id", "expert", "--eval-export", world["val"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "action_mse" in result.output
    task, info = load_action_expert(root, "expert")
    assert [d["run_id"] for d in info.config["decouplers"]] == decoupler_runs
    assert task.decouplers.teachers == ["dinov2", "da3"]
    assert info.config["perceiver"]["in_channels"] == 16 + 8 + 12
    stats = ExportStore(root).index(world["train"]).stats["actions"]
    half_range = (np.array(stats.q99) - np.array(stats.q01)) / 2
    assert np.allclose(task.model.normalizer.scale.numpy(), half_range, rtol=1e-5)
    predicted = cli("predict", "--root", world["root"], "--run", "expert", "--clip", "0")
    assert predicted.exit_code == 0, predicted.output + repr(predicted.exception)
    record = json.loads(predicted.output)
    assert np.array(record["prediction"]).shape == (5, 4) and record["action_mse"] >= 0
    maps = cli("predict", "--root", world["root"], "--run", decoupler_runs[0], "--out", str(tmp_path / "p.npy"))
    assert maps.exit_code == 0, maps.output + repr(maps.exception)
    assert np.load(tmp_path / "p.npy").shape == (4, 4, 4, 8) and json.loads(maps.output)["cosine"] > 0.3


def test_action_expert_refuses_decouplers_trained_on_other_features(world, config_file, decoupler_runs):
    root = Root(world["root"])
    info_path = f"runs/{decoupler_runs[0]}"
    step = RunDir(root, decoupler_runs[0]).latest()
    record = root.read_json(info_path, f"step-{step}", "checkpoint.json")
    record["target_versions"]["onestep"] = "video-0000000000ff"
    root.write_json_atomic(f"{info_path}/step-{step}/checkpoint.json", record)
    try:
        result = cli("train", "action-expert", "--root", world["root"], "--export", world["train"], "--decouplers",
                     ",".join(decoupler_runs), "--config", str(config_file), "--steps", "2", "--run-id", "mismatch")
        assert result.exit_code != 0 and "video-0000000000ff" in str(result.exception)
    finally:
        record["target_versions"]["onestep"] = world["video"]
        root.write_json_atomic(f"{info_path}/step-{step}/checkpoint.json", record)


def test_fp8_export_is_decoded_on_the_device_side(world):
    from foresight.trainers.decoupler import DecouplerTask
    from foresight.trainers.config import DataConfig
    from foresight.trainers.exports import open_export
    from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
    from trainers_world import export as make_export

    root = Root(world["root"])
    fp8 = make_export(root, world["plan"], [world["video"], world["dinov2"]], "train", codec="fp8")
    fields = ["onestep", "dinov2.target", "dinov2.reference"]
    task = DecouplerTask(Decoupler(DecouplerConfig.preset("tiny", in_channels=16, teacher_channels=8, frames=4,
                                                          height=4, width=4)), "dinov2")
    data = DataConfig(shuffle_buffer=0, shuffle_shards=False, fp8_on_device=True)
    coded, _ = open_export(root, fp8, fields, data, seed=0)
    sample = next(iter(coded))
    assert sample["onestep"].dtype == np.uint8 and "onestep.fp8scale" in sample
    exact, _ = open_export(root, world["train"], fields, data, seed=0)
    reference = task.collate([next(iter(exact))])
    batch = task.prepare(task.collate([sample]))
    assert set(batch) == {"onestep", "target", "reference"} and batch["onestep"].dtype == torch.float32
    for key in batch:
        error = (batch[key] - reference[key].float()).norm() / reference[key].float().norm()
        assert error < 0.03, (key, float(error))
    cfg = DecouplerRunConfig(size="tiny", loop=LoopConfig(steps=3, batch_size=2, num_workers=0, device="cpu"))
    assert train_decoupler(root, fp8, cfg, run_id="fp8").step == 3
