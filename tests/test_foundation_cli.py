"""CLI errors are one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _foresight(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", "from foresight.flows.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_task_name(tmp_path):
    result = _foresight("ingest", "metaworld", "--dataset", "d", "--tasks", "reach,fly-to-moon",
                        "--root", str(tmp_path), cwd=str(tmp_path))
    _assert_one_line_error(result, "fly-to-moon")


def test_unwritable_root(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: permissions are not enforced")
    result = _foresight("ingest", "metaworld", "--dataset", "d", "--tasks", "reach",
                        "--root", str(locked / "data"), cwd=str(tmp_path))
    _assert_one_line_error(result, "not writable")


def test_unwritable_root_as_root_user(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = _foresight("ingest", "metaworld", "--dataset", "d", "--tasks", "reach",
                        "--root", str(blocker / "data"), cwd=str(tmp_path))
    _assert_one_line_error(result, "not writable")


def test_unknown_config_key(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text('colour = "red"\n')
    result = _foresight("run", str(config), "--root", str(tmp_path / "data"), cwd=str(tmp_path))
    _assert_one_line_error(result, "colour")
