"""Shallow-π training from an export of a tiny teacher's pi0 targets: offline, online, resume, guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from foresight.flows import pi0 as pi0_flow
from foresight.flows.build import build, in_process
from foresight.flows.cli import app
from foresight.flows.cli.common import user_error_message
from foresight.flows.export import ExportConfig, export_recipe, plan_export, write_shard
from foresight.pipelines import pi0
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.storage.episodes import EpisodeStore
from foresight.storage.exports import ExportStore
from foresight.storage.fs import open_root
from foresight.trainers import shallow_pi
from foresight.storage.runs import read_metrics
from foresight.trainers.config import LoopConfig
from foresight.trainers.data import ShardStream

PLAN = "plan-pi0train001"
FEATURES = {"state": FeatureSpec(dtype="float32", shape=[6]), "action": FeatureSpec(dtype="float32", shape=[4])}


def write_dataset(root: str) -> None:
    rng = np.random.default_rng(5)
    store = EpisodeStore(root, "toy")
    store.write_info(DatasetInfo(name="toy", source_kind="synthetic", source="test", source_fingerprint="e" * 64,
                                 fps=10.0, cameras={"front": [32, 32, 3]}, features=FEATURES))
    record = EpisodeRecord(episode_id="ep0", task="reach", instructions=["reach"], length=70,
                           source_path="test", source_checksum="c0")
    with store.writer(record, FEATURES) as writer:
        writer.append_frames("front", rng.integers(0, 256, size=(70, 32, 32, 3), dtype=np.uint8))
        writer.set_lowdim({"state": rng.normal(size=(70, 6)), "action": rng.uniform(-1, 1, (70, 4))})
    rows = [ClipRow(clip_id=f"clip{i}", dataset="toy", episode_id="ep0", camera="front", start=8 * i,
                    num_frames=4, stride=1, instruction="reach the red button") for i in range(6)]
    PlanStore_write(root, store, rows)


def PlanStore_write(root: str, store: EpisodeStore, rows: list[ClipRow]) -> None:
    from foresight.storage.plans import PlanStore

    PlanStore(root).write(PlanInfo(plan_id=PLAN, dataset="toy", dataset_fingerprint=store.fingerprint(),
                                   params={}, num_clips=len(rows)), rows)


def export_version(root: str, version: str) -> str:
    config = ExportConfig(plan=PLAN, targets=[version], codec="f16")
    recipe = export_recipe(root, config)
    store = ExportStore(root)
    store.begin(plan_export(root, recipe))
    for shard in store.pending_shards(recipe.export_id()):
        write_shard(root, recipe.export_id(), shard)
    store.finalize(recipe.export_id())
    return recipe.export_id()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shallowpi"))
    write_dataset(root)
    config = pi0_flow.Pi0TargetsConfig(plan=PLAN, model="tiny", pairs=2, attn_layers=[1, 2, 3], shard_size=3,
                                       batch=3, max_text_tokens=24)
    result = build(pi0_flow.PI0, root, config, in_process)
    return {"root": root, "version": result.version, "export": export_version(root, result.version)}


def run_config(**overrides) -> shallow_pi.ShallowPiRunConfig:
    loop = LoopConfig(steps=4, batch_size=2, num_workers=0, device="cpu", log_every=1, checkpoint_every=2,
                      progress=False, seed=3)
    values = dict(layers=2, attn_layers=[1], loop=loop)  # the teacher is read from the pi0 version
    values.update(overrides)
    return shallow_pi.ShallowPiRunConfig(**values)


def train_losses(root, run_id: str) -> list[float]:
    return [m["loss"] for m in read_metrics(open_root(root), run_id) if m.get("split") == "train"]


def test_offline_training_writes_checkpoints_and_a_loadable_student(world):
    cfg = run_config(mode="offline")
    assert "pi0.attn" in cfg.fields() and "pi0.velocity" in cfg.fields()
    result = shallow_pi.train_shallow_pi(open_root(world["root"]), world["export"], cfg, run_id="spi-offline",
                                         eval_export=world["export"])
    assert result.step == 4 and result.checkpoint is not None
    assert set(result.eval) >= {"task", "kd", "attn", "total", "action_mse"}
    assert result.eval["attn"] > 0 and result.eval["kd"] > 0
    losses = train_losses(world["root"], "spi-offline")
    assert len(losses) == 4 and all(np.isfinite(losses))
    student, info = shallow_pi.load_student(open_root(world["root"]), "spi-offline")
    assert info.config["layer_map"] == [0, 3] and info.target_versions["pi0.velocity"] == world["version"]
    assert len(student.model.vlm.language_model.layers) == 2 and len(student.model.dit.layers) == 2


def test_stopping_and_resuming_gives_the_same_losses(world):
    root = open_root(world["root"])
    cfg = run_config(mode="offline", loop=run_config().loop.model_copy(update={"checkpoint_every": 1}))
    shallow_pi.train_shallow_pi(root, world["export"], cfg, run_id="spi-whole")
    shallow_pi.train_shallow_pi(root, world["export"], cfg, run_id="spi-split", stop_at=2)
    resumed = shallow_pi.train_shallow_pi(root, world["export"], cfg, run_id="spi-split")
    assert resumed.resumed_from == 2
    assert train_losses(world["root"], "spi-split") == train_losses(world["root"], "spi-whole")


def test_online_training_runs_the_teacher_on_augmented_inputs(world):
    cfg = run_config(loop=run_config().loop.model_copy(update={"steps": 2}))
    assert cfg.augments and "pi0.velocity" not in cfg.fields()
    result = shallow_pi.train_shallow_pi(open_root(world["root"]), world["export"], cfg, run_id="spi-online",
                                         eval_export=world["export"])
    assert result.step == 2 and result.eval["kd"] > 0 and result.eval["attn"] > 0


def test_offline_and_online_tasks_agree_on_an_exported_batch(world):
    """Same batch, same pairs: the cached (f16-exported) targets and the teacher run now give the
    same losses up to the export's float16 rounding of velocity and attention."""
    stream = ShardStream(world["root"], world["export"], [world["version"]], seed=0, shuffle_shards=False,
                         shuffle_buffer=0)
    samples = [sample for _, sample in zip(range(3), stream)]
    teacher = pi0.load_pi0("tiny").model
    student, layer_map = shallow_pi.build_student(teacher, 2)
    offline = shallow_pi.ShallowPiTask(student, None, layer_map, run_config(teacher="tiny", mode="offline"))
    online = shallow_pi.ShallowPiTask(student, teacher, layer_map, run_config())
    batch = offline.collate(samples)
    pair_index = np.array([1, 0, 1])
    seeds = batch["noise_seed"].numpy()[np.arange(3), pair_index]
    with torch.no_grad():
        from_cache = offline.losses(student, batch, False, pair_index, None)
        from_teacher = online.losses(student, batch, False, None, seeds)
    assert torch.equal(from_cache["task"], from_teacher["task"])  # f16-exact inputs, exact t and noise
    for name in ("kd", "attn", "total"):
        torch.testing.assert_close(from_cache[name], from_teacher[name], rtol=2e-3, atol=1e-5)


