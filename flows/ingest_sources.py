"""Prefect flows: ingest CALVIN, teleoperation HDF5 and LeRobot datasets into the episode store.

Each source episode is an independent task (LeRobot v3: each group of episodes sharing files,
so every video file is decoded once). A task skips an episode already stored from the same
source checksum, streams a new one into the store shard by shard, and quarantines bad input
(or, with ``strict``, fails on it). The flow then merges language segments, recomputes the
dataset's normalisation statistics and writes dataset.json, each only when it changed, so a
repeated run changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field
from tqdm import tqdm

from foresight.flows.runtime import progress_disabled
from foresight.pipelines import stats as stats_lib
from foresight.pipelines.ingest import calvin, lerobot, teleop
from foresight.pipelines.ingest.common import (
    ChunkBlock,
    FrameBlock,
    IngestError,
    LowdimBlock,
    SourceEpisode,
    SourceLayout,
    file_sha256,
    prefetch,
    source_checksum,
)
from foresight.schemas.base import StrictModel, canonical_json
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec, FrameStorage, LanguageSegment, SourceKind
from foresight.schemas import refs
from foresight.storage import lineage
from foresight.storage.episodes import EpisodePublisher, EpisodeStore

log = logging.getLogger(__name__)


FreshStats = tuple[str, dict[str, Any]]
"""(source checksum, column -> stats.EpisodeStats) of an episode written by this run."""


class EpisodeResult(StrictModel):
    """What one task did with one source episode."""

    episode_id: str
    status: Literal["written", "skipped", "quarantined"]
    frames: int = 0
    message: str | None = None
    segments: list[LanguageSegment] | None = Field(default=None, description="Segments the source defines, "
                                                   "when the episode was read (None: keep the stored ones).")
    stats: FreshStats | None = Field(default=None, exclude=True, description="Statistics of the episode as "
                                     "written, so the dataset's need not read it back.")



class IngestSummary(StrictModel):
    """The outcome of one ingest run."""

    dataset: str
    kind: SourceKind
    written: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    quarantined: list[str] = Field(default_factory=list, description="One line per bad item.")
    frames_written: int = 0
    seconds: float = 0.0

    @property
    def partial(self) -> bool:
        return bool(self.quarantined)


# Per-episode work ---------------------------------------------------------------------------------
def _quarantine(store: EpisodeStore, kind: str, err: ValueError, episode_id: str | None, strict: bool,
                file: str | None = None) -> str:
    """Record a bad item; re-raise it when strict. Returns its one-line message."""
    if not isinstance(err, IngestError):  # an error of the reading code: name the item it met
        err = IngestError(file or "?", episode_id, None, str(err))
    item = err.as_item()
    item["episode"] = item["episode"] or episode_id
    store.quarantine({"kind": kind, **item})
    log.warning("quarantined: %s", err)
    if strict:
        raise err
    return str(err)


def _write_episode(store: EpisodeStore, episode: SourceEpisode, checksum: str, features: dict[str, FeatureSpec],
                   blocks: Iterable[FrameBlock | ChunkBlock | LowdimBlock], frame_storage: dict[str, FrameStorage],
                   fps: float, publisher: EpisodePublisher | None = None
                   ) -> tuple[list[LanguageSegment], dict[str, stats_lib.EpisodeStats]]:
    """Stream one episode's blocks into the store; published only when all of it is written (by
    ``publisher``'s thread when given, while the caller goes on to the next episode). Returns the
    source's language segments and the statistics of the episode's float columns.

    Blocks are read one step ahead in a thread, so decoding overlaps the store's compression.
    """
    record = EpisodeRecord(
        episode_id=episode.episode_id, split=episode.split, task=episode.task, instructions=episode.instructions,
        length=episode.length, success=episode.success, source_path=episode.source_path,
        source_checksum=checksum, extra=episode.extra, source_bytes=_source_bytes(episode))
    segments: list[LanguageSegment] = []
    stats: dict[str, stats_lib.EpisodeStats] = {}
    with store.writer(record, features, frame_storage, fps, publisher) as writer, \
            closing(prefetch(blocks)) as stream:
        for block in stream:
            if isinstance(block, FrameBlock):
                writer.append_frames(block.camera, block.frames_THWC)
            elif isinstance(block, ChunkBlock):
                writer.append_chunks(block.camera, block.payloads, block.frames, block.frame_shape, block.extradata,
                                     block.segment_frames, block.stream_codec)
            else:
                writer.set_lowdim(block.columns, timestamps=block.timestamps_T, absent=block.absent)
                segments = block.segments
                stats = _episode_stats(features, block.columns, block.absent, episode.length)
    return segments, stats


def _episode_stats(features: dict[str, FeatureSpec], columns: dict[str, np.ndarray], absent: list[str],
                   length: int) -> dict[str, stats_lib.EpisodeStats]:
    """Statistics of an episode's float columns from the values as stored (in the feature's dtype,
    which the parquet keeps: equal to those of the table read back)."""
    if not length:
        return {}
    return {name: stats_lib.episode_stats(np.asarray(columns[name], dtype=spec.dtype).reshape(length, *spec.shape))
            for name, spec in features.items() if np.dtype(spec.dtype).kind == "f" and name not in absent}


def _source_bytes(episode: SourceEpisode) -> int:
    if episode.source_bytes is not None:
        return episode.source_bytes
    return sum(Path(path).stat().st_size for path in episode.files)


def _ingest_one(store: EpisodeStore, kind: str, episode: SourceEpisode, checksum: str, layout: SourceLayout,
                blocks: Iterable[FrameBlock | ChunkBlock | LowdimBlock], strict: bool,
                publisher: EpisodePublisher | None = None) -> EpisodeResult:
    if store.has_episode(episode.episode_id, checksum):
        return EpisodeResult(episode_id=episode.episode_id, status="skipped")
    try:
        if episode.length <= 0:
            raise IngestError(episode.source_path, episode.episode_id, "length", "the episode has no frames")
        segments, stats = _write_episode(store, episode, checksum, layout.features, blocks, layout.frame_storage,
                                         layout.fps, publisher)
    except ValueError as err:
        message = _quarantine(store, kind, err, episode.episode_id, strict, file=episode.source_path)
        return EpisodeResult(episode_id=episode.episode_id, status="quarantined", message=message)
    return EpisodeResult(episode_id=episode.episode_id, status="written", frames=episode.length, segments=segments,
                         stats=(checksum, stats))


def _storage_identity(layout: SourceLayout) -> dict[str, Any]:
    """The resolved frame storage, part of every episode checksum: a changed codec (or a changed
    default for the source) rewrites the episodes and gives the dataset a new fingerprint."""
    return {cam: storage.model_dump(mode="json") for cam, storage in sorted(layout.frame_storage.items())}


@task(name="ingest-calvin-episode", cache_policy=NO_CACHE)
def ingest_calvin_episode(root_url: str, dataset: str, src: str, desc: dict, options: calvin.CalvinOptions,
                          layout: SourceLayout, strict: bool) -> EpisodeResult:
    """One row of ep_start_end_ids: checksum its frame files, then store it unless unchanged."""
    store = EpisodeStore(root_url, dataset)
    episode = calvin.calvin_episode(src, desc)
    try:
        checksum = source_checksum(episode.files, {"cameras": options.cameras, "depth": options.depth,
                                                   "frame_storage": _storage_identity(layout)})
    except FileNotFoundError as err:
        bad = IngestError(err.filename, episode.episode_id, None, "frame file missing")
        return EpisodeResult(episode_id=episode.episode_id, status="quarantined",
                             message=_quarantine(store, "calvin", bad, episode.episode_id, strict))
    blocks = calvin.read_calvin_episode(src, desc, options, layout.extra["frame_shapes"])
    return _ingest_one(store, "calvin", episode, checksum, layout, blocks, strict)


@task(name="ingest-teleop-episode", cache_policy=NO_CACHE)
def ingest_teleop_episode(root_url: str, dataset: str, path: str, options: teleop.TeleopOptions,
                          layout: SourceLayout, strict: bool) -> EpisodeResult:
    """One episode_*.hdf5 file."""
    store = EpisodeStore(root_url, dataset)
    episode_id = teleop.episode_id_of(path)
    try:
        episode = teleop.teleop_episode(path, options)
    except IngestError as err:
        return EpisodeResult(episode_id=episode_id, status="quarantined",
                             message=_quarantine(store, "teleop", err, episode_id, strict))
    checksum = source_checksum(episode.files, {**options.model_dump(), "frame_storage": _storage_identity(layout)})
    blocks = teleop.read_teleop_episode(path, layout)
    return _ingest_one(store, "teleop", episode, checksum, layout, blocks, strict)


@task(name="ingest-lerobot-group", cache_policy=NO_CACHE)
def ingest_lerobot_group(root_url: str, dataset: str, src: str, group: list[int], options: lerobot.LeRobotOptions,
                         strict: bool, meta: lerobot.LeRobotMeta | None = None,
                         layout: SourceLayout | None = None) -> list[EpisodeResult]:
    """Episodes sharing data/video files, read in file order so each video is decoded once.

    ``meta`` and ``layout``: the folder's metadata and layout when the caller has read them (else
    read here). Each episode is synced and published in the background while the next is read.
    """
    store = EpisodeStore(root_url, dataset)
    meta = meta or lerobot.load_meta(src)
    layout = layout or lerobot.source_layout(meta, options)
    digests: dict[str, str] = {}
    checksums, results, skip = {}, [], set()
    for ep in group:
        episode = lerobot.lerobot_episode(meta, ep, options)
        checksums[ep] = _lerobot_checksum(meta, ep, episode, options, layout, digests)
        if store.has_episode(episode.episode_id, checksums[ep]):
            skip.add(ep)
            results.append(EpisodeResult(episode_id=episode.episode_id, status="skipped"))
    shares = _file_shares(meta, group, options)
    with EpisodePublisher() as publisher:
        for episode, blocks in lerobot.read_lerobot_group(meta, group, options, skip=skip):
            ep = episode.extra["episode_index"]
            episode.source_bytes = shares[ep]
            results.append(_ingest_one(store, "lerobot", episode, checksums[ep], layout, blocks, strict, publisher))
    return results


def _file_shares(meta: lerobot.LeRobotMeta, group: list[int], options: lerobot.LeRobotOptions) -> dict[int, int]:
    """Each episode's share of the bytes of the data and video files it shares, by frame count."""
    files = {ep: lerobot.episode_files(meta, ep, options) for ep in group}
    shares = dict.fromkeys(group, 0.0)
    for path in {p for paths in files.values() for p in paths}:
        sharers = [ep for ep in group if path in files[ep]]
        frames = sum(int(meta.episodes[ep]["length"]) for ep in sharers) or 1
        size = path.stat().st_size if path.exists() else 0
        for ep in sharers:
            shares[ep] += size * int(meta.episodes[ep]["length"]) / frames
    return {ep: round(share) for ep, share in shares.items()}


