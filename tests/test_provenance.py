"""Provenance names foresight's own commit: from a checkout its HEAD, from a wheel the commit
stamped into it at build time, and never the commit of a repository it merely runs inside."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from foresight.storage.provenance import BUILD_COMMIT_FILE, checkout_commit, git_commit

CHECKOUT = Path(__file__).resolve().parent.parent


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def _user_repository(folder: Path) -> str:
    """A git repository of the user's own with one commit; returns that commit."""
    folder.mkdir(parents=True)
    _git(folder, "init", "-q")
    (folder / "notes.txt").write_text("the user's work\n")
    _git(folder, "add", "notes.txt")
    _git(folder, "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-q", "-m", "mine")
    return _git(folder, "rev-parse", "HEAD")


def _commit_seen_from(site: Path) -> str:
    """What git_commit() says when foresight is imported from ``site``."""
    code = "from foresight.storage.provenance import git_commit; print(git_commit())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=site,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)})
    return out.stdout.strip()


needs_checkout = pytest.mark.skipif(checkout_commit(CHECKOUT) is None, reason="not run from a git checkout")


@needs_checkout
def test_a_checkout_records_its_own_head():
    assert git_commit() == _git(CHECKOUT, "rev-parse", "HEAD")


def test_a_copy_inside_another_repository_does_not_record_that_repositorys_commit(tmp_path):
    user = tmp_path / "user"
    theirs = _user_repository(user)
    site = user / ".venv" / "site-packages"
    ignore = shutil.ignore_patterns("__pycache__", BUILD_COMMIT_FILE)
    shutil.copytree(CHECKOUT / "foresight", site / "foresight", ignore=ignore)
    shutil.copytree(CHECKOUT / "storage", site / "foresight" / "storage", ignore=ignore)
    assert checkout_commit(site) is None
    assert _commit_seen_from(site) == "None" != theirs


@needs_checkout
def test_a_wheel_records_the_commit_it_was_built_from_wherever_it_is_installed(tmp_path):
    source = tmp_path / "source"
    subprocess.run(["git", "clone", "-q", str(CHECKOUT), str(source)], check=True)
    built_from = _git(source, "rev-parse", "HEAD")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "user" / ".venv" / "site-packages"
    _user_repository(tmp_path / "user")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(f"foresight/storage/{BUILD_COMMIT_FILE}").decode().strip() == built_from
        archive.extractall(site)
    assert _commit_seen_from(site) == built_from
