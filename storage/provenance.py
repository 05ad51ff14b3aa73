"""Facts about the machine and software recorded in manifests (never part of a version key)."""

from __future__ import annotations

import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from foresight import DISTRIBUTION

PACKAGES = ("foresight", "torch", "diffusers", "transformers", "zarr", "numpy", "prefect", "webdataset")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            # foresight's own version under its import name, whatever the index calls the distribution
            versions[name] = metadata.version(DISTRIBUTION if name == "foresight" else name)
        except metadata.PackageNotFoundError:
            continue
    return versions


BUILD_COMMIT_FILE = "_build_commit"
"""Written into the wheel's ``storage/`` by setup.py at build time: the commit the wheel was built from."""


def git_commit() -> str | None:
    """The commit of foresight's own code (never of a repository it merely runs inside).

    From a checkout (an editable install, or ``PYTHONPATH``): the HEAD of the checkout this module
    lies in, when that folder is the top of its git repository. From a wheel: the commit stamped
    into it when it was built (setup.py). None when neither is known.
    """
    stamp = Path(__file__).with_name(BUILD_COMMIT_FILE)
    if stamp.is_file():
        return stamp.read_text().strip() or None
    return checkout_commit(Path(__file__).resolve().parent.parent)


def checkout_commit(folder: Path) -> str | None:
    """HEAD of the git repository whose top folder is ``folder``; None when ``folder`` is not the
    top of one (e.g. a site-packages inside the user's own repository: git would answer with the
    user's commit)."""
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != folder.resolve():
        return None
    return _git(folder, "rev-parse", "HEAD")


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def host() -> str:
    return socket.gethostname()
