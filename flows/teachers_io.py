"""Store I/O of the teachers stage, free of torch so worker processes start fast.

- :func:`open_video` and :class:`ObservedFrames`: the inputs (generated frames, observed frame).
- :class:`SharedBlocks`: named shared-memory arrays that the main process and I/O worker
  processes exchange batches and shards through (no pickling of large arrays).
- worker jobs (:func:`init_reader`, :func:`read_batch_job`, :func:`init_writer`,
  :func:`write_shard_job`): each worker process has its own zarr event loop and its own GIL, so
  decompression, compression and store writes scale with cores instead of saturating one thread.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from foresight.storage.targets import TargetReader, TargetStore

log = logging.getLogger(__name__)

OBSERVED_ARRAY = "observed"
SHM_DIR = "/dev/shm"


def open_video(root_url: str, video_id: str) -> TargetReader:
    """The complete video version ``video_id``; ValueError naming what is wrong otherwise."""
    store = TargetStore(root_url)
    status = store.status(video_id)
    if status is None:
        raise ValueError(f"video version '{video_id}': not found under {store.root.url}")
    reader = store.open(video_id)
    if reader.manifest.kind != "video":
        raise ValueError(f"version '{video_id}' is a '{reader.manifest.kind}' version, expected 'video'")
    if status != "complete":
        raise ValueError(f"video version '{video_id}' is still '{status}'; finish it before running teachers")
    spec = reader.manifest.array_spec("frames")
    if len(spec.shape) != 5 or spec.shape[-1] != 3 or spec.dtype != "uint8":
        raise ValueError(f"video version '{video_id}': array 'frames' is {spec.dtype} {spec.shape}, "
                         "expected uint8 (N, T, H, W, 3)")
    return reader


class ObservedFrames:
    """The observed (conditioning) frame of every clip: the video version's ``observed`` array when
    it has one, else frame ``start`` of the clip's episode camera, found through the plan rows."""

    def __init__(self, root_url: str, video: TargetReader):
        self.video = video
        self.rows = None
        if OBSERVED_ARRAY in [a.name for a in video.manifest.arrays]:
            return
        plan_id = video.manifest.recipe.input_ids().get("plan")
        if plan_id is None:
            raise ValueError(f"video version '{video.version_id}': no '{OBSERVED_ARRAY}' array and no "
                             "'plan' input, so the observed frames cannot be found")
        from foresight.storage.plans import PlanStore  # pyarrow only when the plan is needed

        self.rows = PlanStore(root_url).rows(plan_id)
        if len(self.rows) != video.manifest.num_clips:
            raise ValueError(f"video version '{video.version_id}': {video.manifest.num_clips} clips but plan "
                             f"'{plan_id}' has {len(self.rows)} rows")
        self.episodes: dict[str, Any] = {}
        self.root_url = root_url

    def read(self, clips: range) -> np.ndarray:
        """uint8 (B, H, W, 3) observed frames of clips ``clips``."""
        if self.rows is None:
            data = self.video.read(OBSERVED_ARRAY, slice(clips.start, clips.stop))
            return data[:, 0] if data.ndim == 5 else data
        from foresight.storage.episodes import read_start_frames

        frames = read_start_frames(self.root_url, [self.rows[index] for index in clips], self.episodes)
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"video version '{self.video.version_id}', clips {clips.start}..{clips.stop - 1}: "
                             f"observed frames differ in size {sorted({f.shape for f in frames})}")
        return np.stack(frames)


# ---------------------------------------------------------------- shared-memory blocks
@dataclass(frozen=True)
class BlockSpec:
    """One array held by every block: name, shape and numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def shm_free_bytes() -> int:
    """Free bytes of the shared-memory file system (0 when there is none)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


