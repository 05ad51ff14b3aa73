"""``foresight conformance DIR``: one line per array, exit 0 / 1 (out of tolerance) / 2 (not a fixture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from foresight.flows.cli import app

REFERENCE = Path(__file__).resolve().parent / "reference"
runner = CliRunner()


def conformance(*args: str):
    return runner.invoke(app, ["conformance", *map(str, args)])


def lines(output: str) -> dict[tuple[str, str], list[str]]:
    rows = [line.split() for line in output.splitlines() if line and not line.endswith("within tolerance")]
    return {(row[0], row[1]): row for row in rows}


def test_vendored_extract_group_passes_with_one_line_per_array():
    result = conformance(REFERENCE / "svam_tiny", "--group", "extract")
    assert result.exit_code == 0, result.output
    rows = lines(result.output)
    assert ("extract", "features") in rows and len(rows) == 18
    assert all(row[-1] == "ok" for row in rows.values())
    features = rows[("extract", "features")]
    assert float(features[2]) < 2e-4 and features[3:7] == ["atol", "2.0e-04", "rtol", "1.0e-04"]


def test_vendored_da3_fixture_passes():
    result = conformance(REFERENCE / "da3_tiny")
    assert result.exit_code == 0, result.output
    assert ("da3", "svam_targets") in lines(result.output)


def test_damaged_copy_fails_naming_the_array(tmp_path):
    damaged = tmp_path / "svam"
    shutil.copytree(REFERENCE / "svam_tiny", damaged)
    with np.load(damaged / "io.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["extract.features"] = arrays["extract.features"] + 1e-2
    np.savez(damaged / "io.npz", **arrays)
    result = conformance(damaged, "-g", "extract")
    assert result.exit_code == 1, result.output
    rows = lines(result.output)
    assert rows[("extract", "features")][-1] == "FAIL" and rows[("extract", "mid_out")][-1] == "ok"


def test_missing_weights_are_a_failing_line_not_a_crash(tmp_path):
    damaged = tmp_path / "svam"
    shutil.copytree(REFERENCE / "svam_tiny", damaged)
    (damaged / "model_unet.safetensors").unlink()
    result = conformance(damaged, "-g", "extract")
    assert result.exit_code == 1, result.output
    assert "FAIL" in lines(result.output)[("extract", "(group)")]


def test_folder_that_is_not_a_fixture_exits_2(tmp_path):
    assert conformance(tmp_path).exit_code == 2
    np.savez(tmp_path / "io.npz", other=np.zeros(1))
    (tmp_path / "config.json").write_text(json.dumps({}))
    result = conformance(tmp_path)
    assert result.exit_code == 2 and "none of the groups" in result.output


def test_requested_group_absent_from_the_fixture_fails():
    result = conformance(REFERENCE / "da3_tiny", "--group", "extract")
    assert result.exit_code == 1 and "holds none of its arrays" in result.output


def test_unknown_group_is_a_one_line_error():
    result = conformance(REFERENCE / "da3_tiny", "--group", "nosuch")
    assert result.exit_code == 1 and "unknown" in result.output
