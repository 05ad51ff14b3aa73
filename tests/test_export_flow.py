"""The export command end to end: Prefect flow, one-line errors, rerun skip, read-back check."""

from __future__ import annotations

import json

from typer.testing import CliRunner
from test_export_store import make_world

from foresight.flows.cli import app
from foresight.storage.exports import ExportStore
from foresight.storage.lineage import events


def test_export_command_runs_the_flow_then_skips_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    world = make_world(tmp_path, num_clips=8)
    args = ["export", "--plan", world["plan"], "--targets", f"{world['video']},{world['teacher']}",
            "--shard-size", "30KB", "--codec", "fp8", "--split", "train", "--root", world["root"]]
    runner = CliRunner()
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    export_id = first.output.split()[0]
    index = ExportStore(world["root"]).index(export_id)
    assert f"exported: {index.num_samples} samples in {len(index.shards)} shards" in first.output
    assert index.recipe.split == "train" and index.recipe.codec == "fp8"
    lineage = json.dumps(events(world["root"]))
    assert export_id in lineage and world["teacher"] in lineage
    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0 and "already exported" in again.output
    check = runner.invoke(app, ["export-check", export_id, "--batch", "2", "--root", world["root"]],
                          catch_exceptions=False)
    assert check.exit_code == 0, check.output
    assert "shards verified" in check.output and "onestep" in check.output and "(2, 10, 4)" in check.output
