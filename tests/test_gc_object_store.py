"""`targets gc` on an object store (moto's S3 server on loopback): the same decisions, sizes and
deletions as on the local disk, from listings of one array folder at a time (never one listing of
all of targets/, which held an info dict per object of the root)."""

from __future__ import annotations

import time

import pytest

from cluster_servers import moto_bucket
from foresight.storage import references
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore
from test_audit_store import build_world, make_teacher, write_export

BUCKET = "foresight-gc"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_bucket(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


def decisions(plan: references.GcPlan) -> dict[str, list[tuple[str, str, str, int]]]:
    """Every item of a gc plan but its age (the stores' clocks differ)."""
    return {side: [(i.version_id, i.status, i.reason, i.bytes) for i in getattr(plan, side)] for side in ("remove", "keep")}


def test_gc_on_an_object_store_lists_one_array_folder_at_a_time(tmp_path, s3, monkeypatch):
    world = build_world(tmp_path)
    local = Root(world["root"])
    unreferenced = make_teacher(local, world["video"], resolution=448, seed=5)
    abandoned = make_teacher(local, world["video"], resolution=112, finalize=False)
    write_export(local, "export-aaaaaaaaaaaa", {"dinov2.target": world["teacher"]})
    remote = Root(f"s3://{BUCKET}/gc")
    remote.fs.put(local.path() + "/", remote.fs._strip_protocol(remote.path()), recursive=True)
    later = time.time() + 48 * 3600  # every building version untouched for longer than the default age
    expected = decisions(references.plan_gc(local, now=later))
    assert {item[0] for item in expected["remove"]} == {unreferenced, abandoned}

    listed: list[str] = []
    find = remote.fs.find
    monkeypatch.setattr(remote.fs, "find", lambda path, **kwargs: listed.append(path) or find(path, **kwargs))
    plan = references.plan_gc(remote, now=later)
    assert decisions(plan) == expected  # the same decisions, reasons and bytes
    assert TargetStore(remote).folder_sizes() == TargetStore(local).folder_sizes()
    targets = remote.fs._strip_protocol(remote.path("targets")).rstrip("/") + "/"
    below_targets = [path[len(targets):].strip("/") for path in listed if path.startswith(targets)]
    assert below_targets and all(path.count("/") == 1 for path in below_targets), below_targets  # <version>/<array>
    assert f"{abandoned}/_done" in below_targets and f"{unreferenced}/target.zarr" in below_targets

    removed = references.apply_gc(remote, plan, run_id="gc-s3")
    assert removed == references.apply_gc(local, references.plan_gc(local, now=later), run_id="gc-local")
    assert sorted(removed) == sorted([unreferenced, abandoned])
    assert not any(remote.fs.exists(remote.path("targets", version_id)) for version_id in removed)
    assert references.plan_gc(remote, now=later).remove == []
    assert decisions(references.plan_gc(remote, now=later)) == decisions(references.plan_gc(local, now=later))
