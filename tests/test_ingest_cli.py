"""``foresight ingest teleop`` through Prefect: a partial run lands the good items and exits 3.

(--strict is covered in-process by each reader's tests: one Prefect start per test is costly.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fixtures_sources as fx
from foresight.storage.episodes import EpisodeStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _foresight(*args: str, cwd: str) -> subprocess.CompletedProcess:
    # The embedded Prefect server can take long to start on a loaded machine.
    env = {**os.environ, "PYTHONPATH": REPO, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    return subprocess.run([sys.executable, "-c", "from foresight.flows.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def test_partial_run_exits_3(tmp_path):
    src = tmp_path / "aloha"
    for index in range(3):
        fx.make_teleop_episode(src / f"episode_{index}.hdf5", length=5, compress=index != 1)
    (src / "episode_1.hdf5").write_bytes(b"\0" * 100)
    root = str(tmp_path / "root")
    result = _foresight("ingest", "teleop", str(src), "--dataset", "aloha", "--root", root, "--workers", "1",
                        cwd=str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert "2 written (10 frames), 0 unchanged, 1 quarantined" in result.stdout
    quarantined = [line for line in result.stderr.splitlines() if line.startswith("quarantined: ")]
    assert len(quarantined) == 1 and "episode_1.hdf5, episode 'episode_1'" in quarantined[0]
    assert EpisodeStore(root, "aloha").episode_ids() == ["episode_0", "episode_2"]