def _lerobot_checksum(meta: lerobot.LeRobotMeta, ep: int, episode: SourceEpisode, options: lerobot.LeRobotOptions,
                      layout: SourceLayout, digests: dict[str, str]) -> str:
    """Files (hashed once per group), the episode's metadata row and its tasks define the episode."""
    for path in episode.files:
        if path not in digests and Path(path).exists():
            digests[path] = file_sha256(path)
    present = [p for p in episode.files if p in digests]
    identity = {"options": options.model_dump(), "row": episode.extra["meta"], "tasks": meta.tasks,
                "missing": [p for p in episode.files if p not in digests], "fps": meta.fps,
                "frame_storage": _storage_identity(layout)}
    return source_checksum(present, identity, known=digests)


# Dataset-level finish -----------------------------------------------------------------------------
def _check_kind(store: EpisodeStore, kind: str) -> None:
    if store.exists() and store.info().source_kind != kind:
        raise ValueError(f"dataset '{store.dataset}' holds {store.info().source_kind} episodes; "
                         f"ingest {kind} into another --dataset")


def merge_segments(store: EpisodeStore, fresh: dict[str, list[tuple[LanguageSegment, np.ndarray | None]]]
                   ) -> tuple[list[LanguageSegment], np.ndarray | None]:
    """Stored segments, with those of every episode in ``fresh`` replaced, kept for stored episodes only.

    Embeddings are kept when every segment has one (CALVIN), else dropped with a warning.
    """
    stored_ids = set(store.episode_ids())
    old_embeddings = store.segment_embeddings()
    pairs = [(seg, None if old_embeddings is None else old_embeddings[i])
             for i, seg in enumerate(store.segments()) if seg.episode_id not in fresh]
    for episode_id in sorted(fresh):
        pairs += fresh[episode_id]
    pairs = sorted((p for p in pairs if p[0].episode_id in stored_ids),
                   key=lambda p: (p[0].episode_id, p[0].start, p[0].end, p[0].text))
    segments = [seg for seg, _ in pairs]
    with_embedding = [emb is not None for _, emb in pairs]
    if pairs and all(with_embedding):
        return segments, np.stack([emb for _, emb in pairs])
    if any(with_embedding):
        log.warning("dataset %s: some segments lack embeddings; storing none", store.dataset)
    return segments, None


