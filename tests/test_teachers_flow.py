"""The teachers flow and CLI over a (fake) video version: layout, values, resume, versioning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from foresight.flows import teachers as tflow
from foresight.flows import teachers_engine as engine
from foresight.flows import teachers_io
from foresight.flows.cli import app
from foresight.flows.runtime import run_flow
from foresight.pipelines.teachers import load_teacher
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage.episodes import EpisodeStore
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore

REPO = Path(__file__).resolve().parents[1]
PLAN = "plan-teachertest01"
FEATURES = {"action": FeatureSpec(dtype="float32", shape=[2])}
N, T, SIZE = 5, 3, 40
STARTS = [("ep0", 0), ("ep0", 7), ("ep1", 2), ("ep1", 11), ("ep0", 15)]


def write_episodes_and_plan(root: str) -> np.ndarray:
    """Two episodes and a 5-clip plan; returns the observed frames (N, H, W, 3)."""
    rng = np.random.default_rng(0)
    store = EpisodeStore(root, "toy")
    store.write_info(DatasetInfo(name="toy", source_kind="synthetic", source="test", source_fingerprint="0" * 64,
                                 fps=10.0, cameras={"front": [SIZE, SIZE, 3]}, features=FEATURES))
    for index in range(2):
        record = EpisodeRecord(episode_id=f"ep{index}", task="reach", length=20, source_path="test",
                               source_checksum=f"c{index}")
        with store.writer(record, FEATURES) as writer:
            writer.append_frames("front", rng.integers(0, 256, (20, SIZE, SIZE, 3), dtype=np.uint8))
            writer.set_lowdim({"action": np.zeros((20, 2), np.float32)})
    rows = [ClipRow(clip_id=f"c{i}", dataset="toy", episode_id=ep, camera="front", start=start, num_frames=T,
                    stride=1, instruction="reach") for i, (ep, start) in enumerate(STARTS)]
    PlanStore(root).write(PlanInfo(plan_id=PLAN, dataset="toy", dataset_fingerprint=store.fingerprint(), params={},
                                   num_clips=N), rows)
    return np.stack([store.read_frames(ep, "front", [start])[0] for ep, start in STARTS])


def write_fake_video(root: str, with_observed: np.ndarray | None = None, complete: bool = True) -> tuple[str, np.ndarray]:
    """A `video` version as the SVD stage would write it (frames, seed), 2 clips per shard."""
    frames = np.random.default_rng(1).integers(0, 256, (N, T, 48, 48, 3), dtype=np.uint8)
    arrays = [ArraySpec(name="frames", shape=[N, T, 48, 48, 3], dtype="uint8"),
              ArraySpec(name="seed", shape=[N], dtype="int64")]
    data = {"frames": frames, "seed": np.arange(N, dtype=np.int64)}
    inputs = {"plan": PLAN}
    if with_observed is not None:
        arrays.append(ArraySpec(name="observed", shape=[N, SIZE, SIZE, 3], dtype="uint8"))
        data["observed"], inputs = with_observed, {"frames": "test"}
    recipe = TargetRecipe(kind="video", stage="test.fake-video", stage_version=1, params={"observed": with_observed
                                                                                         is not None}, inputs=inputs)
    writer = TargetStore(root).begin(recipe, arrays, N, shard_size=2)
    for shard in range(writer.num_shards):
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {k: v[clips.start:clips.stop] for k, v in data.items()})
    if complete:
        writer.finalize()
    return writer.version_id, frames


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("teachers"))
    observed = write_episodes_and_plan(root)
    video, frames = write_fake_video(root)
    return root, video, frames, observed


def config(video: str, **overrides) -> tflow.TeachersConfig:
    values = dict(video=video, teacher="dinov2", model="tiny", batch=2, writers=1)
    values.update(overrides)
    return tflow.TeachersConfig(**values)


@pytest.fixture(scope="module")
def dinov2_version(world):
    root, video, _, _ = world
    return run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video))


def test_flow_writes_target_and_reference(world, dinov2_version):
    root, video, frames, observed = world
    summary = dinov2_version
    assert summary.status == "complete" and summary.clips == N and summary.frames == N * T
    reader = TargetStore(root).open(summary.version)
    manifest = reader.manifest
    assert manifest.kind == "teacher" and manifest.recipe.input_ids() == {"video": video}
    assert manifest.recipe.model.source == "tiny" and manifest.recipe.params["teacher"] == "dinov2"
    assert manifest.num_shards == 3 and reader.verify() == []
    target, reference = reader.read("target"), reader.read("reference")
    assert target.shape == (N, T, 16, 16, 32) and target.dtype == np.float16
    assert reference.shape == (N, 1, 16, 16, 32) and reference.dtype == np.float16
    teacher = load_teacher("dinov2", "tiny")
    direct_target, direct_ref = teacher.encode_clips(torch.from_numpy(frames), torch.from_numpy(observed))
    np.testing.assert_array_equal(target, direct_target.numpy())
    np.testing.assert_array_equal(reference, direct_ref.numpy())


def test_rerun_skips_a_complete_version(world, dinov2_version):
    root, video, _, _ = world
    again = run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video))
    assert again.skipped and again.version == dinov2_version.version


def test_cli_runs_da3_and_reports_the_version(world):
    root, video, frames, observed = world
    args = ["teachers", "--video", video, "--teacher", "da3", "--model", "tiny", "--batch", "3", "--root", root]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    version = result.output.split()[0]
    assert version.startswith("teacher-") and "complete: 5 clips, 15 frames" in result.output
    reader = TargetStore(root).open(version)
    assert reader.read("target").shape == (N, T, 16, 16, 64)
    teacher = load_teacher("da3", "tiny")
    # DA3 attends across the T frames of a clip: the stored clip equals one all-views call.
    np.testing.assert_array_equal(reader.read("target", [3]), teacher.encode_frames(torch.from_numpy(frames[3:4])).numpy())
    np.testing.assert_array_equal(reader.read("reference", [3]),
                                  teacher.encode_frames(torch.from_numpy(observed[3:4, None])).numpy())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.parametrize("argv, expected, code", [
    (["--video", "video-000000000000"], "video version 'video-000000000000': not found", 1),
    (["--settings", "{\"bogus\": 1}"], "unknown key 'bogus'", 1),
    (["--settings", "[1]"], "--settings: expected a JSON object", 1),
    (["--model", "weights.pt"], "model spec 'weights.pt'", 1),
    (["--dtype", "int8"], "dtype", 2),  # not one of the choices: a usage error
])
def test_cli_errors_are_one_line(world, monkeypatch, capsys, argv, expected, code):
    from foresight.flows.cli import main

    root, video, _, _ = world
    base = {"--video": video, "--teacher": "dinov2", "--model": "tiny", "--root": root}
    base.update(dict(zip(argv[::2], argv[1::2])))
    monkeypatch.setattr(sys, "argv", ["foresight", "teachers", *[x for kv in base.items() for x in kv]])
    with pytest.raises(SystemExit) as exit_info:
        main()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == code and expected in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_new_version_when_teacher_weights_or_settings_change(world, tmp_path):
    root, video, _, _ = world
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from foresight.pipelines.teachers.dinov2 import TINY

    def version(teacher: str, model: str, settings=None, dtype="fp32") -> str:
        return engine.teacher_recipe(load_teacher(teacher, model, settings, dtype=dtype), video).version_id()

    for seed in (0, 1):
        torch.manual_seed(seed)
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY)).save_pretrained(tmp_path / f"w{seed}")
    base = version("dinov2", "tiny")
    assert base == version("dinov2", "tiny")
    others = [version("da3", "tiny"), version("dinov2", f"dir:{tmp_path / 'w0'}"),
              version("dinov2", f"dir:{tmp_path / 'w1'}"), version("dinov2", "tiny", {"preprocess": {"height": 112,
                                                                                                   "width": 112}}),
              version("dinov2", "tiny", dtype="bf16"), version("da3", "tiny", {"stage": 1})]
    assert len({base, *others}) == 1 + len(others)
    # A copy of the same weights elsewhere is the same model: the digest keys the version, not the path.
    (tmp_path / "copy").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "copy" / name).write_bytes((tmp_path / "w0" / name).read_bytes())
    assert version("dinov2", f"dir:{tmp_path / 'copy'}") == others[1]


def running_prefect_api() -> dict[str, str]:
    """The API of the Prefect server this process already started (saves the child a server start)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    return {"PREFECT_API_URL": server.api_url} if server is not None and server.running else {}


