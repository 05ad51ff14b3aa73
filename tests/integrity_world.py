"""A pristine tiny root for the adversarial integrity corpus (tests/test_integrity_*.py), and the
tampering helpers the corpus applies to copies of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import trainers_world as tw
from flows.build import build as build_stage, in_process
from flows.export import EXPORT, ExportConfig
from storage.exports import ExportStore
from storage.fs import Root
from storage.targets import TargetStore, shard_object

NUM_CLIPS = 16


def build(base: Path) -> dict[str, str]:
    """Dataset, plan, video/teacher/text versions and one export of them (no Prefect)."""
    root = Root(base)
    plan = tw.make_plan(root, tw.make_dataset(root), NUM_CLIPS)
    ids = tw.make_targets(root, plan, NUM_CLIPS)
    world = {"root": root.url, "plan": plan, **ids}
    world["export"] = export(world).export_id
    return world


def export_config(world: dict[str, str], **overrides) -> ExportConfig:
    fields = dict(plan=world["plan"], targets=[world["video"], world["dinov2"]], shard_size="40KB", action_chunk=5)
    return ExportConfig(**{**fields, **overrides})


def export(world: dict[str, str], **overrides):
    """Run the export stage in-process (shards written serially); returns its BuildSummary."""
    return build_stage(EXPORT, world["root"], export_config(world, **overrides), in_process)


def one_line(err: BaseException) -> str:
    """The message of ``err``, asserting it is the one line the README promises."""
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def copy_world(world: dict[str, str], dest: Path) -> dict[str, str]:
    shutil.copytree(world["root"], dest)
    return {**world, "root": str(dest)}


def flip_byte(path: Path, offset: int, mask: int = 0x5A) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


def shard_file(world: dict[str, str], version: str, array: str, shard: int = 0) -> Path:
    manifest = TargetStore(world["root"]).manifest(version)
    return Path(Root(world["root"]).path(shard_object(manifest, array, shard)))


def export_shard_file(world: dict[str, str], position: int = 0) -> Path:
    index = ExportStore(world["root"]).index(world["export"])
    return Path(world["root"]) / "exports" / world["export"] / index.shards[position].name


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def stray_temporaries(root: str | Path) -> list[str]:
    """Every writer temporary anywhere under a root (the corpus expects none after a run)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(".tmp-*"))