def dataset_stats(store: EpisodeStore, features: dict[str, FeatureSpec],
                  records: list[EpisodeRecord] | None = None, fresh: dict[str, FreshStats] | None = None) -> dict:
    """Normalisation statistics of every float column: per episode, then aggregated (``records``:
    the stored episodes' records when the caller has them, else listed; ``fresh``: statistics of
    episodes this run wrote, used while the stored record is still theirs, else read back)."""
    per_column: dict[str, list[stats_lib.EpisodeStats]] = {
        name: [] for name, spec in features.items() if np.dtype(spec.dtype).kind == "f"}
    for record in store.records() if records is None else records:
        absent = set(record.extra.get("absent_fields", []))
        checksum, known = (fresh or {}).get(record.episode_id, (None, {}))
        if checksum == record.source_checksum and set(known) == set(per_column) - absent:
            for name in per_column:
                if name in known:
                    per_column[name].append(known[name])
            continue
        table = store.read_lowdim(record.episode_id, [c for c in per_column if c not in absent])
        for name, spec in features.items():
            if name in per_column and name not in absent and len(table):
                values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                per_column[name].append(stats_lib.episode_stats(values.reshape(len(table), *spec.shape)))
    return stats_lib.aggregate_columns({name: parts for name, parts in per_column.items() if parts})