CRASH = """
import os, signal, sys
from foresight.storage.targets import TargetWriter
original = TargetWriter.write_shard
def crash(self, index, arrays, **options):
    if index == 1:  # die half way through shard 1: data partly written, no _done marker
        self.array("target")[2:4] = arrays["target"]
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, index, arrays, **options)
TargetWriter.write_shard = crash
from foresight.flows.cli import main
main()
"""


def test_resume_after_sigkill(world, dinov2_version, tmp_path):
    _, _, frames, observed = world
    root = str(tmp_path / "root")
    write_episodes_and_plan(root)
    video, _ = write_fake_video(root)
    command = [sys.executable, "-c", CRASH, "teachers", "--video", video, "--teacher", "dinov2", "--model", "tiny",
               "--batch", "2", "--writers", "1", "--root", root]
    killed = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **running_prefect_api()})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = TargetStore(root)
    (version,) = store.ids("teacher")
    assert store.status(version) == "building" and store.writer(version).pending_shards() == [1, 2]
    summary = run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video))
    assert summary.version == version and summary.status == "complete" and summary.clips == 3
    reader = store.open(version)
    assert reader.verify() == []
    direct_target, direct_ref = load_teacher("dinov2", "tiny").encode_clips(torch.from_numpy(frames),
                                                                           torch.from_numpy(observed))
    np.testing.assert_array_equal(reader.read("target"), direct_target.numpy())
    np.testing.assert_array_equal(reader.read("reference"), direct_ref.numpy())


