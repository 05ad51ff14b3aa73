"""OpenLineage-style run events appended to ``<root>/lineage.jsonl``.

Every input and output of an event is a typed reference (schemas.refs.Ref) written as its store
path (``plans/<id>``, ``targets/<id>``, ``exports/<id>``, ``runs/<id>``, ``datasets/<name>``,
``evals/<id>``; a source outside the root as given): :func:`event_refs` reads them back, and also
reads the bare ids that events written before references were typed hold.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any, Literal

from schemas.refs import Ref
from storage import layout
from storage.fs import Root, open_root
from storage.provenance import now_iso

PRODUCER = "https://github.com/foresight/foresight"
_LOCK = threading.Lock()


def emit(root: Root | str | None, job: str, run_id: str, inputs: Sequence[Ref | str], outputs: Sequence[Ref | str],
         facets: dict[str, Any] | None = None, event_type: str = "COMPLETE") -> dict[str, Any]:
    """Append one run event naming what it read and what it made (datasets, plans, versions, exports, runs).

    Each is a typed reference, or the store path of one (``layout.target_dir(id)``); a bare id is refused.
    """
    root = open_root(root)
    inputs, outputs = [_typed(job, item) for item in inputs], [_typed(job, item) for item in outputs]
    event = {
        "eventType": event_type,
        "eventTime": now_iso(),
        "producer": PRODUCER,
        "run": {"runId": run_id, "facets": facets or {}},
        "job": {"namespace": "foresight", "name": job},
        "inputs": [{"namespace": root.url, "name": layout.ref_path(ref)} for ref in inputs],
        "outputs": [{"namespace": root.url, "name": layout.ref_path(ref)} for ref in outputs],
    }
    line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode()
    with _LOCK:
        if root.is_local:
            root.makedirs("")
            with open(root.path(layout.LINEAGE), "ab") as handle:
                handle.write(line)
        else:
            old = root.read_bytes(layout.LINEAGE) if root.exists(layout.LINEAGE) else b""
            root.write_bytes_atomic(layout.LINEAGE, old + line)
    return event


def _typed(job: str, item: Ref | str) -> Ref:
    """A reference, or a store path naming one ('targets/<id>', as storage.layout builds them)."""
    if isinstance(item, Ref):
        return item
    parsed = layout.parse_ref_path(item) if isinstance(item, str) and "/" in item else None
    if parsed is None or parsed.kind == "source":
        raise TypeError(f"lineage event '{job}': {item!r} is neither a schemas.refs.Ref nor a store path "
                        "('plans/<id>', 'targets/<id>', ...)")
    return parsed


def events(root: Root | str | None) -> list[dict[str, Any]]:
    """All recorded events, oldest first."""
    root = open_root(root)
    if not root.exists(layout.LINEAGE):
        return []
    return [json.loads(line) for line in root.read_bytes(layout.LINEAGE).decode().splitlines() if line.strip()]


def event_refs(event: dict[str, Any], side: Literal["inputs", "outputs"]) -> list[Ref]:
    """The references one side of an event names, typed from their paths (or bare ids)."""
    return [layout.parse_ref_path(str(item.get("name", ""))) for item in event.get(side, [])]