def _finish(store: EpisodeStore, kind: SourceKind, src: str, layout: SourceLayout,
            fresh_segments: dict[str, list[tuple[LanguageSegment, np.ndarray | None]]],
            results: list[EpisodeResult] = ()) -> None:
    """Write segments, dataset.json and statistics, each only when its content changed (the
    segments, a durable write, on a thread while the statistics are computed; before dataset.json)."""
    segments, embeddings = merge_segments(store, fresh_segments)
    old_embeddings = store.segment_embeddings()
    same_embeddings = (embeddings is None and old_embeddings is None) or (
        embeddings is not None and old_embeddings is not None and np.array_equal(embeddings, old_embeddings))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-segments") as pool:
        written = pool.submit(store.write_segments, segments, embeddings) \
            if segments != store.segments() or not same_embeddings else None
        fresh_stats = {r.episode_id: r.stats for r in results if r.stats is not None}
        info, old = _dataset_info(store, kind, src, layout, fresh_stats)
        if written is not None:
            written.result()
    if old is None or old.model_dump(mode="json") != info.model_dump(mode="json"):
        store.write_info(info)


def _dataset_info(store: EpisodeStore, kind: SourceKind, src: str, layout: SourceLayout,
                  fresh_stats: dict[str, FreshStats]) -> tuple[DatasetInfo, DatasetInfo | None]:
    """The dataset.json the stored episodes make (statistics included), and the one stored now."""
    old = store.info() if store.exists() else None
    cameras = {**(old.cameras if old else {}), **layout.cameras}
    features = {**(old.features if old else {}), **layout.features}
    stored = list(store.records())
    records = {r.episode_id: r.source_checksum for r in stored}
    frame_storage = {**(old.frame_storage if old else {}), **layout.frame_storage}
    identity = {"kind": kind, "episodes": records, "frame_storage": {c: s.model_dump(mode="json")
                                                                      for c, s in sorted(frame_storage.items())}}
    fingerprint = hashlib.sha256(canonical_json(identity).encode()).hexdigest()
    info = DatasetInfo(name=store.dataset, source_kind=kind, source=str(src), source_fingerprint=fingerprint,
                       fps=layout.fps, cameras=cameras, features=features, extra=layout.extra,
                       frame_storage=frame_storage, absent_fields=_absent_fields(stored),
                       source_bytes=_dataset_source_bytes(stored, layout))
    info.stats = dataset_stats(store, features, stored, fresh_stats) if records else None
    return info, old


