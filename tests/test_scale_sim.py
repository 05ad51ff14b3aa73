"""A 10^4-clip simulated chain (null models, bench/bench_scale.py's world) through a real Dask
scheduler with the root on moto's S3 server on loopback: every stage completes, and the
requests the server answered per shard stay within constant bounds (no listing per shard)."""

from __future__ import annotations

import math
from urllib.parse import unquote
import sys
from pathlib import Path

import pytest

from cluster_servers import DaskCluster, moto_bucket, shared_prefect_api

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_scale  # noqa: E402  (bench/ is not a package)

pytestmark = pytest.mark.slow  # real servers, ~60-90 s on 2 cores; part of `make test`

CLIPS, SHARD_SIZE = 10_000, 500
BUCKET = "foresight-scale-test"
STAGES = ("text", "generate", "export")  # the teachers' share is measured by bench/bench_scale.py
PER_SHARD, PER_CLIP, FIXED = 40, {"text": 0, "generate": 3, "export": 1}, 400
"""Bounds on the S3 requests of one stage run: PER_SHARD per target shard (claim, marker checks,
objects, marker), PER_CLIP per clip where the stage reads per clip (generate: the observed frame
from the episode store, a shard index and a chunk; export: zarr selections of 4 clips), and FIXED
for the checks and manifests that do not grow (bench/RESULTS.md, Issue 24)."""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_bucket(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


def test_one_shard_costs_the_same_requests_whatever_the_number_of_shards(s3):
    """A claim, a marker check and a write of shard n: no request that lists every shard's claim
    or marker (s3fs's ls of an empty folder lists its parent; exists is a HEAD then a LIST)."""
    import numpy as np

    from foresight.schemas.target import ArraySpec, TargetRecipe
    from foresight.storage.claims import ClaimSet
    from foresight.storage.targets import TargetStore

    root_url = f"s3://{BUCKET}/requests"
    requests = bench_scale.RequestLog(s3.server.log_path)
    recipe = TargetRecipe(kind="text", stage="tests.requests", stage_version=1)
    counts = []
    for shards in (4, 40):
        recipe = recipe.model_copy(update={"params": {"shards": shards}})
        arrays = [ArraySpec(name="v", shape=[shards, 2], dtype="float32"),
                  ArraySpec(name="clip", shape=[shards], dtype="int64")]  # 1-d: every shard in one folder
        writer = TargetStore(root_url).begin(recipe, arrays, shards, 1)
        claims = ClaimSet(writer.root, writer.version_id, is_done=writer.is_done,
                          on_acquire=writer.remove_stale_temporaries)  # what flows.build's shard tasks hold

        def write(shard: int) -> None:
            assert claims.take(shard)
            try:
                writer.write_shard(shard, {"v": np.zeros((1, 2), np.float32), "clip": np.array([shard])})
            finally:
                claims.release(shard)

        for shard in range(shards - 1):
            write(shard)
        requests.mark()
        write(shards - 1)
        counts.append(requests.since_mark())
        listed = [unquote(t.split("prefix=", 1)[1].split("&", 1)[0]) for m, t in requests.requests_since_mark()
                  if "list-type" in t]
        # Only the shard's own claim folder, and the temporaries of its object folders, are listed.
        assert all(f"/{shards - 1}/" in prefix or prefix.endswith("/.tmp-") for prefix in listed), listed
        requests.mark()
        writer.finalize()
        finalize = requests.since_mark()
        assert finalize["LIST"] <= 3, finalize  # one recursive listing (pages of 1,000), not one per shard
    assert counts[0] == counts[1], counts


def test_ten_thousand_clips_on_s3_through_a_dask_scheduler(tmp_path, s3):
    from foresight.flows.pipeline import run_pipeline
    from foresight.flows.runtime import RunnerChoice
    from foresight.storage.exports import ExportStore
    from foresight.storage.fs import Root

    shared_prefect_api(tmp_path)
    root_url = f"s3://{BUCKET}/sim"
    bench_scale.make_world(root_url, CLIPS)
    sections = {**bench_scale.chain_sections(CLIPS, SHARD_SIZE, workers=2), "teachers": []}
    requests = bench_scale.RequestLog(s3.server.log_path)
    cluster = DaskCluster(tmp_path / "dask", n_workers=2)  # after the fixtures: workers inherit both
    shards = math.ceil(CLIPS / SHARD_SIZE)
    counts = {}
    try:
        for stage in STAGES:
            requests.mark()
            summary = run_pipeline(bench_scale.pipeline_upto(stage, sections), root=root_url,
                                   runner=RunnerChoice(dask_address=cluster.address))
            row = next(r for r in summary.stages if r.stage == stage)
            assert row.status == "ran", row
            counts[stage] = requests.since_mark()
    finally:
        cluster.stop()
    for stage, count in counts.items():
        bound = PER_SHARD * shards + PER_CLIP[stage] * CLIPS + FIXED
        assert sum(count.values()) <= bound, (stage, count, bound)
        assert count["LIST"] <= 4 * shards + FIXED / 4, (stage, count)  # a few listings of its own per shard
    export = summary.stages[-1].output
    index = ExportStore(Root(root_url)).index(export)
    assert index.num_samples == CLIPS and index.null_versions  # made from null versions, and says so
