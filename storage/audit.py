"""Read-side audit of target versions: summaries, lineage trees, integrity, and the arrays of one clip.

Everything here answers "what exactly is this version, what was it made from, and is it intact"
from the stores alone (manifests, plans, dataset records and the lineage events, storage.lineage).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity
from foresight.schemas.plan import ClipRow
from foresight.schemas.refs import Ref
from foresight.schemas.target import ArraySpec, TargetVersion
from foresight.storage import layout, lineage
from foresight.storage.episodes import EpisodeStore
from foresight.storage.fs import Root, open_root
from foresight.storage.graph import VersionGraph
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetReader, TargetStore, stored_parts

# summaries ------------------------------------------------------------------------------------
class VersionSummary(StrictModel):
    """One line of ``targets list``."""

    id: str
    kind: str
    stage: str
    model: str = Field(description="Model family and spec, '-' when the stage uses no model.")
    weights: str = Field(description="'real', 'random', 'tiny' or '-' (no model).")
    inputs: dict[str, str]
    status: str
    clips: int
    bytes: int
    created: str


def model_label(identity: ModelIdentity | None) -> tuple[str, str]:
    """(label, weights) of a model identity: weights is 'real', 'random', 'tiny' or '-'."""
    if identity is None:
        return "-", "-"
    weights = "real" if identity.is_real else identity.source
    return f"{identity.family} {identity.spec}", weights


def summarize(store: TargetStore, version_id: str) -> VersionSummary:
    """The list line of one version (reads its manifest and sizes its folder)."""
    manifest = store.manifest(version_id)
    label, weights = model_label(manifest.recipe.model)
    return VersionSummary(id=version_id, kind=manifest.kind, stage=manifest.recipe.stage, model=label,
                          weights=weights, inputs=manifest.recipe.input_ids(), status=manifest.status,
                          clips=manifest.num_clips, bytes=store.root.du(layout.target_dir(version_id)),
                          created=manifest.created)


# lineage tree ---------------------------------------------------------------------------------
class LineageNode(StrictModel):
    """One node of a version's lineage: a version, a plan, a dataset, or an input that is missing."""

    type: str = Field(description="'version', 'plan', 'dataset', 'missing' or 'value'.")
    id: str
    role: str = Field(default="", description="The recipe input key that led here ('plan', 'video', ...).")
    details: dict[str, Any] = Field(default_factory=dict)
    children: list["LineageNode"] = Field(default_factory=list)


def lineage_tree(root: Root | str | None, version_id: str) -> LineageNode:
    """The version and everything it was made from, down to the source datasets."""
    root = open_root(root)
    return _version_node(VersionGraph(TargetStore(root)), PlanStore(root), version_id, "", set())


def _version_node(graph: VersionGraph, plans: PlanStore, version_id: str, role: str, seen: set[str]) -> LineageNode:
    manifest = graph.manifest(version_id)
    if manifest is None:
        return LineageNode(type="missing", id=version_id, role=role, details={"problem": "version not in the store"})
    label, weights = model_label(manifest.recipe.model)
    details = {"kind": manifest.kind, "status": manifest.status, "stage": manifest.recipe.stage,
               "stage_version": manifest.recipe.stage_version, "model": label, "weights": weights}
    if manifest.recipe.model is not None and manifest.recipe.model.weights_sha256:
        details["weights_sha256"] = manifest.recipe.model.weights_sha256
    node = LineageNode(type="version", id=version_id, role=role, details=details)
    if version_id in seen:
        node.details["cycle"] = True
        return node
    for key, ref in graph.inputs(version_id):
        node.children.append(_input_node(graph, plans, key, ref, seen | {version_id}))
    return node


def _input_node(graph: VersionGraph, plans: PlanStore, role: str, ref: Ref, seen: set[str]) -> LineageNode:
    if ref.kind == "version":
        return _version_node(graph, plans, ref.id, role, seen)
    if ref.kind == "plan" and plans.exists(ref.id):
        return _plan_node(plans, ref.id, role)
    if ref.kind == "plan":
        return LineageNode(type="missing", id=ref.id, role=role, details={"problem": "plan not in the store"})
    return LineageNode(type="value", id=ref.id, role=role)


