"""Which exports and training runs use which target versions, and garbage collection of the rest.

References are read from what the stores already hold, never from a separate registry:

- an export's ``exports/<id>/index.json`` names every version it packed (``_build.json`` while it
  is being built);
- a run's JSON files (``runs/<id>/run.json`` and ``runs/<id>/step-*/checkpoint.json`` written by
  storage/runs.py, and any other JSON there) name its export and every version it trained on;
- lineage events whose outputs are an existing export or run name their input versions.

Every string anywhere in those files that looks like a target version id counts, so a format change in
an index or a checkpoint record can only make garbage collection keep more, never delete a used version.
A version also keeps its upstream versions (a teacher version keeps the video version it was made from).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.refs import is_version_id, version as version_ref
from foresight.storage import layout, lineage
from foresight.storage.fs import Root, open_root
from foresight.storage.graph import VersionGraph
from foresight.storage.targets import TargetStore, file_mtime

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 24 * 3600.0
"""A building version untouched for this long is abandoned (its builder died)."""


def strings_in(obj: Any) -> Iterator[str]:
    """Every string value (and dict key) inside a JSON document, depth first."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from strings_in(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings_in(value)


class Reference(StrictModel):
    """One export or run and the target versions it names directly."""

    kind: str = Field(description="'export' or 'run'.")
    id: str
    versions: list[str] = Field(description="Version ids named directly, sorted.")
    exports: list[str] = Field(default_factory=list, description="Export ids a run names.")
    sources: list[str] = Field(default_factory=list, description="Files or lineage events the names came from.")
    unreadable: list[str] = Field(default_factory=list, description="Its files that could not be read: they may "
                                  "name versions nobody can see, so gc removes no complete version while any exists.")


def _read_json(root: Root, rel: str, unreadable: list[str]) -> Any | None:
    """A reference file's JSON; None (its URL added to ``unreadable``) when it cannot be read."""
    try:
        return root.read_json(rel)
    except (ValueError, OSError) as err:
        # An unreadable file cannot prove a version is unused: the caller keeps every complete one.
        log.warning("references: cannot read %s (%s)", root.url_of(rel), err)
        unreadable.append(root.url_of(rel))
        return None


def export_references(root: Root) -> list[Reference]:
    """Every export and the version ids it names: index.json when complete, _build.json while building."""
    refs = []
    for export_id in filter(layout.is_safe_id, root.ls(layout.EXPORTS)):
        names = [n for n in (layout.EXPORT_INDEX, layout.EXPORT_BUILD) if root.exists(layout.export_file(export_id, n))]
        if not names:
            continue
        rel, unreadable = layout.export_file(export_id, names[0]), []
        versions = sorted({s for s in strings_in(_read_json(root, rel, unreadable)) if is_version_id(s)})
        refs.append(Reference(kind="export", id=export_id, versions=versions, sources=[rel], unreadable=unreadable))
    return refs


def _run_json_files(root: Root, run_id: str) -> list[str]:
    # Every step-* folder counts, complete or not (storage/runs.py): keeping more is the safe side.
    files = [layout.run_file(run_id, n) for n in root.ls(layout.run_dir(run_id)) if n.endswith(".json")]
    for step in root.ls(layout.run_dir(run_id)):
        if step.startswith(layout.STEP_PREFIX):
            base = f"{layout.run_dir(run_id)}/{step}"
            files.extend(f"{base}/{n}" for n in root.ls(base) if n.endswith(".json"))
    return files


def run_references(root: Root, export_ids: Iterable[str]) -> list[Reference]:
    """Every run folder and the version and export ids its JSON files name."""
    known_exports = set(export_ids)
    refs = []
    for run_id in root.ls(layout.RUNS):
        if run_id.startswith("."):
            continue
        files, unreadable = _run_json_files(root, run_id), []
        names: set[str] = set()
        for rel in files:
            names.update(strings_in(_read_json(root, rel, unreadable)))
        refs.append(Reference(kind="run", id=run_id, versions=sorted(n for n in names if is_version_id(n)),
                              exports=sorted(names & known_exports), sources=files, unreadable=unreadable))
    return refs


