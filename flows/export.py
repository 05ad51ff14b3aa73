"""Prefect flow: export pinned target versions of one plan as webdataset tar shards.

The stage resolves fields and versions (refusing mixed versions), plans shards by size and records
the plan in the export folder; flows/build.py then claims and writes each pending shard in a task
(temporary name, renamed when complete, then a ``_done`` record), waits for shards a concurrent
builder holds and writes index.json last. A rerun of a finished export returns at once; a killed
run resumes at the first unfinished shard; two identical exports racing write each shard once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prefect import flow

from foresight.flows.build import BuildSummary, Stage, build, prefect_tasks, run_build, run_worker
from foresight.flows.configs import ExportConfig
from foresight.flows.runtime import RunnerChoice
from foresight.pipelines.export import encode_sample, parse_size, plan_shards, sample_key, tar_sample_bytes
from foresight.storage import layout
from foresight.storage.exports import ClipSource, ExportBuild, ExportRecipe, ExportStore, ShardClipTable, resolve_sources
from foresight.storage.targets import verify_by_default

log = logging.getLogger(__name__)
RAW_FIELDS = ("actions", "actions_mask", "state")
"""Episode fields stay float32/bool whatever the codec: they are tiny and trainers normalise them."""
JSON_SLACK = 1024
"""Bytes reserved per sample for metadata that varies between clips (instruction length)."""




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


# ---------------------------------------------------------------- the stage
class ExportOutput:
    """A building export: shards are tar files, done when their ``_done/<i>.json`` record exists
    (or the whole export is); the build plan is read once, when first needed, and kept as its recipe
    and a :class:`ShardClipTable` (8 B a clip), not as the plan's per-clip lists."""

    identity = None

    def __init__(self, root_url: str, export_id: str):
        self.store = ExportStore(root_url)
        self.root, self.version_id = self.store.root, export_id
        self._recipe: ExportRecipe | None = None
        self._shards: ShardClipTable | None = None

    def _load_plan(self) -> None:
        self._recipe, self._shards = self.store.shard_plan(self.version_id)

    @property
    def recipe(self) -> ExportRecipe:
        if self._recipe is None:
            self._load_plan()
        return self._recipe

    @property
    def shard_plan(self) -> ShardClipTable:
        """Plan rows of each planned shard."""
        if self._shards is None:
            self._load_plan()
        return self._shards

    def pending(self) -> list[int]:
        """Shards still to write ([] once the export is complete, also when a concurrent builder
        completed it and removed the build files in between): one listing of ``_done/`` (the build
        plan, every clip, is read once per output, not at each look of the progress poll)."""
        try:
            pending = self.store.pending_shards(self.version_id, len(self.shard_plan))
        except ValueError:
            if self.store.exists(self.version_id):
                return []
            raise
        # A finalizer publishes index.json before it removes _done/: an empty listing seen after
        # that removal is caught here.
        return [] if pending and self.store.exists(self.version_id) else pending

    def is_done(self, shard: int) -> bool:
        return self.store.exists(self.version_id) or self.store.done_shard(self.version_id, shard) is not None

    def clips(self, shard: int) -> int:
        return self.shard_plan.size(shard)

    def prepare(self, shard: int) -> None:
        self.store.remove_stale_temporaries(self.version_id, shard)

    def write(self, shard: int, samples: Iterator[tuple[int, list]]) -> None:
        """Stream the samples into the shard's tar (temporary name, renamed when complete), then
        record it done."""
        writer = self.store.shard_writer(self.version_id, shard, expected_samples=self.clips(shard))
        try:
            for clip, members in samples:
                writer.add_sample(clip, members)
            tar = writer.publish()
        except BaseException:
            writer.abort()
            raise
        self.store.record_shard(self.version_id, shard, tar)
        log.info("export %s: wrote %s (%d samples, %.1f MB)", self.version_id, tar.name, tar.samples, tar.bytes / 1e6)

    def finalize(self, timings: dict[str, float]) -> str:
        self.store.finalize(self.version_id, timings=timings, verified_inputs=verify_by_default())
        return "complete"


_THREAD_SOURCES = threading.local()
"""The last export's ClipSource of each worker thread (see :func:`clip_source`)."""


def clip_source(root_url: str, recipe: ExportRecipe) -> ClipSource:
    """The sources of an export's samples, opened once per worker thread and export: every shard is
    a task, and opening reads the whole plan (clips.parquet, ~0.6 s at 10^6 clips) and each
    version's shard table. Kept per thread (a ClipSource caches reads and is not shared between
    threads); everything it reads is immutable (complete versions, the plan, the episodes)."""
    key = (root_url, recipe.export_id(), verify_by_default())
    cached = getattr(_THREAD_SOURCES, "entry", None)
    if cached is not None and cached[0] == key:
        cached[1].forget_reads()  # what the previous task read and checked is checked again
        return cached[1]
    _THREAD_SOURCES.entry = None  # the previous export's sources go before the next ones are read
    source = ClipSource(root_url, recipe.plan_id, recipe.sources, recipe.action_chunk)
    _THREAD_SOURCES.entry = (key, source)
    return source