def test_cli_trains_and_reports_bad_options(world):
    base = ["train", "shallow-pi", "--export", world["export"], "--layers", "2",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--root", world["root"]]
    ok = CliRunner().invoke(app, [*base, "--attn-layers", "1", "--steps", "1", "--run-id", "spi-cli",
                                  "--mode", "offline"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("run spi-cli: step 1") and "checkpoint" in ok.output
    bad = CliRunner().invoke(app, [*base, "--mode", "offline", "--augment", "--steps", "1"])
    assert bad.exit_code != 0 and user_error_message(bad.exception) == \
        "augmentation needs --mode online: the cached targets were computed on unaugmented images"


def test_guards(world):
    root = open_root(world["root"])
    with pytest.raises(ValueError, match="augmentation needs --mode online"):
        shallow_pi.train_shallow_pi(root, world["export"], run_config(mode="offline", augment=True))
    with pytest.raises(ValueError, match=r"was made by teacher 'tiny' \[model-\w+\], not by 'tiny' \[model-"):
        shallow_pi.train_shallow_pi(root, world["export"], run_config(mode="offline", teacher="tiny", tiny_layers=3))
    with pytest.raises(ValueError, match=r"teacher layers \[0\] are not among the cached attention layers"):
        shallow_pi.train_shallow_pi(root, world["export"], run_config(mode="offline", attn_layers=[0]),
                                    run_id="spi-bad")
