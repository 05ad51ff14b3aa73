"""Build hook: stamp the commit a wheel is built from into it (storage/_build_commit), so that
provenance (storage/provenance.git_commit) names foresight's code when it runs from the wheel.
Everything else about the package is declared in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foresight.storage.provenance import BUILD_COMMIT_FILE, checkout_commit  # noqa: E402  (no dependencies)


class BuildPyWithCommit(build_py):
    """build_py, then the checkout's commit written beside storage/provenance.py in the build."""

    def run(self) -> None:
        super().run()
        commit = checkout_commit(HERE)
        if commit is not None and not self.editable_mode:
            target = Path(self.build_lib) / "storage" / BUILD_COMMIT_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