def _dataset_source_bytes(records: list[EpisodeRecord], layout: SourceLayout) -> int | None:
    """The stored episodes' source bytes plus the dataset's own metadata files (None: some unknown)."""
    if any(r.source_bytes is None for r in records):
        return None
    shared = sum(Path(p).stat().st_size for p in layout.shared_files if Path(p).exists())
    return sum(r.source_bytes for r in records) + shared


def _absent_fields(records: list[EpisodeRecord]) -> dict[str, list[str]]:
    """Optional field -> the stored episodes whose source lacks it."""
    absent: dict[str, list[str]] = {}
    for record in records:
        for name in record.extra.get("absent_fields", []):
            absent.setdefault(name, []).append(record.episode_id)
    return dict(sorted(absent.items()))


def _summarise(dataset: str, kind: SourceKind, results: list[EpisodeResult], problems: list[str],
               started: float) -> IngestSummary:
    summary = IngestSummary(dataset=dataset, kind=kind, quarantined=list(problems))
    for result in results:
        if result.status == "written":
            summary.written.append(result.episode_id)
            summary.frames_written += result.frames
        elif result.status == "skipped":
            summary.skipped.append(result.episode_id)
        else:
            summary.quarantined.append(result.message or result.episode_id)
    summary.seconds = time.perf_counter() - started
    return summary


def _emit(root_url: str, kind: str, src: str, dataset: str, params: dict) -> None:
    lineage.emit(root_url, f"ingest-{kind}", str(uuid.uuid4()), inputs=[refs.source(src)],
                 outputs=[refs.dataset(dataset)], facets={"params": params})


# Runs: the same body as a Prefect flow (tasks submitted to its runner) or serially -------------------
TaskMap = Callable[[Any, list[dict[str, Any]]], list[Any]]
"""Runs one task per keyword dict and returns the results in order."""


