"""Typed lineage: references round-trip to the bytes version ids were made of, lineage events name
typed store paths, and the one graph walker gives the closures audit, gc and export rely on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from foresight.schemas import refs
from foresight.schemas.base import canonical_json, validate_stored
from foresight.schemas.refs import Ref
from foresight.schemas.target import TargetRecipe, TargetVersion
from foresight.storage import audit, layout, lineage, references
from foresight.storage.exports import ExportStore, FieldSource, check_no_mixing, plan_of
from foresight.storage.fs import Root
from foresight.storage.graph import VersionGraph
from foresight.storage.targets import TargetStore
from test_audit_store import (make_dataset, make_plan, make_version, teacher_arrays, tiny_model, video_arrays,
                              write_export, write_run)

OLD_MANIFEST = (
    '{"arrays": [{"compression": "zstd", "dtype": "float32", "name": "actions", "shape": [4, 2]}], "completed": null, '
    '"created": "2026-01-01T00:00:00+00:00", "format_version": 1, "git_commit": null, "host": null, '
    '"id": "pi0-ae8196d2dce7", "num_clips": 4, "packages": {}, "recipe": {"inputs": {"dataset": '
    '"abababababababababababababababababababababababababababababababab", "plan": "plan-0123456789ab"}, '
    '"kind": "pi0", "model": {"config": {"width": 8}, "family": "pi0", "ref": null, "revision": null, "seed": 0, '
    '"source": "tiny", "spec": "tiny", "weights_sha256": null}, "params": {"num_clips": 4}, "stage": "pi0.targets", '
    '"stage_version": 1}, "shard_size": 2, "shard_xxh3": {}, "shards": {}, "status": "complete", "timings": {}, '
    '"verified_inputs": true}')
"""A manifest as written before recipe inputs were typed (a pi0 version: a plan and a dataset fingerprint)."""


def test_a_stored_manifest_loads_typed_and_serializes_to_the_same_bytes():
    manifest = validate_stored(TargetVersion, json.loads(OLD_MANIFEST), "old manifest.json")
    assert manifest.recipe.inputs == {"plan": refs.plan("plan-0123456789ab"),
                                      "dataset": Ref(kind="value", id="ab" * 32)}
    assert json.dumps(manifest.model_dump(mode="json"), sort_keys=True) == OLD_MANIFEST
    assert json.loads(manifest.model_dump_json()) == json.loads(OLD_MANIFEST)
    assert manifest.recipe.version_id() == "pi0-ae8196d2dce7"


def test_typed_and_bare_inputs_hash_alike():
    bare = TargetRecipe(kind="teacher", stage="teacher.dinov2", stage_version=1, inputs={"video": "video-0123456789ab"})
    typed = TargetRecipe(kind="teacher", stage="teacher.dinov2", stage_version=1,
                         inputs={"video": refs.version("video-0123456789ab")})
    assert bare == typed and bare.version_id() == typed.version_id() == "teacher-a8937312726b"
    assert canonical_json(bare.key()["inputs"]) == '{"video":"video-0123456789ab"}'
    assert bare.input_ids() == {"video": "video-0123456789ab"} and bare.inputs_of("version")[0].target_kind == "video"


@pytest.mark.parametrize("key, value, kind", [
    ("plan", "p", "plan"),  # the key names a plan whatever its id looks like
    ("source", "plan-0123456789ab", "plan"),
    ("video", "video-0123456789ab", "version"),
    ("text", "t", "value"),  # not a version id: names nothing stored
    ("pinned", "export-0123456789ab", "export"),
    ("dataset", "ab" * 32, "value"),
])
def test_a_reference_knows_its_kind_from_its_key_or_its_id(key, value, kind):
    assert Ref.recipe_input(key, value).kind == kind
    assert refs.is_version_id(value) == (kind == "version")


def test_store_paths_round_trip_and_bare_ids_still_read():
    for ref in (refs.plan("plan-0123456789ab"), refs.version("video-0123456789ab"), refs.export("export-a"),
                refs.run("svam-b"), refs.dataset("demo"), refs.evaluation("eval-c")):
        assert layout.parse_ref_path(layout.ref_path(ref)) == ref
    assert layout.ref_path(refs.version("video-0123456789ab")) == "targets/video-0123456789ab"
    assert layout.parse_ref_path("teacher-0123456789ab") == refs.version("teacher-0123456789ab")
    assert layout.parse_ref_path("/data/calvin/task_D") == refs.source("/data/calvin/task_D")
    with pytest.raises(ValueError, match="value reference 'x' names nothing stored"):
        layout.ref_path(Ref(kind="value", id="x"))


def test_events_name_typed_paths_and_refuse_bare_ids(tmp_path: Path):
    root = Root(tmp_path)
    lineage.emit(root, "teachers", "r1", inputs=[refs.version("video-0123456789ab")],
                 outputs=[refs.version("teacher-0123456789ab")])
    event = lineage.events(root)[0]
    assert [i["name"] for i in event["inputs"]] == ["targets/video-0123456789ab"]
    assert lineage.event_refs(event, "outputs") == [refs.version("teacher-0123456789ab")]
    lineage.emit(root, "text", "r2", inputs=["plans/plan-0123456789ab"], outputs=[layout.target_dir("text-0123456789ab")])
    assert lineage.event_refs(lineage.events(root)[1], "inputs") == [refs.plan("plan-0123456789ab")]
    with pytest.raises(TypeError, match="lineage event 'text': 'plan-0123456789ab' is neither a schemas.refs.Ref"):
        lineage.emit(root, "text", "r3", inputs=["plan-0123456789ab"], outputs=[])


@pytest.fixture()
def chain(tmp_path: Path) -> dict[str, str]:
    """plan -> text -> video -> teacher, a spare video, an export of the teacher and a run on the export."""
    root = Root(tmp_path / "root")
    plan_id = make_plan(root, make_dataset(root))
    text = make_version(root, "text", {"embedding": np.ones((6, 4), np.float16)}, {"plan": plan_id})
    video = make_version(root, "video", video_arrays(0), {"plan": plan_id, "text": text},
                         {"steps": 2}, tiny_model("svd"))
    teacher = make_version(root, "teacher", teacher_arrays(1), {"video": video}, {"teacher": "dinov2"},
                           tiny_model("dinov2"))
    spare = make_version(root, "video", video_arrays(2), {"plan": plan_id, "text": text}, {"steps": 3})
    write_export(root, "export-0123456789ab", {"target": teacher})
    write_run(root, "svam-run", "export-0123456789ab", {})
    return {"root": root.url, "plan": plan_id, "text": text, "video": video, "teacher": teacher, "spare": spare}


def test_one_walker_gives_the_closures(chain):
    store = TargetStore(chain["root"])
    graph = VersionGraph(store)
    assert list(graph.upstream([chain["teacher"]])) == [chain["teacher"], chain["video"], chain["text"]]
    assert graph.closure([chain["teacher"], "not-a-version"]) == {chain[k] for k in ("teacher", "video", "text")}
    assert {graph.plan_of(chain[k]) for k in ("text", "video", "teacher")} == {chain["plan"]}
    assert audit.expand_with_upstream(graph, [chain["teacher"]]) == [chain["video"], chain["teacher"]]
    assert audit.common_plan(graph, [chain["teacher"], chain["spare"]]) == chain["plan"]
    assert plan_of(graph, store.manifest(chain["teacher"])) == chain["plan"]


def test_references_and_gc_keep_the_chain_through_the_run(chain):
    store = TargetStore(chain["root"])
    uses = references.users_of(store, chain["text"])
    assert {(u.kind, u.id, u.direct) for u in uses} == {("export", "export-0123456789ab", False),
                                                          ("run", "svam-run", False)}
    plan = references.plan_gc(chain["root"])
    assert [i.version_id for i in plan.remove] == [chain["spare"]]
    assert {i.version_id for i in plan.keep} == {chain[k] for k in ("text", "video", "teacher")}


def test_pinning_two_videos_beside_a_teacher_of_one_is_refused(chain):
    store = TargetStore(chain["root"])
    graph = VersionGraph(store)
    manifests = {v: store.manifest(v) for v in (chain["teacher"], chain["spare"])}
    with pytest.raises(ValueError, match=f"computed from video '{chain['video']}'.*refusing to mix"):
        check_no_mixing(manifests, graph)
    tree = audit.lineage_tree(chain["root"], chain["teacher"])
    video = tree.children[0]
    assert (video.type, video.role) == ("version", "video")
    assert sorted((c.type, c.role) for c in video.children) == [("plan", "plan"), ("version", "text")]


@pytest.mark.parametrize("text, parsed", [
    ("teacher-0123456789ab:target", FieldSource.target("teacher-0123456789ab", "target")),
    ("episode:action", FieldSource.episode("action")),
    ("episode:action:mask", FieldSource.episode("action", mask=True)),
])
def test_field_sources_parse_once_and_serialize_to_the_same_text(text, parsed):
    assert FieldSource.parse(text) == parsed and str(parsed) == text


@pytest.mark.parametrize("bad", ["teacher-0123456789ab", "episode:", "p:target", "video-0123456789ab:a:b", 7])
def test_a_bad_field_source_is_one_line_naming_the_export_and_field(tmp_path: Path, bad):
    root = Root(tmp_path)
    recipe = {"plan_id": "plan-0123456789ab", "split": None, "sources": {"dino": bad}, "codec": "f16",
              "shard_bytes": 1000, "action_chunk": 4}
    root.write_json_atomic("exports/export-0123456789ab/index.json", {
        "format_version": 1, "export_id": "export-0123456789ab", "recipe": recipe, "plan_id": recipe["plan_id"],
        "dataset": "demo", "versions": {}, "fields": {}, "num_samples": 0, "total_bytes": 0, "shards": []})
    with pytest.raises(ValueError) as caught:
        ExportStore(root).index("export-0123456789ab")
    message = str(caught.value)
    assert "\n" not in message and "exports/export-0123456789ab/index.json" in message
    assert f"field 'dino': field source {bad!r}: expected '<target version>:<array>'" in message
