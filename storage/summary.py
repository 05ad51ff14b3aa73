"""What a data root holds, as plain records (used by ``foresight info``)."""

from __future__ import annotations

from typing import Any

from foresight.storage import layout
from foresight.storage.episodes import EpisodeStore
from foresight.storage.fs import Root
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore


def dataset_summary(root: Root, name: str) -> dict[str, Any]:
    """Episodes, frames, cameras, bytes, quarantined inputs and statistics of one dataset."""
    store = EpisodeStore(root, name)
    info = store.info()
    records = list(store.records())
    stored_bytes = store.total_bytes()
    return {
        "dataset": name,
        "source": info.source_kind,
        "episodes": len(records),
        "frames": sum(r.length for r in records),
        "successful": sum(1 for r in records if r.success),
        "tasks": sorted({r.task for r in records}),
        "cameras": {cam: shape for cam, shape in info.cameras.items()},
        "fps": info.fps,
        "bytes": stored_bytes,
        "source_bytes": info.source_bytes,
        "store_vs_source": stored_bytes / info.source_bytes if info.source_bytes else None,
        "frame_codecs": {cam: storage.codec for cam, storage in info.frame_storage.items()},
        "quarantined": len(store.quarantined()),
        "segments": len(store.segments()),
        "stats": {col: {"mean": s.mean, "std": s.std} for col, s in (info.stats or {}).items()},
    }


def root_summary(root: Root) -> dict[str, Any]:
    """Datasets, plans and target versions under a root."""
    datasets = [dataset_summary(root, name) for name in root.ls(layout.DATASETS)
                if EpisodeStore(root, name).exists()]
    plans = PlanStore(root)
    plan_rows = [{"plan": pid, "dataset": plans.info(pid).dataset, "clips": plans.info(pid).num_clips}
                 for pid in plans.ids()]
    targets = TargetStore(root)
    versions = []
    for vid in targets.ids():
        try:
            manifest = targets.manifest(vid)
        except ValueError as err:  # one unreadable manifest must not hide the rest of the root
            versions.append({"version": vid, "status": "unreadable", "clips": 0, "model": "-", "error": str(err)})
            continue
        model = manifest.recipe.model
        versions.append({"version": vid, "status": manifest.status, "clips": manifest.num_clips,
                         "model": f"{model.family}:{model.spec}" if model else "-"})
    exports = [name for name in root.ls(layout.EXPORTS) if layout.is_safe_id(name)]
    return {"root": root.url, "datasets": datasets, "plans": plan_rows, "targets": versions, "exports": exports}