def prefect_map(task_fn: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """Submit every call to the flow's task runner; gather in order (a progress bar on a terminal)."""
    futures = [task_fn.submit(**kwargs) for kwargs in calls]
    bar = tqdm(futures, desc="episodes", unit="task", disable=progress_disabled())
    return [future.result() for future in bar]


def serial_map(task_fn: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """Call each task's function in this process, in order (no orchestrator)."""
    return [task_fn.fn(**kwargs) for kwargs in calls]


def ingest_calvin(root_url: str, dataset: str, src: str, options: calvin.CalvinOptions, strict: bool = False,
                  map_tasks: TaskMap = serial_map) -> IngestSummary:
    """Ingest the chosen splits of a CALVIN folder: one task per recorded episode."""
    started = time.perf_counter()
    store = EpisodeStore(root_url, dataset)
    _check_kind(store, "calvin")
    scan = calvin.scan_calvin(src, options)
    problems = [_quarantine(store, "calvin", err, err.episode, strict) for err in scan.problems]
    calls = [dict(root_url=root_url, dataset=dataset, src=str(src), desc=desc, options=options,
                  layout=scan.layout, strict=strict) for desc in scan.episodes]
    results = map_tasks(ingest_calvin_episode, calls)
    fresh: dict[str, list] = {r.episode_id: [] for r in results if r.status != "quarantined"}
    for segment, embedding in scan.segments:
        if segment.episode_id in fresh:
            fresh[segment.episode_id].append((segment, embedding))
    _finish(store, "calvin", src, scan.layout, fresh, results)
    _emit(root_url, "calvin", src, dataset, options.model_dump())
    return _summarise(dataset, "calvin", results, problems, started)


def ingest_teleop(root_url: str, dataset: str, src: str, options: teleop.TeleopOptions, strict: bool = False,
                  map_tasks: TaskMap = serial_map) -> IngestSummary:
    """Ingest every episode_*.hdf5 of a folder: one task per file."""
    started = time.perf_counter()
    store = EpisodeStore(root_url, dataset)
    _check_kind(store, "teleop")
    files = teleop.list_episode_files(src)
    layout, _unreadable = teleop.probe_layout(files, options)  # each unreadable file is quarantined by its task
    calls = [dict(root_url=root_url, dataset=dataset, path=str(path), options=options, layout=layout,
                  strict=strict) for path in files]
    results = map_tasks(ingest_teleop_episode, calls)
    _finish(store, "teleop", src, layout, {}, results)
    _emit(root_url, "teleop", src, dataset, options.model_dump())
    return _summarise(dataset, "teleop", results, [], started)


def ingest_lerobot(root_url: str, dataset: str, src: str, options: lerobot.LeRobotOptions, strict: bool = False,
                   map_tasks: TaskMap = serial_map) -> IngestSummary:
    """Ingest a LeRobot v3.0/v2.x folder: one task per group of episodes sharing files."""
    started = time.perf_counter()
    meta = lerobot.load_meta(src)  # a LeRobotUsageError (not a dataset, or unsupported) before anything is written
    store = EpisodeStore(root_url, dataset)
    _check_kind(store, "lerobot")
    layout = lerobot.source_layout(meta, options)
    calls = [dict(root_url=root_url, dataset=dataset, src=str(src), group=group, options=options, strict=strict,
                  meta=meta, layout=layout) for group in lerobot.episode_groups(meta, options)]
    results = [r for group_results in map_tasks(ingest_lerobot_group, calls) for r in group_results]
    fresh = {r.episode_id: [(s, None) for s in r.segments] for r in results if r.segments is not None}
    _finish(store, "lerobot", src, layout, fresh, results)
    _emit(root_url, "lerobot", src, dataset, options.model_dump())
    return _summarise(dataset, "lerobot", results, [], started)


# Prefect flows ---------------------------------------------------------------------------------------
@flow(name="ingest-calvin", log_prints=False)
def ingest_calvin_flow(root_url: str, dataset: str, src: str, options: calvin.CalvinOptions,
                       strict: bool = False) -> IngestSummary:
    """CALVIN ingest with every episode a task of this flow's runner."""
    return ingest_calvin(root_url, dataset, src, options, strict, map_tasks=prefect_map)


@flow(name="ingest-teleop", log_prints=False)
def ingest_teleop_flow(root_url: str, dataset: str, src: str, options: teleop.TeleopOptions,
                       strict: bool = False) -> IngestSummary:
    """Teleop HDF5 ingest with every file a task of this flow's runner."""
    return ingest_teleop(root_url, dataset, src, options, strict, map_tasks=prefect_map)


@flow(name="ingest-lerobot", log_prints=False)
def ingest_lerobot_flow(root_url: str, dataset: str, src: str, options: lerobot.LeRobotOptions,
                        strict: bool = False) -> IngestSummary:
    """LeRobot ingest with every group of file-sharing episodes a task of this flow's runner."""
    return ingest_lerobot(root_url, dataset, src, options, strict, map_tasks=prefect_map)