class ExportWorker:
    """Reads and encodes the samples of one shard, ``read_batch`` clips per zarr selection."""

    identity = None

    def __init__(self, root_url: str, output: ExportOutput, read_batch: int):
        self.root_url, self.output, self.read_batch = root_url, output, read_batch
        self._source: ClipSource | None = None

    def compute(self, shard: int) -> Iterator[tuple[int, list]]:
        """(clip, tar members) of the shard's samples, lazily: the tar is written as they come. The
        sources open on first use, under the shard's claim (a concurrent builder may have finished
        the export, and removed its build plan, before this task claimed anything)."""
        recipe = self.output.recipe
        if self._source is None:
            self._source = clip_source(self.root_url, recipe)
        for clips in batches(self.output.shard_plan.clips(shard), self.read_batch):
            for clip, arrays in zip(clips, self._source.read(clips), strict=True):
                members, _ = encode_sample(sample_key(clip), self._source.meta(clip, self.output.version_id), arrays,
                                           recipe.codec, RAW_FIELDS)
                yield clip, members


class ExportStage(Stage[ExportConfig]):
    """``export``: pinned target versions of one plan as webdataset tar shards."""

    name, config_type = "export", ExportConfig

    def recipe(self, root_url: str, config: ExportConfig) -> ExportRecipe:
        return export_recipe(root_url, config)

    def output_id(self, recipe: ExportRecipe) -> str:
        return recipe.export_id()

    def status(self, root_url: str, output_id: str) -> str | None:
        store = ExportStore(root_url)
        if store.exists(output_id):
            return "complete"
        return "building" if store.root.exists(layout.export_dir(output_id)) else None

    def begin(self, root_url: str, config: ExportConfig, recipe: ExportRecipe) -> ExportOutput | None:
        store = ExportStore(root_url)
        try:
            store.begin(plan_export(root_url, recipe))
        except ValueError:
            if store.exists(recipe.export_id()):  # a concurrent identical export finished first
                return None
            raise
        return self.reopen(root_url, recipe.export_id())

    def reopen(self, root_url: str, output_id: str) -> ExportOutput:
        return ExportOutput(root_url, output_id)

    def open_worker(self, root_url: str, config: ExportConfig, output: ExportOutput,
                    shards: list[int]) -> ExportWorker:
        return ExportWorker(root_url, output, config.read_batch)

    def inputs(self, root_url: str, config: ExportConfig, recipe: ExportRecipe) -> list[str]:
        versions = ExportStore(root_url).index(recipe.export_id()).version_ids
        return [layout.plan_dir(config.plan), *(layout.target_dir(v) for v in versions)]

    def output_name(self, output_id: str) -> str:
        return layout.export_dir(output_id)

    def unverified_inputs(self, root_url: str, output_id: str) -> list[str]:
        index = ExportStore(root_url).index(output_id)
        return [] if index.verified_inputs else index.version_ids

    def describe(self, root_url: str, output_id: str) -> dict[str, Any]:
        store = ExportStore(root_url)
        index = store.index(output_id)
        return {"url": store.url(output_id), "num_samples": index.num_samples, "num_shards": len(index.shards),
                "total_bytes": index.total_bytes}


EXPORT = ExportStage()


def write_shard(root_url: str, export_id: str, shard_index: int, read_batch: int = 4) -> int:
    """Write one planned shard unless it is done or another live builder holds its claim (through
    the same claims as every build); returns the samples this call wrote (0 when none)."""
    output = EXPORT.reopen(root_url, export_id)
    if output.is_done(shard_index):
        return 0
    return run_worker(output, ExportWorker(root_url, output, read_batch), [shard_index]).clips


@flow(name="export", log_prints=False)
def export_flow(root_url: str, config: ExportConfig) -> BuildSummary:
    """Export ``config.targets`` over ``config.plan``; returns the (possibly existing) export.
    One task per shard: the task runner's workers (``config.workers``) bound how many run at once."""
    return build(EXPORT, root_url, config, prefect_tasks(0))


def run_export(root: str | None, config: ExportConfig, runner: RunnerChoice | None = None) -> BuildSummary:
    """Check the inputs, then run the export flow with ``config.workers`` threads on Prefect's
    embedded API; a finished export returns without starting Prefect."""
    return run_build(export_flow, EXPORT, root, config, runner or RunnerChoice(workers=config.workers))