def _plan_node(plans: PlanStore, plan_id: str, role: str) -> LineageNode:
    info = plans.info(plan_id)
    node = LineageNode(type="plan", id=plan_id, role=role,
                       details={"dataset": info.dataset, "num_clips": info.num_clips, "params": info.params,
                                "created": info.created})
    node.children.append(_dataset_node(plans.root, info.dataset, info.dataset_fingerprint))
    return node


def _dataset_node(root: Root, dataset: str, recorded: str) -> LineageNode:
    details: dict[str, Any] = {"fingerprint": recorded}
    episodes = EpisodeStore(root, dataset)
    if not episodes.exists():
        details["state"] = "missing (dataset not in the store)"
    else:
        info = episodes.info()
        current = episodes.fingerprint()
        details.update(source_kind=info.source_kind, source=info.source, source_fingerprint=info.source_fingerprint,
                       state="unchanged" if current == recorded else f"changed since (now {current})")
    return LineageNode(type="dataset", id=dataset, role="dataset", details=details)


def version_events(root: Root | str | None, version_id: str) -> list[dict[str, Any]]:
    """Lineage events that name the version as an input or an output, oldest first."""
    def names(event: dict[str, Any]) -> set[str]:
        return {ref.id for side in ("inputs", "outputs") for ref in lineage.event_refs(event, side)}

    return [e for e in lineage.events(root) if version_id in names(e)]


# integrity ------------------------------------------------------------------------------------
def verify_version(store: TargetStore, version_id: str) -> list[str]:
    """Every problem of one version: array metadata against the manifest, then every shard checksum."""
    reader = store.open(version_id)
    parts = [part for spec in reader.manifest.arrays for part in stored_parts(spec)]  # coded arrays: as stored
    problems = [p for part in parts for p in _check_array_metadata(reader, part)]
    problems.extend(reader.verify())
    return problems


def _check_array_metadata(reader: TargetReader, spec: ArraySpec) -> list[str]:
    try:
        reader.array(spec.name)  # refuses an array whose layout is not the manifest's, naming both
    except ValueError as err:
        return [str(err)]
    except (FileNotFoundError, KeyError, zarr.errors.BaseZarrError) as err:
        return [f"{reader.version_id}: array '{spec.name}' cannot be opened ({err.__class__.__name__}: {err})"]
    return []


BATCH_ELEMENTS = 1 << 22
"""Elements per batch read by :func:`iter_batches` (about 32 MB once a caller converts it to float64)."""


