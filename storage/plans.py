"""The plan store: content-addressed clip lists under ``<root>/plans/<plan_id>/``."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from foresight.schemas.base import validate_stored
from foresight.schemas.plan import CLIPS_SCHEMA, ClipRow, ClipRows, PlanInfo
from foresight.storage import layout
from foresight.storage.fs import Root, open_root, parquet_bytes, read_parquet, sha256_bytes


class PlanStore:
    """Write and read clip plans; plan.json is written last and marks a plan complete."""

    def __init__(self, root: Root | str | None):
        self.root = open_root(root)

    def ids(self) -> list[str]:
        return [n for n in self.root.ls(layout.PLANS) if layout.is_safe_id(n) and self.exists(n)]

    def exists(self, plan_id: str) -> bool:
        return self.root.exists(layout.plan_file(plan_id, layout.PLAN_INFO))

    def write(self, info: PlanInfo, rows: Sequence[ClipRow]) -> PlanInfo:
        """Publish a plan: clips.parquet first, then plan.json (with the clips checksum). ``rows``
        as ClipRows (columns, what pipelines.plan makes) or any sequence of ClipRow."""
        if len(rows) != info.num_clips:
            raise ValueError(f"plan '{info.plan_id}': {len(rows)} rows but num_clips={info.num_clips}")
        if isinstance(rows, ClipRows):
            table = rows.table.select(CLIPS_SCHEMA.names).cast(CLIPS_SCHEMA)
        else:
            table = pa.Table.from_pydict({name: [getattr(r, name) for r in rows] for name in CLIPS_SCHEMA.names},
                                         schema=CLIPS_SCHEMA)
        data = parquet_bytes(table)
        self.root.write_bytes_atomic(layout.plan_file(info.plan_id, layout.PLAN_CLIPS), data)
        info = info.model_copy(update={"clips_sha256": sha256_bytes(data)})
        self.root.write_json_atomic(layout.plan_file(info.plan_id, layout.PLAN_INFO), info.model_dump(mode="json"))
        return info

    def info(self, plan_id: str) -> PlanInfo:
        rel = layout.plan_file(plan_id, layout.PLAN_INFO)
        if not self.root.exists(rel):
            raise ValueError(f"plan '{plan_id}': not found under {self.root.url}")
        return validate_stored(PlanInfo, self.root.read_json(rel), self.root.url_of(rel))

    def rows(self, plan_id: str) -> ClipRows:
        """Clip rows in plan order (the order of every target array built over this plan), as columns."""
        self.info(plan_id)
        return ClipRows(read_parquet(self.root, layout.plan_file(plan_id, layout.PLAN_CLIPS)))

    def verify(self, plan_id: str) -> list[str]:
        """Compare clips.parquet with the checksum recorded in plan.json."""
        info = self.info(plan_id)
        actual = self.root.sha256(layout.plan_file(plan_id, layout.PLAN_CLIPS))
        return [] if actual == info.clips_sha256 else [f"plan '{plan_id}': clips.parquet checksum mismatch"]
