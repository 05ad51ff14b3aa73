"""Conformance of foresight's implementations to reference fixtures computed by released code.

A fixture folder (``shared/fixtures/svam_tiny``, ``shared/fixtures/da3_tiny`` or one a user
generates the same way) holds ``io.npz`` (inputs, intermediates, outputs), ``config.json`` and
weights. Each *group* module of this package recomputes one group of arrays with foresight's own
code and compares them with the fixture's; :func:`check_fixture` runs every group whose arrays the
fixture holds. Tolerances are the fixture's SPEC.md values (``numpy.allclose`` semantics).

A group module exposes ``GROUP`` (the ``io.npz`` key prefix, e.g. ``"extract"``), ``applies(io)``
(whether the fixture holds that group) and ``check(fixture_dir, io, config) -> list[ArrayCheck]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GROUP_MODULES = ("extract", "decoupler", "glue", "denoiser", "da3")
"""Group modules of this package, in the order they run."""


@dataclass(frozen=True)
class ArrayCheck:
    """One recomputed array against its reference."""

    group: str
    name: str
    max_abs_err: float
    atol: float
    rtol: float
    passed: bool
    detail: str = ""


def compare(group: str, name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> ArrayCheck:
    """``numpy.allclose(got, ref, atol, rtol)`` as an :class:`ArrayCheck`; exact when both are 0."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return ArrayCheck(group, name, float("inf"), atol, rtol, False, f"shape {got.shape} != {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_err = float(diff.max()) if diff.size else 0.0
    passed = bool(np.array_equal(got, ref)) if atol == rtol == 0 else bool(np.allclose(got, ref, atol=atol, rtol=rtol))
    return ArrayCheck(group, name, max_err, atol, rtol, passed)


def load_fixture(fixture_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of ``io.npz`` and the parsed ``config.json`` of a fixture folder."""
    import json

    io_path, config_path = fixture_dir / "io.npz", fixture_dir / "config.json"
    for path in (io_path, config_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing (a conformance fixture holds io.npz and config.json)")
    with np.load(io_path, allow_pickle=False) as npz:
        io = {key: npz[key] for key in npz.files}
    return io, json.loads(config_path.read_text())


def check_fixture(fixture_dir: Path, groups: list[str] | None = None) -> list[ArrayCheck]:
    """Recompute every group the fixture holds (or only ``groups``) and compare each array.

    A group whose arrays the fixture holds but whose module is not there yet, and a requested
    group the fixture does not hold, each give one failing line: never a silent skip."""
    unknown = sorted(set(groups or []) - set(GROUP_MODULES))
    if unknown:
        raise ValueError(f"conformance groups {unknown}: unknown; groups: {', '.join(GROUP_MODULES)}")
    io, config = load_fixture(fixture_dir)
    results: list[ArrayCheck] = []
    for name in GROUP_MODULES:
        if groups is not None and name not in groups:
            continue
        module = _group_module(name)
        if module is None:
            if group_arrays(io, name):
                results.append(ArrayCheck(name, "(group)", float("inf"), 0.0, 0.0, False,
                                          f"not implemented: no module {__name__}.{name}"))
            elif groups is not None:
                results.append(_absent(name, fixture_dir))
        elif module.applies(io):
            results.extend(_run_group(module, name, fixture_dir, io, config))
        elif groups is not None:
            results.append(_absent(name, fixture_dir))
    return results


def _run_group(module, name: str, fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    """The group's checks; a fixture the group cannot read (missing weights, a config key, a
    shape) gives one failing line naming the problem instead of ending the whole run."""
    try:
        return module.check(fixture_dir, io, config)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split()) or err.__class__.__name__
        return [ArrayCheck(name, "(group)", float("inf"), 0.0, 0.0, False,
                           f"{err.__class__.__name__}: {message}")]


def _group_module(name: str):
    """The group module, or None when it does not exist (yet)."""
    full = f"{__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as err:
        if err.name != full:
            raise
        return None


def _absent(name: str, fixture_dir: Path) -> ArrayCheck:
    return ArrayCheck(name, "(group)", float("inf"), 0.0, 0.0, False, f"requested, but {fixture_dir} holds none "
                                                                      "of its arrays")


def group_arrays(io: Mapping[str, np.ndarray], group: str) -> dict[str, np.ndarray]:
    """The arrays of one group, keyed without the ``<group>.`` prefix."""
    prefix = f"{group}."
    return {key[len(prefix):]: value for key, value in io.items() if key.startswith(prefix)}
