"""``foresight targets list|show|verify|diff|gc`` end to end on a tiny root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.flows.cli.targets import version_diff
from foresight.storage import lineage
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore, shard_object
from test_audit_store import build_world, flip_byte, make_teacher, make_version, make_video, teacher_arrays, write_export

runner = CliRunner()


def invoke(root: str, *args: str, input: str | None = None):
    return runner.invoke(app, [*args, "--root", root], input=input)


@pytest.fixture()
def world(tmp_path):
    return build_world(tmp_path)


def test_list_json_and_table(world):
    result = invoke(world["root"], "targets", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json.loads(result.output)}
    assert set(rows) == {world["video"], world["teacher"]}
    teacher = rows[world["teacher"]]
    assert (teacher["kind"], teacher["weights"], teacher["status"], teacher["clips"]) == ("teacher", "tiny", "complete", 6)
    assert teacher["inputs"] == {"video": world["video"]} and teacher["bytes"] > 0 and teacher["created"]
    table = invoke(world["root"], "targets", "list", "--kind", "video")
    assert table.exit_code == 0 and world["video"] in table.output and world["teacher"] not in table.output


def test_show_lineage_and_users(world):
    write_export(Root(world["root"]), "export-cccccccccccc", {"frames": world["video"], "dinov2.target": world["teacher"]})
    result = invoke(world["root"], "targets", "show", world["teacher"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["manifest"]["id"] == world["teacher"] and data["manifest"]["recipe"]["params"]["resolution"] == 224
    plan = data["lineage"]["children"][0]["children"][0]
    assert plan["id"] == world["plan"] and plan["children"][0]["details"]["fingerprint"]
    assert data["used_by"] == [{"kind": "export", "id": "export-cccccccccccc", "direct": True}]
    text = invoke(world["root"], "targets", "show", world["video"])
    assert text.exit_code == 0 and "dataset demo" in text.output and "export export-cccccccccccc" in text.output


def test_verify_exit_codes_and_named_shard(world):
    ok = invoke(world["root"], "targets", "verify", "--all")
    assert ok.exit_code == 0, ok.output
    store = TargetStore(world["root"])
    path = store.root.path(shard_object(store.manifest(world["teacher"]), "target", 0))
    flip_byte(path, os.path.getsize(path) // 3)
    bad = invoke(world["root"], "targets", "verify", world["teacher"])
    assert bad.exit_code == 1
    assert f"{world['teacher']}: array 'target' shard 0 is corrupt" in bad.output
    assert invoke(world["root"], "targets", "verify", "--all").exit_code == 1
    assert invoke(world["root"], "targets", "verify").exit_code == 1  # neither VERSION nor --all
    assert invoke(world["root"], "targets", "verify", "teacher-000000000000").exit_code == 1


def test_verify_all_skips_building_and_reports_unreadable_manifest(world):
    root = Root(world["root"])
    building = make_teacher(root, world["video"], resolution=32, finalize=False)
    Path(root.path(f"targets/{world['video']}/manifest.json")).write_text("{not json")
    result = invoke(world["root"], "targets", "verify", "--all")
    assert result.exit_code == 1
    assert f"skip    {building} (still building)" in result.output
    assert f"FAILED  {world['video']}" in result.output and f"ok      {world['teacher']}" in result.output


def test_diff_with_itself_shows_zero_drift(world):
    diff = version_diff(TargetStore(world["root"]), world["teacher"], world["teacher"])
    assert diff.recipe == [] and diff.layout == []
    assert [d.array for d in diff.arrays if d.compared] == ["target", "reference"]
    for drift in diff.arrays:
        stats = drift.stats
        assert (stats.mean_abs_diff, stats.max_abs_diff, stats.rel_l2) == (0.0, 0.0, 0.0)
        assert stats.cosine["q0"] == pytest.approx(1.0) and stats.clips == 6


def test_diff_after_one_changed_parameter_names_it(world):
    root = Root(world["root"])
    other = make_teacher(root, world["video"], resolution=448, seed=2)
    result = invoke(world["root"], "targets", "diff", world["teacher"], other, "--sample", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [c["path"] for c in data["recipe"]] == ["params.resolution"]
    assert (data["recipe"][0]["a"], data["recipe"][0]["b"]) == (224, 448)
    target = next(a for a in data["arrays"] if a["array"] == "target")
    assert target["compared"] and target["stats"]["clips"] == 3 and target["stats"]["rel_l2"] > 0.5
    text = invoke(world["root"], "targets", "diff", world["teacher"], other)
    assert "params.resolution: 224 -> 448" in text.output and "relL2=" in text.output


def test_diff_over_another_plan_or_shape_is_not_compared(world):
    root = Root(world["root"])
    video2 = make_video(root, world["plan"], steps=5)
    arrays = teacher_arrays(4)
    arrays["target"] = arrays["target"][:, :, :2]  # another grid
    other = make_version(root, "teacher", arrays, {"video": video2}, {"teacher": "dinov2", "resolution": 224})
    diff = version_diff(TargetStore(root), world["teacher"], other)
    assert "inputs.video" in [c.path for c in diff.recipe]
    reasons = {d.array: d.reason for d in diff.arrays}
    assert "shapes differ" in reasons["target"] and diff.arrays[1].compared  # reference: same plan, same shape
    assert np.isfinite(diff.arrays[1].stats.rel_l2)


def test_gc_dry_run_confirm_and_yes(world):
    root = Root(world["root"])
    write_export(root, "export-dddddddddddd", {"dinov2.target": world["teacher"]})
    spare = make_teacher(root, world["video"], resolution=96, seed=9)
    dry = invoke(world["root"], "targets", "gc", "--dry-run")
    assert dry.exit_code == 0 and f"remove  {spare}" in dry.output and "would remove 1 versions" in dry.output
    declined = invoke(world["root"], "targets", "gc", input="n\n")
    assert declined.exit_code == 0 and "nothing removed" in declined.output
    assert TargetStore(root).status(spare) == "complete"
    done = invoke(world["root"], "targets", "gc", "--yes")
    assert done.exit_code == 0, done.output
    store = TargetStore(root)
    assert store.status(spare) is None
    assert store.status(world["teacher"]) == "complete" and store.status(world["video"]) == "complete"
    assert any(e["job"]["name"] == "targets.gc" and spare in str(e["inputs"]) for e in lineage.events(root))
