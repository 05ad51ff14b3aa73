"""Build hooks. The package layout: the repository's top-level folders (schemas/ storage/
pipelines/ flows/ trainers/) are mapped into the one import namespace ``foresight.*``, so a wheel
installs ``foresight/`` and nothing else at the top of site-packages. And the commit a wheel is
built from is stamped into it (foresight/storage/_build_commit), so that provenance
(storage/provenance.git_commit) names foresight's code when it runs from the wheel. The rest of
the package (name, dependencies, metadata) is declared in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foresight import SUBPACKAGES  # noqa: E402  (stdlib only)
from foresight.storage.provenance import BUILD_COMMIT_FILE, checkout_commit  # noqa: E402  (stdlib only)


def namespace_packages() -> tuple[list[str], dict[str, str]]:
    """Every package under the mapped folders, named ``foresight.<folder>...``, and the folder
    of each top one (setuptools finds the subpackages under their parent's folder)."""
    found = find_packages(where=str(HERE), include=[f"{name}*" for name in SUBPACKAGES])
    packages = ["foresight"] + [f"foresight.{name}" for name in found]
    package_dir = {"foresight": "foresight", **{f"foresight.{name}": name for name in SUBPACKAGES}}
    return packages, package_dir


class BuildPyWithCommit(build_py):
    """build_py, then the checkout's commit written beside storage/provenance.py in the build."""

    def run(self) -> None:
        super().run()
        commit = checkout_commit(HERE)
        if commit is not None and not self.editable_mode:
            target = Path(self.build_lib) / "foresight" / "storage" / BUILD_COMMIT_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(commit + "\n")


PACKAGES, PACKAGE_DIR = namespace_packages()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, cmdclass={"build_py": BuildPyWithCommit})
