"""Preset settings of the action_expert stage(s); see schemas.presets for the table format."""

from __future__ import annotations

from schemas.presets import Sourced

PRESETS: dict = {}
"""Filled by the engineer who owns this stage; empty means no preset fixes its settings yet."""

__all__ = ["PRESETS", "Sourced"]
