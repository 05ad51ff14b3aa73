"""Lineage by the book: events made by openlineage-python validate against the published OpenLineage
schema (vendored: tests/openlineage/OpenLineage.json, spec 2-0-2), one object per event so that
concurrent writers on S3 lose none, the HTTP transport to a Marquez-like endpoint, and events of
the ``lineage.jsonl`` of earlier versions still read."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlparse

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from cluster_servers import REPO, TESTS, child_env, moto_bucket
from foresight.schemas import refs
from foresight.storage import layout, lineage
from foresight.storage.fs import Root

SPEC = json.loads((TESTS / "openlineage" / "OpenLineage.json").read_text())
FACET_SPEC = json.loads((REPO / "docs" / "lineage" / "ForesightRunFacet.json").read_text())
REGISTRY = Registry().with_resources([(SPEC["$id"], Resource.from_contents(SPEC)),
                                      (FACET_SPEC["$id"], Resource.from_contents(FACET_SPEC))])


def schema_errors(instance: dict, url: str) -> list[str]:
    """Errors of ``instance`` against the schema that ``url`` (a schemaURL) points at."""
    validator = Draft202012Validator({"$ref": url}, registry=REGISTRY,
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def is_absolute_uri(text: str) -> bool:
    parsed = urlparse(text)
    return bool(parsed.scheme and parsed.netloc)


def emit_teacher_event(root, run_id: str = "run-1") -> dict:
    return lineage.emit(root, "teachers", run_id, inputs=[refs.version("video-0123456789ab")],
                        outputs=[refs.version("teacher-0123456789ab")],
                        facets={"config": {"batch": 4, "dtype": None}, "model": {"name": "tiny"}})


def test_events_validate_against_the_published_schema(tmp_path):
    event = emit_teacher_event(tmp_path)
    assert event["schemaURL"].startswith(SPEC["$id"]) and is_absolute_uri(event["producer"])
    assert schema_errors(event, event["schemaURL"]) == []
    facet = event["run"]["facets"][lineage.FACET]
    assert is_absolute_uri(facet["_producer"]) and is_absolute_uri(facet["_schemaURL"])
    assert facet["_schemaURL"].startswith(FACET_SPEC["$id"])
    assert schema_errors(facet, facet["_schemaURL"]) == []
    assert facet["config"] == {"batch": 4} and facet["runName"] == "run-1"  # run-1 is no UUID: runId derived
    assert uuid.UUID(event["run"]["runId"]) == uuid.uuid5(uuid.NAMESPACE_URL, "foresight:teachers:run-1")
    given = str(uuid.uuid4())
    assert emit_teacher_event(tmp_path, given)["run"]["runId"] == given
    assert lineage.events(tmp_path)[0] == event  # the stored object is the returned event


def test_an_event_the_schema_rejects_is_caught_by_the_check():
    """The validator is not vacuous: an event without producer or with a facet lacking _schemaURL fails."""
    event = {"eventTime": "2026-01-01T00:00:00Z", "eventType": "COMPLETE", "job": {"namespace": "n", "name": "j"},
             "run": {"runId": str(uuid.uuid4()), "facets": {"x": {"_producer": "https://p"}}},
             "schemaURL": f"{SPEC['$id']}#/$defs/RunEvent"}
    errors = schema_errors(event, event["schemaURL"])
    assert any("'producer' is a required" in e for e in errors) and any(e.startswith("run/facets") for e in errors), errors


def test_one_object_per_event_and_the_old_lineage_file_still_read(tmp_path):
    root = Root(tmp_path)
    old = {"eventType": "COMPLETE", "eventTime": "2025-01-01T00:00:00+00:00", "producer": lineage.PRODUCER,
           "run": {"runId": "r0", "facets": {"params": {}}}, "job": {"namespace": "foresight", "name": "plan"},
           "inputs": [{"namespace": root.url, "name": "datasets/demo"}],
           "outputs": [{"namespace": root.url, "name": "plan-0123456789ab"}]}  # a bare id, as before typed refs
    (tmp_path / layout.LINEAGE).write_text(json.dumps(old) + "\n")
    for _ in range(3):
        emit_teacher_event(root)
    assert len(root.ls(layout.LINEAGE_EVENTS)) == 3
    assert (tmp_path / layout.LINEAGE).read_text() == json.dumps(old) + "\n"  # never rewritten
    events = lineage.events(root)
    assert [e["job"]["name"] for e in events] == ["plan", "teachers", "teachers", "teachers"]
    assert lineage.event_refs(events[0], "outputs") == [refs.plan("plan-0123456789ab")]
    assert lineage.event_refs(events[1], "inputs") == [refs.version("video-0123456789ab")]


class LineageEndpoint(BaseHTTPRequestHandler):
    """A Marquez-like endpoint on loopback: records each POST; answers ``status`` (201 by default)."""

    received: list[tuple[str, dict]] = []
    status = 201

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        """No request lines on stderr."""


@pytest.fixture()
def endpoint(monkeypatch):
    LineageEndpoint.received, LineageEndpoint.status = [], 201
    server = HTTPServer(("127.0.0.1", 0), LineageEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(lineage.URL_ENV, f"http://127.0.0.1:{server.server_port}")
    yield LineageEndpoint
    server.shutdown()
    server.server_close()


def test_with_a_url_set_events_also_go_to_the_http_endpoint(tmp_path, endpoint):
    event = emit_teacher_event(tmp_path)
    assert endpoint.received == [("/api/v1/lineage", event)]
    assert lineage.events(tmp_path) == [event]


def test_an_endpoint_that_refuses_is_a_warning_and_the_root_keeps_the_event(tmp_path, endpoint, caplog):
    endpoint.status = 400
    event = emit_teacher_event(tmp_path)
    assert lineage.events(tmp_path) == [event]
    assert "not sent to http://127.0.0.1" in caplog.text


WRITER = """
import sys
from foresight.schemas import refs
from foresight.storage import lineage
for i in range(int(sys.argv[3])):
    lineage.emit(sys.argv[1], "writer", f"{sys.argv[2]}-{i}", inputs=[refs.plan("plan-0123456789ab")],
                 outputs=[refs.version("video-0123456789ab")], facets={"writer": sys.argv[2], "i": i})
"""


@pytest.mark.slow
def test_concurrent_writers_on_s3_lose_no_event(tmp_path):
    writers, per_writer = 4, 8
    (tmp_path / "moto").mkdir()
    with moto_bucket(tmp_path / "moto", "lineage-bucket") as server:
        url = "s3://lineage-bucket/root"
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, f"w{k}", str(per_writer)],
                                  env=child_env(**server.env), stderr=subprocess.PIPE) for k in range(writers)]
        for proc in procs:
            assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
        events = lineage.events(url)
    names = sorted(e["run"]["facets"]["foresight"]["runName"] for e in events)
    assert names == sorted(f"w{k}-{i}" for k in range(writers) for i in range(per_writer))
    assert all(schema_errors(e, e["schemaURL"]) == [] for e in events)
