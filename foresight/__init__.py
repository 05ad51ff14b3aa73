"""foresight: versioned, sharded teacher-target caches from robot demonstrations, and the small
models that train on them.

Everything lives under this one namespace: ``foresight.schemas``, ``foresight.storage``,
``foresight.pipelines``, ``foresight.flows``, ``foresight.trainers``. In the repository those are
the top-level folders ``schemas/ storage/ pipelines/ flows/ trainers/``; the build backend maps
them into this package (setup.py), so a wheel installs ``site-packages/foresight/storage/...``
and nothing else at the top level. Run from a bare checkout (``PYTHONPATH=<checkout>``) or an
editable install, this package puts a finder first on ``sys.meta_path`` that makes the same
mapping, so the same imports resolve to the checkout's folders.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

DISTRIBUTION = "foresight-robotics"
"""The distribution name on the package index (``pip install foresight-robotics``): ``foresight``
there is an unrelated project."""

SUBPACKAGES = ("schemas", "storage", "pipelines", "flows", "trainers")
"""The repository's top-level folders that make up ``foresight.*``."""


def checkout_top() -> Path | None:
    """The checkout this package lies in, when it is one of ours (its pyproject names
    DISTRIBUTION); None when installed (site-packages: its other top-level packages, such as an
    unrelated ``storage``, must never be picked up as ours)."""
    top = Path(__file__).resolve().parent.parent
    pyproject = top / "pyproject.toml"
    if not pyproject.is_file() or not all((top / name / "__init__.py").is_file() for name in SUBPACKAGES):
        return None
    import tomllib

    try:
        name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return top if name == DISTRIBUTION else None


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``foresight.<folder>`` (exactly the SUBPACKAGES) in the checkout's top folder, the
    mapping the build backend makes for wheels; deeper modules then resolve through the
    subpackage's own ``__path__``. First on ``sys.meta_path``, so an editable install of another
    checkout cannot mix its modules into this one's."""

    def __init__(self, top: Path):
        self.top = top

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in SUBPACKAGES:
            return None
        folder = self.top / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


_top = checkout_top()
if _top is not None and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFinder(_top))
del _top
