"""Prefect flow: export pinned target versions of one plan as webdataset tar shards.

The flow resolves fields and versions (refusing mixed versions), plans shards by size, records the
plan in the export folder, writes each pending shard in a task (temporary name, renamed when
complete, then a ``_done`` record) and writes index.json last. A rerun of a finished export returns
at once; a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

from prefect import flow, task
from pydantic import Field

from flows.configs import ExportConfig
from pipelines.export import encode_sample, parse_size, plan_shards, sample_key, tar_sample_bytes
from schemas.base import StrictModel
from flows.runtime import RunnerChoice, gather, run_flow
from schemas import refs
from storage import lineage
from storage.claims import active_claims, claim_shard, wait_for_shards
from storage.exports import ClipSource, ExportBuild, ExportRecipe, ExportStore, resolve_sources
from storage.fs import open_root
from storage.targets import verify_by_default

log = logging.getLogger(__name__)
RAW_FIELDS = ("actions", "actions_mask", "state")
"""Episode fields stay float32/bool whatever the codec: they are tiny and trainers normalise them."""
JSON_SLACK = 1024
"""Bytes reserved per sample for metadata that varies between clips (instruction length)."""


class ExportResult(StrictModel):
    """What the flow produced."""

    export_id: str
    url: str
    num_samples: int
    num_shards: int
    total_bytes: int
    skipped: bool = Field(description="True when the export already existed and nothing was written.")


def batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def export_recipe(root_url: str, config: ExportConfig) -> ExportRecipe:
    """The recipe (and so the id) of an export, after resolving and checking its sources."""
    if not config.targets:
        raise ValueError("export: no target versions given (--targets is empty); name at least one version id")
    sources = resolve_sources(root_url, config.plan, config.targets, config.fields, config.action_column,
                              config.state_column, allow_null=config.allow_null)
    return ExportRecipe(plan_id=config.plan, split=config.split, sources=sources, codec=config.codec,
                        shard_bytes=parse_size(config.shard_size), action_chunk=config.action_chunk)


def select_clips(source: ClipSource, split: str | None) -> list[int]:
    """Plan rows of the clips whose episode is in ``split`` (all rows when None)."""
    clips = [i for i in range(len(source.rows)) if split is None or source.split(i) == split]
    if not clips:
        found = sorted({source.split(i) for i in range(len(source.rows))})
        raise ValueError(f"plan '{source.plan_id}': no clips of split '{split}' (splits present: {found})")
    return clips


def plan_export(root_url: str, recipe: ExportRecipe) -> ExportBuild:
    """Field specs, statistics and the shard plan (sized by encoding the first sample)."""
    source = ClipSource(root_url, recipe.plan_id, recipe.sources, recipe.action_chunk)
    clips = select_clips(source, recipe.split)
    export_id = recipe.export_id()
    first = source.read(clips[:1])[0]
    members, _ = encode_sample(sample_key(clips[0]), source.meta(clips[0], export_id), first, recipe.codec,
                               RAW_FIELDS)
    ranges = plan_shards(len(clips), tar_sample_bytes(members) + JSON_SLACK, recipe.shard_bytes)
    return ExportBuild(export_id=export_id, recipe=recipe, dataset=source.rows[0].dataset,
                       fields=source.field_specs(recipe.codec, RAW_FIELDS),
                       shard_clips=[[clips[i] for i in r] for r in ranges], stats=source.episode_stats(clips))


def write_shard(root_url: str, export_id: str, shard_index: int, read_batch: int = 4) -> int:
    """Write one planned shard unless it is done or another live builder holds its claim; returns the
    samples this call wrote (0 when it wrote nothing)."""
    store = ExportStore(root_url)
    with claim_shard(store.root, export_id, shard_index, is_done=lambda: _shard_done(store, export_id, shard_index),
                     on_acquire=lambda: store.remove_stale_temporaries(export_id, shard_index)) as owned:
        if not owned:
            return 0
        return _write_claimed_shard(store, export_id, shard_index, read_batch)


def _shard_done(store: ExportStore, export_id: str, shard_index: int) -> bool:
    return store.exists(export_id) or store.done_shard(export_id, shard_index) is not None


def _write_claimed_shard(store: ExportStore, export_id: str, shard_index: int, read_batch: int) -> int:
    build = store.build_info(export_id)
    recipe = build.recipe
    source = ClipSource(store.root, recipe.plan_id, recipe.sources, recipe.action_chunk)
    writer = store.shard_writer(export_id, shard_index, expected_bytes=recipe.shard_bytes)
    try:
        for clips in batches(build.shard_clips[shard_index], read_batch):
            for clip, arrays in zip(clips, source.read(clips), strict=True):
                members, _ = encode_sample(sample_key(clip), source.meta(clip, export_id), arrays, recipe.codec,
                                           RAW_FIELDS)
                writer.add_sample(clip, members)
        shard = writer.publish()
    except BaseException:
        writer.abort()
        raise
    store.record_shard(export_id, shard_index, shard)
    log.info("export %s: wrote %s (%d samples, %.1f MB)", export_id, shard.name, shard.samples, shard.bytes / 1e6)
    return shard.samples


def pending_shards(store: ExportStore, export_id: str) -> list[int]:
    """Shards still to write ([] once the export is complete, also when a concurrent builder
    completed it and removed the build files in between)."""
    if store.exists(export_id):
        return []
    try:
        return store.pending_shards(export_id)
    except ValueError:
        if store.exists(export_id):
            return []
        raise


@task(name="export-shard", retries=1, retry_delay_seconds=1)
def write_shard_task(root_url: str, export_id: str, shard_index: int, read_batch: int) -> int:
    return write_shard(root_url, export_id, shard_index, read_batch)


@flow(name="export", log_prints=False)
def export_flow(root_url: str, config: ExportConfig) -> ExportResult:
    """Export ``config.targets`` over ``config.plan``; returns the (possibly existing) export."""

    def submit(export_id: str, shards: list[int]) -> None:
        gather([write_shard_task.submit(root_url, export_id, i, config.read_batch) for i in shards])

    return build_export(root_url, config, submit)


def serial_shards(root_url: str, read_batch: int) -> Callable[[str, list[int]], None]:
    """A ``write_shards`` for :func:`build_export` that writes shards one after another in-process."""
    def write(export_id: str, shards: list[int]) -> None:
        for index in shards:
            write_shard(root_url, export_id, index, read_batch)

    return write


def build_export(root_url: str, config: ExportConfig, write_shards: Callable[[str, list[int]], None]) -> ExportResult:
    """The export stage: plan, write pending shards with ``write_shards(export_id, shards)``, wait for
    shards a concurrent builder of the same export holds (never writing them twice), finalize.
    Two identical exports racing both return the one export."""
    started = time.perf_counter()
    store = ExportStore(root_url)
    recipe = export_recipe(root_url, config)
    export_id = recipe.export_id()
    done = existing_export(root_url, export_id)
    if done is not None:
        return done
    build = plan_export(root_url, recipe)
    try:
        store.begin(build)
    except ValueError:
        if store.exists(export_id):  # a concurrent identical export finished first
            return existing_export(root_url, export_id)
        raise
    write_shards(export_id, pending_shards(store, export_id))
    wait_for_shards(lambda: pending_shards(store, export_id), lambda: set(active_claims(store.root, export_id)),
                    lambda free: write_shards(export_id, free), what=f"export '{export_id}'")
    index = store.finalize(export_id, timings={"export_s": time.perf_counter() - started},
                           verified_inputs=verify_by_default())
    lineage.emit(root_url, "export", str(uuid.uuid4()),
                 inputs=[refs.plan(config.plan), *map(refs.version, index.version_ids)],
                 outputs=[refs.export(export_id)], facets={"codec": recipe.codec, "samples": index.num_samples})
    return ExportResult(export_id=export_id, url=store.url(export_id), num_samples=index.num_samples,
                        num_shards=len(index.shards), total_bytes=index.total_bytes, skipped=False)


def existing_export(root_url: str, export_id: str) -> ExportResult | None:
    """The result for an export that is already complete, else None."""
    store = ExportStore(root_url)
    if not store.exists(export_id):
        return None
    index = store.index(export_id)
    return ExportResult(export_id=export_id, url=store.url(export_id), num_samples=index.num_samples,
                        num_shards=len(index.shards), total_bytes=index.total_bytes, skipped=True)


def run_export(root: str | None, config: ExportConfig, runner: RunnerChoice | None = None) -> ExportResult:
    """Check the inputs, then run the export flow with ``config.workers`` threads on Prefect's
    embedded API; a finished export returns without starting Prefect."""

    data_root = open_root(root)
    # Resolving first gives bad inputs a one-line error and finished exports an instant answer.
    done = existing_export(data_root.url, export_recipe(data_root.url, config).export_id())
    if done is not None:
        return done
    choice = runner or RunnerChoice(workers=config.workers)
    return run_flow(export_flow, choice, data_root, root_url=data_root.url, config=config)
