"""OpenLineage run events of every flow run, one object each under ``<root>/lineage/``.

Events are built and serialised by ``openlineage-python`` (``RunEvent`` with ``schemaURL`` and
``producer``; foresight's facets in one run facet with ``_producer`` and ``_schemaURL``), so they
validate against the published OpenLineage schema and Marquez or any other consumer takes them.

- **File transport (always).** openlineage-python's file transport, one file per event, written
  through the data root's own filesystem (its credentials, any fsspec URL): atomically, under a
  name no other writer takes (``lineage/<UTC time>-<random>.json``). Concurrent flows on an object
  store therefore lose no event, and an event costs one PUT whatever the history holds (the
  single ``lineage.jsonl`` used to be rewritten whole on every event).
- **HTTP transport (when** ``$OPENLINEAGE_URL`` **is set).** The same event is also POSTed to that
  endpoint (e.g. a Marquez server, ``docs/DEPLOY.md``); a consumer that is down is a warning, not a
  failed flow, since the data root keeps the record the audit, references and GC read.

Every input and output of an event is a typed reference (schemas.refs.Ref) written as its store
path (``plans/<id>``, ``targets/<id>``, ``exports/<id>``, ``runs/<id>``, ``datasets/<name>``,
``evals/<id>``; a source outside the root as given): :func:`event_refs` reads them back, and also
reads the bare ids that events written before references were typed hold. :func:`events` reads
the events of ``lineage/`` and those of a ``lineage.jsonl`` written by earlier versions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated.base import RunFacet
from openlineage.client.serde import Serde
from openlineage.client.transport.file import FileConfig, FileHandler, FileTransport
from openlineage.client.transport.http import HttpConfig, HttpTransport

from foresight.schemas.refs import Ref
from foresight.storage import layout
from foresight.storage.fs import TMP_PREFIX, Root, open_root, parse_json, read_many

log = logging.getLogger(__name__)

PRODUCER = "https://github.com/foresight/foresight"
"""``producer`` of every event and ``_producer`` of its facets."""
NAMESPACE = "foresight"
"""The OpenLineage job namespace of foresight's flows."""
FACET = "foresight"
"""Name of the run facet holding what a flow records about its run (config, model, counts)."""
FACET_SCHEMA_URL = f"{PRODUCER}/blob/main/docs/lineage/ForesightRunFacet.json#/$defs/ForesightRunFacet"
URL_ENV = "OPENLINEAGE_URL"
"""Set to an OpenLineage HTTP endpoint's base URL (e.g. ``http://marquez:5000``) to also send events there."""
ENDPOINT_ENV = "OPENLINEAGE_ENDPOINT"
"""Path of the lineage API under ``$OPENLINEAGE_URL`` (default ``api/v1/lineage``, Marquez's)."""
API_KEY_ENV = "OPENLINEAGE_API_KEY"
"""Bearer token sent with each HTTP event, when the endpoint needs one."""


@attr.define
class ForesightRunFacet(RunFacet):
    """What a foresight flow records about its run (config, model, counts: the ``facets`` given to
    :func:`emit`, as additional properties; null values are left out, as openlineage-python's serde does)."""

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA_URL


def emit(root: Root | str | None, job: str, run_id: str, inputs: Sequence[Ref | str], outputs: Sequence[Ref | str],
         facets: dict[str, Any] | None = None, event_type: str = "COMPLETE") -> dict[str, Any]:
    """Record one run event naming what it read and what it made (datasets, plans, versions, exports, runs).

    Each is a typed reference, or the store path of one (``layout.target_dir(id)``); a bare id is refused.
    ``facets`` go into the ``foresight`` run facet; a ``run_id`` that is not a UUID (OpenLineage
    requires one) is mapped onto one and kept in the facet as ``runName``. Returns the event as written.
    """
    root = open_root(root)
    inputs, outputs = [_typed(job, item) for item in inputs], [_typed(job, item) for item in outputs]
    event = _run_event(root, job, run_id, inputs, outputs, facets or {}, event_type)
    RootFileTransport(root).emit(event)
    _send_http(event)
    return json.loads(Serde.to_json(event))