def lineage_references(root: Root, refs: dict[tuple[str, str], Reference]) -> None:
    """Add the input versions of lineage events whose outputs are a known export or run."""
    by_id = {ref.id: ref for ref in refs.values()}
    for event in lineage.events(root):
        versions = {r.id for r in lineage.event_refs(event, "inputs") if r.kind == "version"}
        for output in lineage.event_refs(event, "outputs"):
            ref = by_id.get(output.id)
            if ref is None or not versions - set(ref.versions):
                continue
            ref.versions = sorted(set(ref.versions) | versions)
            ref.sources = [*ref.sources, f"{layout.LINEAGE_EVENTS}:{event.get('job', {}).get('name', '?')}"]


def all_references(root: Root | str | None) -> list[Reference]:
    """Every export and run of the root, with the versions each names directly."""
    root = open_root(root)
    exports = export_references(root)
    runs = run_references(root, [e.id for e in exports])
    refs = {(r.kind, r.id): r for r in [*exports, *runs]}
    lineage_references(root, refs)
    export_versions = {r.id: r.versions for r in exports}
    for run in runs:
        # A run that names an export uses every version packed in it.
        inherited = {v for e in run.exports for v in export_versions.get(e, [])}
        run.versions = sorted(set(run.versions) | inherited)
    return list(refs.values())


class VersionUse(StrictModel):
    """An export or run that uses a version, directly or through a downstream version."""

    kind: str
    id: str
    direct: bool = Field(description="True when it names the version itself, False when only a downstream one.")


def users_of(store: TargetStore, version_id: str, refs: list[Reference] | None = None) -> list[VersionUse]:
    """Exports and runs that use ``version_id`` (directly or through versions made from it)."""
    refs = all_references(store.root) if refs is None else refs
    graph, uses = VersionGraph(store), []
    for ref in refs:
        if version_id in ref.versions:
            uses.append(VersionUse(kind=ref.kind, id=ref.id, direct=True))
        elif version_id in graph.closure(ref.versions):
            uses.append(VersionUse(kind=ref.kind, id=ref.id, direct=False))
    return uses


# garbage collection ---------------------------------------------------------------------------
class GcItem(StrictModel):
    """One version folder that garbage collection would remove, or keeps, and why."""

    version_id: str
    status: str = Field(description="'building', 'complete' or 'orphan' (a folder without manifest).")
    reason: str
    bytes: int = 0
    age_s: float | None = Field(default=None, description="Seconds since its newest file was written.")


class GcPlan(StrictModel):
    """What ``targets gc`` would do."""

    remove: list[GcItem] = Field(default_factory=list)
    keep: list[GcItem] = Field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.remove)


def last_modified(root: Root, rel: str) -> float | None:
    """Newest modification time (epoch seconds) of any file under ``rel``; None when unknown."""
    try:
        entries = root.fs.find(root.path(rel), detail=True)
    except FileNotFoundError:
        return None
    stamps = [file_mtime(info) for info in entries.values()]
    stamps = [s for s in stamps if s is not None]
    return max(stamps) if stamps else None


def _building_state(stamp: float | None, max_age_s: float, now: float) -> tuple[bool, float | None]:
    """(abandoned?, age): a building version is abandoned when nothing in it changed for max_age_s
    (``stamp``: its newest file's mtime)."""
    age = None if stamp is None else now - stamp
    return (age is not None and age > max_age_s), age


