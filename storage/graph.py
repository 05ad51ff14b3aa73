"""The lineage graph of target versions: the one walker over recipe inputs.

Each version's recipe names its inputs as typed references (schemas.refs): the plan it was made
over, the upstream versions it was computed from, and values that name nothing stored. Audit
(lineage trees, the plan of a contact sheet), references and garbage collection (what a used
version keeps), and export (which plan a pinned version is over, no mixed upstreams) all follow
those edges here, reading each manifest once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from foresight.schemas.refs import Ref, is_version_id
from foresight.schemas.target import TargetVersion
from foresight.storage.targets import TargetStore


class VersionGraph:
    """Read-only view of the version -> input edges of one target store (manifests cached)."""

    def __init__(self, targets: TargetStore):
        self.targets = targets
        self._manifests: dict[str, TargetVersion | None] = {}

    def manifest(self, version_id: str) -> TargetVersion | None:
        """The stored manifest of a version; None when the store has no such version."""
        if version_id not in self._manifests:
            present = self.targets.status(version_id) is not None
            self._manifests[version_id] = self.targets.manifest(version_id) if present else None
        return self._manifests[version_id]

    def inputs(self, version_id: str) -> list[tuple[str, Ref]]:
        """(input key, reference) of a stored version, in key order; [] for a missing version."""
        manifest = self.manifest(version_id)
        return sorted(manifest.recipe.inputs.items()) if manifest is not None else []

    def made_from(self, version_id: str) -> list[str]:
        """The versions a version was computed from directly (stored or not), in key order."""
        return [ref.id for _, ref in self.inputs(version_id) if ref.kind == "version"]

    def upstream(self, version_ids: Iterable[str]) -> Iterator[str]:
        """The given versions, then every version they were made from, breadth first, each once.

        Missing versions are yielded too (a reference to one still counts), but have no inputs.
        Strings that are not version ids are skipped.
        """
        pending = [v for v in version_ids if is_version_id(v)]
        seen: set[str] = set()
        while pending:
            current = pending.pop(0)
            if current in seen:
                continue
            seen.add(current)
            yield current
            pending.extend(self.made_from(current))

    def closure(self, version_ids: Iterable[str]) -> set[str]:
        """The given versions plus every version they were made from, recursively (missing ones included)."""
        return set(self.upstream(version_ids))

    def plan_of(self, version_id: str) -> str | None:
        """The plan a version is made over: its own plan input, else the nearest upstream version's."""
        for current in self.upstream([version_id]):
            plans = [ref.id for _, ref in self.inputs(current) if ref.kind == "plan"]
            if plans:
                return plans[0]
        return None

    def stored_kind(self, version_id: str) -> str | None:
        """The kind ('video', 'teacher', ...) recorded in a stored version's manifest; None when missing."""
        manifest = self.manifest(version_id)
        return manifest.kind if manifest is not None else None
