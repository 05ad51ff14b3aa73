"""Named recipes (presets) that reproduce a released configuration, every setting with its source.

A preset is a name (``svam-calvin``, ``svam-metaworld``, ``vpp``) that fixes the settings of one
or more stages. Each stage module of this package (``svd``, ``teachers``, ``decoupler``,
``action_expert``, ``shallow_pi``) defines ``PRESETS: dict[preset name, dict[setting, Sourced]]``
for that stage, so a value and the paper section / release file it comes from live side by side;
``docs/RECIPES.md`` is written from the same tables. No I/O here.

A stage applies a preset with :func:`apply_preset`: the preset's values become the defaults, the
user's explicit settings win, and the version recipe records the preset's name with the resolved
settings, so a version built with a preset can be traced to the release.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

PRESET_NAMES = ("svam-calvin", "svam-metaworld", "vpp", "shallow-pi")
"""Every preset foresight knows, in the order the docs list them."""

STAGE_MODULES = {
    "generate": "svd",
    "extract": "svd",
    "text": "svd",
    "teachers": "teachers",
    "decoupler": "decoupler",
    "action_expert": "action_expert",
    "shallow_pi": "shallow_pi",
}
"""Stage name -> module of this package whose ``PRESETS`` table holds that stage's settings.

A module that serves several stages keys its table ``{preset: {stage: {setting: Sourced}}}``
through :data:`STAGE_KEYED`."""

STAGE_KEYED = frozenset({"svd"})
"""Modules whose ``PRESETS`` are keyed by preset, then stage (they serve several stages)."""


@dataclass(frozen=True)
class Sourced:
    """One preset setting: its value and where it comes from.

    ``source`` names a paper section (``"S-VAM §4.1"``), a release file and line
    (``"S-VAM-Code policy_models/module/diffusion_extract.py:L88"``) or ``"ours: <reason>"``.
    """

    value: Any
    source: str


def check_preset(name: str) -> str:
    """``name`` if it is a known preset, else a one-line ValueError listing the known ones."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    return name


def preset_table(name: str, stage: str) -> dict[str, Sourced]:
    """The sourced settings preset ``name`` fixes for ``stage`` (empty when it fixes none)."""
    check_preset(name)
    if stage not in STAGE_MODULES:
        raise ValueError(f"unknown stage {stage!r} for presets; stages: {', '.join(STAGE_MODULES)}")
    module_name = STAGE_MODULES[stage]
    table = importlib.import_module(f"{__name__}.{module_name}").PRESETS.get(name, {})
    if module_name in STAGE_KEYED:
        table = table.get(stage, {})
    return dict(table)


def preset_values(name: str, stage: str) -> dict[str, Any]:
    """The values (no sources) preset ``name`` fixes for ``stage``."""
    return {key: item.value for key, item in preset_table(name, stage).items()}


def apply_preset(name: str | None, stage: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """Settings for ``stage``: the preset's values overridden by the user's ``explicit`` ones.

    With ``name`` None the explicit settings are returned unchanged. The result carries
    ``preset`` (the name) so that the recipe a stage hashes records it.
    """
    if name is None:
        return dict(explicit)
    resolved = preset_values(name, stage)
    resolved.update(explicit)
    resolved["preset"] = name
    return resolved


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted setting paths -> nested dicts: ``{"onestep.fps_id": "fps"}`` -> ``{"onestep": {"fps_id": "fps"}}``."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values on top, merging nested dicts key by key (``over`` wins)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_nested(name: str, stages: tuple[str, ...], explicit: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings: the dotted-path tables of ``stages`` under preset ``name`` (only the keys
    starting with ``prefix``, which is stripped), with the user's ``explicit`` nested settings on top."""
    flat: dict[str, Any] = {}
    for stage in stages:
        flat.update({key[len(prefix):]: value for key, value in preset_values(name, stage).items()
                     if key.startswith(prefix)})
    return deep_merge(nest(flat), explicit)