def plan_gc(root: Root | str | None, max_age_s: float = DEFAULT_MAX_AGE_S, now: float | None = None) -> GcPlan:
    """Decide which version folders to remove: abandoned building ones and unreferenced complete ones.

    Kept: every version an export or run references, its upstream versions, and every version that
    a building version (still alive) is made from, so a running build never loses its input.
    """
    root = open_root(root)
    store, now = TargetStore(root), time.time() if now is None else now
    graph, refs = VersionGraph(store), all_references(root)
    referenced = graph.closure(v for r in refs for v in r.versions)
    statuses = {name: store.status(name) or "orphan" for name in root.ls(layout.TARGETS) if layout.is_safe_id(name)}
    active: set[str] = set()
    items: dict[str, GcItem] = {}
    folders = store.folder_stats()  # one listing of targets/: sizes, and the newest change of each version
    for version_id, status in statuses.items():
        abandoned, age = (False, None)
        size, newest = folders.get(version_id, (0, None))
        if status != "complete":
            abandoned, age = _building_state(newest, max_age_s, now)
            if not abandoned:
                active.add(version_id)
        items[version_id] = GcItem(version_id=version_id, status=status, age_s=age, reason="",
                                   bytes=size)
    needed_by_builds = graph.closure(active) - active
    blockers = []
    if exporting := exports_in_progress(root, max_age_s, now):
        blockers.append(f"exports in progress ({', '.join(exporting)}) may use it")
    if unreadable := [url for r in refs for url in r.unreadable]:
        blockers.append(f"unreadable reference files ({', '.join(unreadable)}) may name it")
    return _decide(items, referenced, active, needed_by_builds, blockers, max_age_s)


def exports_in_progress(root: Root, max_age_s: float, now: float) -> list[str]:
    """Export folders with neither index.json nor _build.json touched within ``max_age_s``: which versions
    they pack is unknown until one lands, so while one exists no complete version is collected."""
    busy = []
    for export_id in filter(layout.is_safe_id, root.ls(layout.EXPORTS)):
        rel = layout.export_dir(export_id)
        if root.exists(rel, layout.EXPORT_INDEX) or root.exists(rel, layout.EXPORT_BUILD):
            continue
        stamp = last_modified(root, rel)
        if stamp is None:  # an empty folder: its own time
            stamp = file_mtime(root.fs.info(root.path(rel)))
        if stamp is None or now - stamp <= max_age_s:
            busy.append(export_id)
    return busy


def _decide(items: dict[str, GcItem], referenced: set[str], active: set[str], needed_by_builds: set[str],
            blockers: list[str], max_age_s: float) -> GcPlan:
    """Keep or remove each version; ``blockers`` (why some unseen user may hold any complete
    version) keep every complete one that is not otherwise kept."""
    plan = GcPlan()
    hours = max_age_s / 3600
    for version_id, item in sorted(items.items()):
        if version_id in referenced:
            item.reason = "referenced by an export or run (directly or as an upstream version)"
            plan.keep.append(item)
        elif version_id in active:
            item.reason = f"still building (touched within {hours:g} h)"
            plan.keep.append(item)
        elif version_id in needed_by_builds:
            item.reason = "input of a version still building"
            plan.keep.append(item)
        elif item.status == "complete" and blockers:
            item.reason = "; ".join(blockers)
            plan.keep.append(item)
        elif item.status == "complete":
            item.reason = "complete, no export or run references it"
            plan.remove.append(item)
        else:
            item.reason = f"{item.status}, abandoned (untouched for more than {hours:g} h)"
            plan.remove.append(item)
    return plan


def apply_gc(root: Root | str | None, plan: GcPlan, run_id: str) -> list[str]:
    """Remove the planned folders: the manifest first, so a half-removed version is never listed,
    then the ``_done`` markers, then the data, so a removal cut short never leaves a marker whose
    shard objects are gone (a rerun of the stage would trust it and complete the version over them)."""
    root = open_root(root)
    removed = []
    for item in plan.remove:
        target = layout.target_dir(item.version_id)
        root.rm(layout.target_manifest(item.version_id))
        root.rm(target, layout.DONE_DIR)
        root.rm(target)
        removed.append(item.version_id)
        log.info("gc: removed %s (%s, %d bytes)", item.version_id, item.reason, item.bytes)
    if removed:
        lineage.emit(root, "targets.gc", run_id, inputs=[*map(version_ref, removed)], outputs=[],
                     facets={"removed": [i.model_dump(mode="json") for i in plan.remove]})
    return removed
