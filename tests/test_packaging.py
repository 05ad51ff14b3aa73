"""One import namespace: everything is ``foresight.*``, nothing else lands at the top of
site-packages, and the wheel `python -m build` makes installs and runs in a fresh virtual
environment outside the checkout."""

from __future__ import annotations

import re
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from foresight import DISTRIBUTION, SUBPACKAGES
from foresight.storage.provenance import checkout_commit

CHECKOUT = Path(__file__).resolve().parent.parent
_BARE = "|".join(SUBPACKAGES)
OLD_IMPORT = re.compile(rf"""(?:^\s*|["';]\s*)(?:from (?:{_BARE})(?:\.\w+)* import|import (?:{_BARE})(?:\.\w+)*(?:\s*$| as |[;,"']))""",
                        re.M)
"""An import of a top-level folder by its bare name, in code or in code held by a string
(``python -c "from <folder>.cli import main"``): it would load a second copy of that module."""

needs_checkout = pytest.mark.skipif(checkout_commit(CHECKOUT) is None, reason="not run from a git checkout")


def _python_files() -> list[Path]:
    folders = [*SUBPACKAGES, "foresight", "tests", "bench"]
    return [path for folder in folders for path in (CHECKOUT / folder).rglob("*.py")] + [CHECKOUT / "setup.py"]


def test_no_module_imports_a_top_level_folder_by_its_bare_name():
    offenders = [f"{path.relative_to(CHECKOUT)}: {match.group(0).strip()}"
                 for path in _python_files() for match in OLD_IMPORT.finditer(path.read_text())]
    assert offenders == []


@pytest.mark.slow  # imports every module (torch, diffusers, transformers, prefect): ~20 s
def test_every_module_loads_under_the_namespace_and_nothing_at_the_top_level():
    code = f"""
import importlib, pkgutil, sys
names = []
for sub in {SUBPACKAGES!r}:
    package = importlib.import_module("foresight." + sub)
    names += [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
bare = sorted(n for n in sys.modules if n.split(".")[0] in {SUBPACKAGES!r})
print(len(names), bare)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CHECKOUT.parent,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(CHECKOUT), "MUJOCO_GL": "osmesa"})
    assert out.returncode == 0, out.stderr[-3000:]
    count, bare = out.stdout.strip().split(" ", 1)
    assert int(count) > 100 and bare == "[]"


def _build_wheel(tmp_path: Path) -> tuple[Path, str]:
    """`python -m build --wheel` of a clean clone of this checkout's HEAD; (wheel, commit)."""
    source = tmp_path / "source"
    subprocess.run(["git", "clone", "-q", str(CHECKOUT), str(source)], check=True)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    return wheel, subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 check=True).stdout.strip()


def _fresh_venv(folder: Path) -> Path:
    """A new virtual environment whose only foresight is what gets installed into it; its
    third-party dependencies come from this interpreter's site-packages (no network here), added
    as a plain path, so this environment's editable-install hooks are not loaded."""
    venv.EnvBuilder(with_pip=True).create(folder)
    [own_site] = (folder / "lib").glob("python3*/site-packages")
    (own_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return folder / "bin"


@pytest.mark.slow  # builds a wheel, creates a venv with pip: ~40 s
@needs_checkout
def test_the_wheel_installs_and_runs_in_a_fresh_venv_outside_the_checkout(tmp_path):
    wheel, built_from = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    assert top_level == {"foresight", f"{DISTRIBUTION.replace('-', '_')}-0.1.0.dist-info"}
    bin_dir = _fresh_venv(tmp_path / "user" / ".venv")
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "user"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MUJOCO_GL": "osmesa", "HOME": str(tmp_path)}

    def run(*args: str) -> str:
        out = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=elsewhere, env=env)
        assert out.returncode == 0, f"{args}: {out.stdout[-1500:]}{out.stderr[-1500:]}"
        return out.stdout.strip()

    assert run(bin_dir / "foresight", "--version") == "foresight 0.1.0"
    where = run(bin_dir / "python", "-c", "import foresight.storage.provenance as p; print(p.__file__, p.git_commit())")
    assert where.startswith(str(tmp_path / "user" / ".venv")) and where.endswith(built_from)
    report = run(bin_dir / "foresight", "conformance", CHECKOUT / "tests" / "reference" / "da3_tiny")
    assert report.endswith("47/47 arrays within tolerance")


def test_deployments_start_in_the_checkout_or_else_where_deploy_runs(monkeypatch, tmp_path):
    from foresight.flows.cli import run

    assert run.deployment_folder() == CHECKOUT
    monkeypatch.setattr(run, "checkout_top", lambda: None)  # as from a wheel in site-packages
    monkeypatch.chdir(tmp_path)
    assert run.deployment_folder() == tmp_path
