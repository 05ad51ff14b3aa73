"""A pristine tiny root for the adversarial integrity corpus (tests/test_integrity_*.py), and the
tampering helpers the corpus applies to copies of it."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trainers_world as tw
from foresight.flows.build import build as build_stage, in_process
from foresight.flows.export import EXPORT, ExportConfig
from foresight.storage.exports import ExportStore, ShardTarWriter
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore, shard_object

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


def _race_child(log_path: str, barrier: Any, run: Callable[[], Any]) -> None:
    """Body of one racing child: log every tar it publishes (pid, name), start with the others at
    the barrier, run; exit 0, or 1 with the error logged."""
    real_publish = ShardTarWriter.publish

    def publish(self):
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()} {self.name}\n")
        return real_publish(self)

    ShardTarWriter.publish = publish
    barrier.wait()
    try:
        run()
    except BaseException as err:  # noqa: BLE001 - reported to the parent through the log and exit code
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()} failed {err!r}\n")
        os._exit(1)
    os._exit(0)


def race(runs: list[Callable[[], Any]], log_path: Path, timeout_s: float = 300) -> tuple[list[int | None], list[str]]:
    """Run each (picklable) callable in its own process, all released at once; their exit codes
    and the log lines '<pid> <tar name>' of every shard they published."""
    context = multiprocessing.get_context("spawn")  # a forked child inherits event-loop threads mid-state
    barrier = context.Barrier(len(runs))
    children = [context.Process(target=_race_child, args=(str(log_path), barrier, run)) for run in runs]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=timeout_s)
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    return [child.exitcode for child in children], lines