@pytest.mark.parametrize("io_processes", [False, True], ids=["io-threads", "io-processes"])
def test_observed_array_of_the_video_version_is_used(tmp_path, io_processes):
    root = str(tmp_path)
    observed = np.random.default_rng(9).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    video, frames = write_fake_video(root, with_observed=observed)
    teacher = load_teacher("dinov2", "tiny")
    reader = TargetStore(root).open(video)
    writer = TargetStore(root).begin(engine.teacher_recipe(teacher, video), engine.teacher_arrays(N, T, teacher), N,
                                     shard_size=2)
    result = engine.encode_shards(teacher, reader, teachers_io.ObservedFrames(root, reader), writer, [0, 1, 2],
                                  batch=3, writers=2, readers=2, io_processes=io_processes)
    assert result.clips == N and result.shards_written == [0, 1, 2]
    writer.finalize()
    written = TargetStore(root).open(writer.version_id)
    assert written.verify() == []
    direct_target, direct_ref = teacher.encode_clips(torch.from_numpy(frames), torch.from_numpy(observed))
    np.testing.assert_array_equal(written.read("target"), direct_target.numpy())
    np.testing.assert_array_equal(written.read("reference"), direct_ref.numpy())


def test_video_version_problems_are_named(world, tmp_path):
    root, _, _, _ = world
    building, _ = write_fake_video(str(tmp_path), complete=False)
    with pytest.raises(ValueError, match="still 'building'"):
        teachers_io.open_video(str(tmp_path), building)
    complete = TargetStore(root).ids("teacher")[0]
    with pytest.raises(ValueError, match="expected 'video'"):
        teachers_io.open_video(root, complete)


def test_teachers_over_a_video_version_made_by_the_generate_flow(tmp_path, dinov2_version):
    """The real `video` layout (frames, onestep, seed; observed frames through the plan)."""
    from foresight.flows.generate import GenerateConfig, PlanConfig, TextConfig, generate_flow, make_plan, text_flow
    from foresight.pipelines.svd import SVDParams

    root = str(tmp_path)
    write_episodes_and_plan(root)
    plan = make_plan(root, PlanConfig(dataset="toy", frames=3, stride=2, every=6, limit=3))
    text = run_flow(text_flow, None, None, root_url=root, config=TextConfig(plan=plan.plan_id, model="tiny",
                                                                          shard_size=4))
    video = run_flow(generate_flow, None, None, root_url=root, config=GenerateConfig(
        plan=plan.plan_id, text=text.version, model="tiny", params=SVDParams(num_frames=3, size=32, steps=1),
        batch=2, shard_size=2))
    summary = run_flow(tflow.teachers_flow, None, None, root_url=root, config=config(video.version))
    reader = TargetStore(root).open(summary.version)
    assert summary.status == "complete" and reader.verify() == []
    assert reader.read("target").shape == (3, 3, 16, 16, 32)
    rows = PlanStore(root).rows(plan.plan_id)
    observed = np.stack([EpisodeStore(root, "toy").read_frames(r.episode_id, r.camera, [r.start])[0] for r in rows])
    teacher = load_teacher("dinov2", "tiny")
    np.testing.assert_array_equal(reader.read("reference"),
                                  teacher.encode_frames(torch.from_numpy(observed[:, None])).numpy())
    frames = TargetStore(root).open(video.version).read("frames")
    np.testing.assert_array_equal(reader.read("target"), teacher.encode_frames(torch.from_numpy(frames)).numpy())