def iter_batches(reader: TargetReader, name: str, indices: Sequence[int],
                 max_elements: int = BATCH_ELEMENTS) -> Iterator[np.ndarray]:
    """Rows of one array at ``indices``, as many clips per batch as fit ``max_elements`` (at least one)."""
    per_clip = max(1, int(np.prod(reader.manifest.array_spec(name).shape[1:], dtype=np.int64)))
    batch_clips = max(1, max_elements // per_clip)
    indices = np.asarray(indices, dtype=np.int64)
    for start in range(0, len(indices), batch_clips):
        yield reader.read(name, indices[start:start + batch_clips].tolist())


# the arrays of one clip -----------------------------------------------------------------------
@dataclass
class ClipMaps:
    """Spatial arrays of one clip from one version: frames (T, H, W, 3) uint8 and token maps (T, h, w, C)."""

    version_id: str
    kind: str
    label: str
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    references: dict[str, np.ndarray] = field(default_factory=dict)
    """Reference maps (1, h, w, C) by the name of the map they belong to (a teacher's 'target')."""


@dataclass
class ClipMaterial:
    """Everything a contact sheet of one clip shows."""

    plan_id: str
    clip_index: int
    clip: ClipRow
    observed: np.ndarray | None
    versions: list[ClipMaps]
    notes: list[str] = field(default_factory=list)


def resolve_plan(store: TargetStore, version_id: str) -> str | None:
    """The plan a version is made over (its own plan input, or the nearest upstream version's)."""
    return VersionGraph(store).plan_of(version_id)


def expand_with_upstream(graph: VersionGraph, version_ids: Sequence[str]) -> list[str]:
    """The versions, each preceded by the stored video versions it was made from directly (if not given)."""
    ordered: list[str] = []
    for version_id in version_ids:
        for upstream in sorted(graph.made_from(version_id)):
            if graph.stored_kind(upstream) == "video" and upstream not in ordered and upstream not in version_ids:
                ordered.append(upstream)
        if version_id not in ordered:
            ordered.append(version_id)
    return ordered


def common_plan(graph: VersionGraph, version_ids: Sequence[str]) -> str:
    """The plan all versions are made over; ValueError naming them when there is none or several."""
    plans = {v: graph.plan_of(v) for v in version_ids}
    distinct = set(plans.values())
    if None in distinct:
        raise ValueError(f"versions {[v for v, p in plans.items() if p is None]}: no plan found in their lineage")
    if len(distinct) != 1:
        raise ValueError(f"versions are made over different plans: {plans}")
    return distinct.pop()


def find_clip(rows: Sequence[ClipRow], clip_id: str, plan_id: str) -> int:
    """Plan row of ``clip_id``; ValueError listing a few ids when absent."""
    for index, row in enumerate(rows):
        if row.clip_id == clip_id:
            return index
    sample = [r.clip_id for r in rows[:5]]
    raise ValueError(f"plan '{plan_id}': no clip '{clip_id}' (it has {len(rows)} clips, e.g. {sample})")


def clip_material(root: Root | str | None, version_ids: Sequence[str], clip_id: str | None = None,
                  clip_index: int | None = None) -> ClipMaterial:
    """Read the observed frame and every spatial array of one clip from the given versions."""
    root = open_root(root)
    store = TargetStore(root)
    graph = VersionGraph(store)
    versions = expand_with_upstream(graph, version_ids)
    plan_id = common_plan(graph, versions)
    rows = PlanStore(root).rows(plan_id)
    index = find_clip(rows, clip_id, plan_id) if clip_id is not None else int(clip_index or 0)
    if not 0 <= index < len(rows):
        raise ValueError(f"plan '{plan_id}': clip index {index} out of range (0..{len(rows) - 1})")
    material = ClipMaterial(plan_id=plan_id, clip_index=index, clip=rows[index], observed=None, versions=[])
    material.observed = _observed_frame(root, rows[index], material.notes)
    for version_id in versions:
        material.versions.append(_clip_maps(store.open(version_id), index))
    return material


def _observed_frame(root: Root, row: ClipRow, notes: list[str]) -> np.ndarray | None:
    episodes = EpisodeStore(root, row.dataset)
    try:
        return episodes.read_frames(row.episode_id, row.camera, [row.start])[0]
    except (ValueError, FileNotFoundError, KeyError, zarr.errors.BaseZarrError) as err:
        notes.append(f"observed frame of clip '{row.clip_id}' unavailable: {err}")
        return None


def _clip_maps(reader: TargetReader, index: int) -> ClipMaps:
    manifest = reader.manifest
    maps = ClipMaps(version_id=manifest.id, kind=manifest.kind, label=version_label(manifest))
    for spec in manifest.arrays:
        role = spatial_role(spec)
        if role is None:
            continue
        data = reader.read(spec.name, index)
        if role == "frames":
            maps.frames[spec.name] = data
        elif spec.name == "reference" and any(s.name == "target" for s in manifest.arrays):
            maps.references["target"] = data
        else:
            maps.maps[spec.name] = data
    return maps


def spatial_role(spec: ArraySpec) -> str | None:
    """'frames' for (N, T, H, W, 3) uint8, 'map' for float (N, T, h, w, C), None for anything else."""
    if len(spec.shape) != 5:
        return None
    dtype = np.dtype(spec.dtype)
    if dtype == np.uint8 and spec.shape[-1] == 3:
        return "frames"
    return "map" if dtype.kind == "f" else None


def version_label(manifest: TargetVersion) -> str:
    """Short human name of a version: the teacher family for teachers, else the kind, and the id."""
    recipe = manifest.recipe
    name = recipe.params.get("teacher") or (recipe.model.family if recipe.model else None) or manifest.kind
    return f"{name} ({manifest.id})"
