"""The run store (storage/runs.py): write a run, checkpoint it, read it back; incomplete checkpoints never count."""

from __future__ import annotations

import pytest
import torch

from foresight.storage import layout
from foresight.storage.fs import Root
from foresight.storage.runs import CheckpointInfo, MetricsLog, RunDir, RunSpec, read_metrics


def spec_of(root: Root) -> RunSpec:
    return RunSpec(root, "dec-roundtrip", "decoupler", "export-abc", {"onestep": "video-000000000001"},
                   {"loop": {"steps": 4}}, extra={"note": "test"})


def info_at(spec: RunSpec, step: int) -> CheckpointInfo:
    return CheckpointInfo(step=step, run_id=spec.run_id, kind=spec.kind, export_id=spec.export_id,
                          target_versions=spec.target_versions, config=spec.config, world=1,
                          stream={"0": {"num_workers": 1, "workers": {"0": {"epoch": 0, "position": step}},
                                        "next_worker": 0}})


def test_a_run_round_trips_and_only_complete_checkpoints_count(tmp_path):
    root = Root(tmp_path)
    spec = spec_of(root)
    run = RunDir(root, spec.run_id)
    run.write_run_json(spec, [], status="running")
    weights = {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    trainer_state = {"step": 2, "rng": {"0": {"cpu": torch.get_rng_state()}}}
    assert run.save(info_at(spec, 2), weights, trainer_state) == layout.step_dir(spec.run_id, 2)
    # A writer that died mid-checkpoint, and a step folder without its marker: neither is a checkpoint.
    root.write_json_atomic(f"{layout.partial_step_dir(spec.run_id, 4, 'dead')}/{layout.CHECKPOINT_RECORD}", {})
    root.write_json_atomic(f"{layout.step_dir(spec.run_id, 6)}/{layout.CHECKPOINT_RECORD}", {"step": 6})
    assert run.checkpoints() == [2] and run.latest() == 2
    with pytest.raises(ValueError, match="no complete checkpoint step-6"):
        run.info(6)

    info, model_state, state = RunDir(root, spec.run_id).load(2)
    assert info.step == 2 and info.export_id == "export-abc" and info.stream == info_at(spec, 2).stream
    assert set(info.files) == {layout.CHECKPOINT_MODEL, layout.CHECKPOINT_TRAINER} and info.created
    assert torch.equal(model_state["layer.weight"], weights["layer.weight"]) and state["step"] == 2
    record = run.read_run_json()
    assert record["status"] == "running" and record["target_versions"] == spec.target_versions
    assert record["extra"] == {"note": "test"}

    run.clear_partial()
    assert not any(name.startswith(layout.PARTIAL_STEP_PREFIX) for name in root.ls(run.rel))
    run.save(info_at(spec, 6), weights, trainer_state)  # replaces the incomplete leftover of the same name
    run.save(info_at(spec, 8), weights, trainer_state)
    assert run.checkpoints() == [2, 6, 8]
    run.prune(keep_last=2)
    assert run.checkpoints() == [6, 8] and run.load_model()[0].step == 8


def test_a_changed_checkpoint_file_is_refused(tmp_path):
    root = Root(tmp_path)
    spec = spec_of(root)
    run = RunDir(root, spec.run_id)
    run.save(info_at(spec, 3), {"w": torch.ones(2)}, {"step": 3})
    root.write_bytes_atomic(f"{layout.step_dir(spec.run_id, 3)}/{layout.CHECKPOINT_TRAINER}", b"other bytes")
    with pytest.raises(ValueError, match="trainer.pt: sha256 does not match checkpoint.json"):
        run.load(3)


def test_metrics_resume_drops_the_lines_past_the_resumed_step(tmp_path):
    root = Root(tmp_path)
    spec = spec_of(root)
    run = RunDir(root, spec.run_id)
    run.write_run_json(spec, [], status="running")  # fit writes the record before the first metrics line
    first = MetricsLog(run, enabled=True, resume_step=0)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "split": "train", "loss": 1.0 / step})
    MetricsLog(run, enabled=True, resume_step=2).write({"step": 3, "split": "train", "loss": 0.5})
    MetricsLog(run, enabled=False, resume_step=0).write({"step": 99})  # a rank other than 0 writes nothing
    assert [(m["step"], m["loss"]) for m in read_metrics(root, spec.run_id)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert read_metrics(root, "no-such-run") == []


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_earlier_one_is_named(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    run = RunDir(Root(tmp_path), "r")
    log = MetricsLog(run, enabled=True, resume_step=0)
    for step in (1, 2):
        log.write({"step": step, "loss": 0.5})
    path = tmp_path / "runs" / "r" / "metrics.jsonl"
    with open(path, "a") as handle:
        handle.write('{"step": 3, "loss": 0.7')  # a crash mid-append
    assert [r["step"] for r in read_metrics(Root(tmp_path), "r")] == [1, 2]
    resumed = MetricsLog(run, enabled=True, resume_step=2)  # a resume goes on past it
    resumed.write({"step": 3, "loss": 0.4})
    assert [r["step"] for r in read_metrics(Root(tmp_path), "r")] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a JSON record"):
        read_metrics(Root(tmp_path), "r")


@pytest.mark.parametrize("key", ["steps", "batch_size", "log_every", "checkpoint_every", "keep_last"])
def test_loop_counts_below_one_are_refused_naming_the_key(key):
    from pydantic import ValidationError

    from foresight.trainers.config import LoopConfig

    with pytest.raises(ValidationError, match=key):
        LoopConfig(**{key: 0})


def test_an_override_under_a_key_that_is_not_a_table_is_one_line(tmp_path):
    from foresight.schemas.base import StrictModel
    from foresight.trainers.config import LoopConfig, load_config

    class Run(StrictModel):
        loop: LoopConfig = LoopConfig()

    path = tmp_path / "run.toml"
    path.write_text("loop = 3\n")
    with pytest.raises(ValueError, match=rf"{path}: 'loop' must be a table \(it holds 3\), so 'loop.steps' cannot"):
        load_config(Run, path, {"loop.steps": 2})
