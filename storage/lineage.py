"""OpenLineage-style run events appended to ``<root>/lineage.jsonl``."""

from __future__ import annotations

import json
import threading
from typing import Any

from storage import layout
from storage.fs import Root, open_root
from storage.provenance import now_iso

PRODUCER = "https://github.com/foresight/foresight"
_LOCK = threading.Lock()


def emit(root: Root | str | None, job: str, run_id: str, inputs: list[str], outputs: list[str],
         facets: dict[str, Any] | None = None, event_type: str = "COMPLETE") -> dict[str, Any]:
    """Append one run event naming its input and output ids (plans, versions, exports, runs)."""
    root = open_root(root)
    event = {
        "eventType": event_type,
        "eventTime": now_iso(),
        "producer": PRODUCER,
        "run": {"runId": run_id, "facets": facets or {}},
        "job": {"namespace": "foresight", "name": job},
        "inputs": [{"namespace": root.url, "name": name} for name in inputs],
        "outputs": [{"namespace": root.url, "name": name} for name in outputs],
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


def events(root: Root | str | None) -> list[dict[str, Any]]:
    """All recorded events, oldest first."""
    root = open_root(root)
    if not root.exists(layout.LINEAGE):
        return []
    return [json.loads(line) for line in root.read_bytes(layout.LINEAGE).decode().splitlines() if line.strip()]