class SharedBlocks:
    """``count`` blocks, each holding one array per :class:`BlockSpec`, in shared memory.

    The creating process owns (and finally unlinks) the segments; worker processes attach to
    them by name with :meth:`attach`.
    """

    def __init__(self, specs: list[BlockSpec], segments: list[list[shared_memory.SharedMemory]], owner: bool):
        self.specs, self.segments, self.owner = specs, segments, owner
        self.views = [{spec.name: np.ndarray(spec.shape, dtype=spec.dtype, buffer=segment.buf)
                       for spec, segment in zip(specs, block)} for block in segments]

    @classmethod
    def create(cls, specs: list[BlockSpec], count: int) -> "SharedBlocks":
        need = count * sum(spec.nbytes for spec in specs)
        if need > shm_free_bytes():
            raise MemoryError(f"shared memory: {need / 1e9:.2f} GB needed, {shm_free_bytes() / 1e9:.2f} GB free "
                              f"in {SHM_DIR}")
        segments = [[shared_memory.SharedMemory(create=True, size=max(spec.nbytes, 1)) for spec in specs]
                    for _ in range(count)]
        return cls(specs, segments, owner=True)

    def describe(self) -> tuple[list[BlockSpec], list[list[str]]]:
        """What a worker needs to attach: the specs and the segment names."""
        return self.specs, [[segment.name for segment in block] for block in self.segments]

    @classmethod
    def attach(cls, description: tuple[list[BlockSpec], list[list[str]]]) -> "SharedBlocks":
        specs, names = description
        # Workers are forked from a forkserver and share the creator's resource tracker, which
        # keeps one entry per name: attaching re-registers harmlessly, the creator's unlink clears it.
        segments = [[shared_memory.SharedMemory(name=name) for name in block] for block in names]
        return cls(specs, segments, owner=False)

    def __len__(self) -> int:
        return len(self.segments)

    def close(self) -> None:
        """Drop the views, close the mappings and (creator only) remove the segments."""
        self.views = []
        for block in self.segments:
            for segment in block:
                try:
                    segment.close()
                except BufferError:  # arrays still viewing it (an error's traceback): unmapped when freed
                    log.debug("shared memory %s: still viewed, left mapped", segment.name)
                if self.owner:
                    segment.unlink()
        self.segments = []


# ---------------------------------------------------------------- worker-process jobs
_WORKER: dict[str, Any] = {}


WORKER_NICENESS = 5
"""I/O workers yield the CPU to the process that feeds the GPU (its kernel launches are the
critical path once reads and writes keep up)."""


def _lower_priority() -> None:
    try:
        os.nice(WORKER_NICENESS)
    except OSError as err:  # not permitted in some sandboxes: run at normal priority
        log.debug("teachers I/O worker: cannot lower priority: %s", err)


def worker_ready() -> int:
    """A no-op job: submitting one per worker starts every worker of a pool at once."""
    return os.getpid()


def init_reader(root_url: str, video_id: str, blocks: tuple[list[BlockSpec], list[list[str]]]) -> None:
    """Reader process setup: open the video version and attach the input blocks."""
    _lower_priority()
    video = open_video(root_url, video_id)
    _WORKER.update(video=video, observed=ObservedFrames(root_url, video), in_blocks=SharedBlocks.attach(blocks))


def read_batch_job(block: int, start: int, stop: int) -> np.ndarray:
    """Read clips [start, stop) into input block ``block``; returns their observed frames."""
    frames = _WORKER["in_blocks"].views[block]["frames"]
    frames[:stop - start] = _WORKER["video"].read("frames", slice(start, stop))
    return _WORKER["observed"].read(range(start, stop))


def init_writer(root_url: str, version_id: str, blocks: tuple[list[BlockSpec], list[list[str]]]) -> None:
    """Writer process setup: reopen the building teacher version and attach the output blocks."""
    _lower_priority()
    _WORKER.update(writer=TargetStore(root_url).writer(version_id), out_blocks=SharedBlocks.attach(blocks))


def write_shard_job(block: int, shard: int, clips: int) -> dict[str, str]:
    """Write shard ``shard`` from output block ``block`` (its first ``clips`` rows)."""
    views = _WORKER["out_blocks"].views[block]
    return _WORKER["writer"].write_shard(shard, {name: view[:clips] for name, view in views.items()}, encoded=True)