def _run_event(root: Root, job: str, run_id: str, inputs: list[Ref], outputs: list[Ref],
               facets: dict[str, Any], event_type: str) -> RunEvent:
    run_uuid, details = run_id, dict(facets)
    try:
        uuid.UUID(run_id)
    except ValueError:
        run_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{NAMESPACE}:{job}:{run_id}"))
        details["runName"] = run_id
    facet = ForesightRunFacet(producer=PRODUCER).with_additional_properties(
        **json.loads(json.dumps(details, default=str)))
    return RunEvent(
        eventType=RunState(event_type), eventTime=datetime.now(timezone.utc).isoformat(), producer=PRODUCER,
        run=Run(runId=run_uuid, facets={FACET: facet}), job=Job(namespace=NAMESPACE, name=job),
        inputs=[InputDataset(namespace=root.url, name=layout.ref_path(ref)) for ref in inputs],
        outputs=[OutputDataset(namespace=root.url, name=layout.ref_path(ref)) for ref in outputs])


def _typed(job: str, item: Ref | str) -> Ref:
    """A reference, or a store path naming one ('targets/<id>', as storage.layout builds them)."""
    if isinstance(item, Ref):
        return item
    parsed = layout.parse_ref_path(item) if isinstance(item, str) and "/" in item else None
    if parsed is None or parsed.kind == "source":
        raise TypeError(f"lineage event '{job}': {item!r} is neither a schemas.refs.Ref nor a store path "
                        "('plans/<id>', 'targets/<id>', ...)")
    return parsed


# file transport ---------------------------------------------------------------------------------
class _RootFileHandler(FileHandler):
    """Opens an event's file for the file transport; what is written is published on close, atomically,
    through the root's filesystem (a temporary renamed into place locally, one PUT on an object store)."""

    def __init__(self, root: Root):
        self.root = root

    @contextlib.contextmanager
    def open_file(self, file_path: str, mode: str) -> Iterator[io.StringIO]:
        buffer = io.StringIO()
        yield buffer
        self.root.write_bytes_atomic(file_path, buffer.getvalue().encode())


class RootFileTransport(FileTransport):
    """openlineage-python's file transport (one file per event, ``append`` off) into ``<root>/lineage/``,
    under names that sort by time and that no concurrent writer takes."""

    def __init__(self, root: Root):
        self.root = root
        super().__init__(FileConfig(log_file_path=root.url_of(layout.LINEAGE_EVENTS), append=False))

    def _create_file_handler(self) -> FileHandler:
        return _RootFileHandler(self.root)

    def _get_file_path(self, event: Any) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        return f"{layout.LINEAGE_EVENTS}/{stamp}-{uuid.uuid4().hex}.json"


def _send_http(event: RunEvent) -> None:
    """POST the event to ``$OPENLINEAGE_URL`` when set; a failure is logged, the flow goes on."""
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        return
    config: dict[str, Any] = {"url": url, "endpoint": os.environ.get(ENDPOINT_ENV) or "api/v1/lineage"}
    if os.environ.get(API_KEY_ENV):
        config["auth"] = {"type": "api_key", "apiKey": os.environ[API_KEY_ENV]}
    try:
        HttpTransport(HttpConfig.from_dict(config)).emit(event)
    except Exception as err:  # noqa: BLE001 - the root holds the record; the consumer can be sent it again
        log.warning("lineage: event of job '%s' not sent to %s (%s: %s); it is kept under %s",
                    event.job.name, url, err.__class__.__name__, err, layout.LINEAGE_EVENTS)


# reading ----------------------------------------------------------------------------------------
def events(root: Root | str | None) -> list[dict[str, Any]]:
    """All recorded events, oldest first: a ``lineage.jsonl`` of earlier versions, then ``lineage/``."""
    root = open_root(root)
    legacy = []
    if root.file_exists(layout.LINEAGE):
        legacy = [json.loads(line) for line in root.read_bytes(layout.LINEAGE).decode().splitlines() if line.strip()]
    names = [n for n in root.ls(layout.LINEAGE_EVENTS) if n.endswith(".json") and not n.startswith(TMP_PREFIX)]
    blobs = read_many(root, [f"{layout.LINEAGE_EVENTS}/{name}" for name in names])
    return legacy + [parse_json(blobs[rel], root.url_of(rel)) for rel in sorted(blobs)]


def event_refs(event: dict[str, Any], side: Literal["inputs", "outputs"]) -> list[Ref]:
    """The references one side of an event names, typed from their paths (or bare ids)."""
    return [layout.parse_ref_path(str(item.get("name", ""))) for item in event.get(side, [])]
