"""The teachers stage's shard loop, without Prefect (flows/teachers.py wraps it in tasks).

Reader threads (or worker processes, see flows/teachers_io.py) read and pin the next batches,
the teacher resizes/normalises uint8 frames on its own device, outputs are copied to pinned host
buffers on a side CUDA stream, and writer threads (or processes) compress and store finished
shards, so the forward pass rarely waits for I/O. A shard is published by its ``_done`` marker
only once fully written, so a killed run resumes cleanly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field

from pipelines.teachers import OUTPUT_DTYPE, Teacher
from schemas.base import StrictModel
from schemas.target import ArraySpec, TargetRecipe
from flows.teachers_io import ObservedFrames
from storage.claims import ShardClaim
from storage.targets import TargetReader, TargetWriter

log = logging.getLogger(__name__)

STAGE = "teachers"
STAGE_VERSION = 1


class ShardsResult(StrictModel):
    """What one task wrote."""

    shards: list[int] = Field(description="Shards the task was given.")
    shards_written: list[int] = Field(default_factory=list, description="Shards it computed and stored.")
    clips: int = 0
    frames: int = Field(default=0, description="Generated frames encoded (T per clip).")
    seconds: float = 0.0
    wait_read_s: float = Field(default=0.0, description="Time the forward loop waited for input.")
    wait_write_s: float = Field(default=0.0, description="Time the forward loop waited for free output buffers.")
    startup_s: float = Field(default=0.0, description="Time until the first batch was ready (pools, first read).")


# ---------------------------------------------------------------- version layout
def teacher_recipe(teacher: Teacher, video_id: str) -> TargetRecipe:
    """Recipe of the teacher version: the video version, the teacher identity and its settings."""
    return TargetRecipe(kind="teacher", stage=f"{STAGE}.{teacher.family}", stage_version=STAGE_VERSION,
                        model=teacher.identity, params=teacher.params(), inputs={"video": video_id})


def teacher_arrays(num_clips: int, num_frames: int, teacher: Teacher) -> list[ArraySpec]:
    h, w = teacher.grid
    dtype = str(OUTPUT_DTYPE).removeprefix("torch.")
    return [ArraySpec(name="target", shape=[num_clips, num_frames, h, w, teacher.channels], dtype=dtype),
            ArraySpec(name="reference", shape=[num_clips, 1, h, w, teacher.channels], dtype=dtype)]


# ---------------------------------------------------------------- the pipelined shard loop
@dataclass
class InputBatch:
    """Consecutive clips of one shard, as uint8 host tensors (pinned when the teacher is on CUDA)."""

    shard: int
    clips: range
    frames_BTHWC: torch.Tensor
    observed_BHWC: torch.Tensor
    claim: Any = None


def batch_plan(writer: TargetWriter, shards: list[int], batch: int) -> list[tuple[int, range]]:
    """(shard, clips) of every forward batch; a batch never spans two shards."""
    plan = []
    for shard in shards:
        clips = writer.shard_clips(shard)
        plan += [(shard, range(s, min(s + batch, clips.stop))) for s in range(clips.start, clips.stop, batch)]
    return plan


def load_batch(video: TargetReader, observed: ObservedFrames, shard: int, clips: range, pin: bool,
               claim: Any = None) -> InputBatch:
    """Read (and pin) the frames and observed frames of one batch."""
    frames = torch.from_numpy(np.ascontiguousarray(video.read("frames", slice(clips.start, clips.stop))))
    obs = torch.from_numpy(np.ascontiguousarray(observed.read(clips)))
    if pin:
        frames, obs = frames.pin_memory(), obs.pin_memory()
    return InputBatch(shard, clips, frames, obs, claim)


class ReadAhead:
    """Yields the planned batches in order while reader threads load the next ``depth`` of them.

    With ``claim``, a shard is read only when ``claim(shard)`` returns a claim (None: another
    builder holds it, or it is done); the claim travels with the shard's batches.
    """

    def __init__(self, load: Callable[[int, range, Any], InputBatch], plan: list[tuple[int, range]],
                 readers: int, depth: int, claim: Callable[[int], Any] | None = None):
        self.load, self.plan, self.readers, self.depth, self.claim = load, plan, readers, depth, claim
        self.waited_s = 0.0

    def _owned(self) -> Iterator[tuple[int, range, Any]]:
        owned: dict[int, Any] = {}
        for shard, clips in self.plan:
            if self.claim is not None and shard not in owned:
                owned[shard] = self.claim(shard)
            if self.claim is None or owned[shard] is not None:
                yield shard, clips, owned.get(shard)

    def __iter__(self) -> Iterator[InputBatch]:
        window: deque[Future] = deque()
        with ThreadPoolExecutor(self.readers, thread_name_prefix="teacher-read") as pool:
            try:
                for shard, clips, claim in self._owned():
                    window.append(pool.submit(self.load, shard, clips, claim))
                    if len(window) >= self.depth:
                        yield self._next(window)
                while window:
                    yield self._next(window)
            finally:
                for future in window:
                    future.cancel()

    def _next(self, window: deque[Future]) -> InputBatch:
        start = time.perf_counter()
        item = window.popleft().result()
        self.waited_s += time.perf_counter() - start
        return item


class ShardClaims:
    """Claims this task holds, so every one is released: after its shard is stored, or on error."""

    def __init__(self, root_url: str, writer: TargetWriter):
        self.root_url, self.writer = root_url, writer
        self._held: dict[int, ShardClaim] = {}
        self._lock = threading.Lock()

    def __call__(self, shard: int) -> ShardClaim | None:
        """Claim ``shard``; None when it is done or a live builder holds it."""
        if self.writer.is_done(shard):
            return None
        claim = ShardClaim(self.root_url, self.writer.version_id, shard)
        if not claim.acquire():
            log.info("%s shard %d: held by another builder, skipped", self.writer.version_id, shard)
            return None
        if self.writer.is_done(shard):  # finished by its previous holder in between
            claim.release()
            return None
        with self._lock:
            self._held[shard] = claim
        return claim

    def release(self, shard: int) -> None:
        with self._lock:
            claim = self._held.pop(shard, None)
        if claim is not None:
            claim.release()

    def release_all(self) -> None:
        for shard in list(self._held):
            self.release(shard)


class ShardBuffers:
    """A fixed pool of whole-shard host buffers, reused once a shard is stored (bounds memory and
    avoids re-pinning); taking one blocks while every buffer waits to be written."""

    def __init__(self, shard_size: int, target_shape: tuple[int, ...], reference_shape: tuple[int, ...],
                 pin: bool, count: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put((torch.empty((shard_size, *target_shape), dtype=OUTPUT_DTYPE, pin_memory=pin),
                            torch.empty((shard_size, *reference_shape), dtype=OUTPUT_DTYPE, pin_memory=pin)))

    def take(self) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        start = time.perf_counter()
        buffers = self._free.get()
        return buffers, time.perf_counter() - start

    def give(self, buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._free.put(buffers)


class DeviceToHost:
    """Copies device outputs into host buffers; on CUDA on a side stream, so the next forward
    pass is queued without waiting for the copy (the returned event marks its completion)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> torch.cuda.Event | None:
        if self.stream is None:
            dst.copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


@dataclass
class OpenShard:
    """A shard whose batches are being computed into host buffers."""

    index: int
    clips: range
    buffers: tuple[torch.Tensor, torch.Tensor]
    filled: int = 0
    events: list[Any] = field(default_factory=list)
    claim: Any = None


def store_shard(io: "ThreadIO | ProcessIO", shard: OpenShard, pool: ShardBuffers,
                claims: ShardClaims | None = None) -> None:
    """Wait for the shard's device copies, store it (data, then its _done marker), recycle the
    host buffers as soon as their contents are handed over, release the shard's claim."""
    for event in shard.events:
        if event is not None:
            event.synchronize()
    target, reference = shard.buffers
    io.store(shard.index, len(shard.clips), target, reference, handed_over=lambda: pool.give(shard.buffers))
    if claims is not None:
        claims.release(shard.index)


class ThreadIO:
    """Store reads and writes in threads of this process (small runs, tests, Dask workers)."""

    def __init__(self, video: TargetReader, observed: ObservedFrames, writer: TargetWriter, pin: bool):
        self.video, self.observed, self.writer, self.pin = video, observed, writer, pin

    def load(self, shard: int, clips: range, claim: Any) -> InputBatch:
        return load_batch(self.video, self.observed, shard, clips, self.pin, claim)

    def store(self, shard: int, clips: int, target: torch.Tensor, reference: torch.Tensor,
              handed_over: Callable[[], None]) -> None:
        self.writer.write_shard(shard, {"target": target[:clips].numpy(), "reference": reference[:clips].numpy()})
        handed_over()

    def close(self) -> None:
        """Nothing to release: the threads belong to the caller's executors."""
        self.video = self.observed = self.writer = None


class ProcessIO:
    """Store reads and writes in worker processes (own zarr event loop and GIL each), exchanging
    batches and shards through shared memory; this process only copies blocks in and out."""

    def __init__(self, video: TargetReader, writer: TargetWriter, batch: int, out_shapes: dict[str, tuple[int, ...]],
                 readers: int, writers: int, pin: bool):
        import multiprocessing

        from flows import teachers_io

        self.pin = pin
        frames = tuple(video.manifest.array_spec("frames").shape[1:])
        self.in_blocks = teachers_io.SharedBlocks.create([teachers_io.BlockSpec("frames", (batch, *frames), "uint8")],
                                                         count=2 * readers + 1)
        try:
            self.out_blocks = teachers_io.SharedBlocks.create(
                [teachers_io.BlockSpec(name, shape, "float16") for name, shape in out_shapes.items()], count=writers)
        except BaseException:
            self.in_blocks.close()
            raise
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["flows.teachers_io"])
        root_url = writer.root.url
        self.read_pool = ProcessPoolExecutor(readers, mp_context=context, initializer=teachers_io.init_reader,
                                             initargs=(root_url, video.version_id, self.in_blocks.describe()))
        self.write_pool = ProcessPoolExecutor(writers, mp_context=context, initializer=teachers_io.init_writer,
                                              initargs=(root_url, writer.version_id, self.out_blocks.describe()))
        self.free_in, self.free_out = queue.Queue(), queue.Queue()
        for block in range(len(self.in_blocks)):
            self.free_in.put(block)
        for block in range(len(self.out_blocks)):
            self.free_out.put(block)

    def load(self, shard: int, clips: range, claim: Any) -> InputBatch:
        from flows import teachers_io

        block = self.free_in.get()
        try:
            observed = self.read_pool.submit(teachers_io.read_batch_job, block, clips.start, clips.stop).result()
            view = torch.from_numpy(self.in_blocks.views[block]["frames"][:len(clips)])
            frames = torch.empty(view.shape, dtype=view.dtype, pin_memory=self.pin)
            frames.copy_(view)
        finally:
            self.free_in.put(block)
        obs = torch.from_numpy(observed)
        return InputBatch(shard, clips, frames, obs.pin_memory() if self.pin else obs, claim)

    def store(self, shard: int, clips: int, target: torch.Tensor, reference: torch.Tensor,
              handed_over: Callable[[], None]) -> None:
        from flows import teachers_io

        block = self.free_out.get()
        try:
            views = self.out_blocks.views[block]
            torch.from_numpy(views["target"][:clips]).copy_(target[:clips])
            torch.from_numpy(views["reference"][:clips]).copy_(reference[:clips])
            handed_over()
            self.write_pool.submit(teachers_io.write_shard_job, block, shard, clips).result()
        finally:
            self.free_out.put(block)

    def close(self) -> None:
        """Stop the workers (after their current job), then free the shared memory."""
        self.read_pool.shutdown(wait=True, cancel_futures=True)
        self.write_pool.shutdown(wait=True, cancel_futures=True)
        self.in_blocks.close()
        self.out_blocks.close()


def open_io(video: TargetReader, observed: ObservedFrames, writer: TargetWriter, batch: int,
            out_shapes: dict[str, tuple[int, ...]], readers: int, writers: int, pin: bool,
            processes: bool) -> "ThreadIO | ProcessIO":
    """Process I/O when asked for and possible (not inside a daemonic worker, enough shared
    memory), else thread I/O; the fallback is logged, never silent."""
    import multiprocessing

    if processes and multiprocessing.current_process().daemon:
        log.warning("teachers: running inside a daemonic worker process: store I/O uses threads")
    elif processes:
        try:
            return ProcessIO(video, writer, batch, out_shapes, readers, writers, pin)
        except (MemoryError, OSError) as err:
            log.warning("teachers: no shared memory for process I/O (%s): store I/O uses threads", err)
    return ThreadIO(video, observed, writer, pin)


def _raise_write_errors(futures: list[Future]) -> None:
    for future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()


class ShardLoop:
    """The forward side of :func:`encode_shards`: fills shard buffers batch by batch and hands
    every full shard to the writer threads."""

    def __init__(self, teacher: Teacher, writer: TargetWriter, io: ThreadIO | ProcessIO, pool: ShardBuffers,
                 executor: ThreadPoolExecutor, claims: ShardClaims | None, result: ShardsResult):
        self.teacher, self.writer, self.io, self.pool, self.executor = teacher, writer, io, pool, executor
        self.claims, self.result = claims, result
        self.copier = DeviceToHost(teacher.device)
        self.current: OpenShard | None = None
        self.futures: list[Future] = []

    def _open(self, item: InputBatch) -> OpenShard:
        if self.current is None:
            buffers, waited = self.pool.take()
            self.result.wait_write_s += waited
            self.current = OpenShard(item.shard, self.writer.shard_clips(item.shard), buffers, claim=item.claim)
        return self.current

    def step(self, item: InputBatch) -> None:
        """Forward one batch, queue its copy into the shard buffers, submit the shard when full."""
        shard = self._open(item)
        target, reference = self.teacher.encode_clips(item.frames_BTHWC, item.observed_BHWC)
        rows = slice(item.clips.start - shard.clips.start, item.clips.stop - shard.clips.start)
        shard.events += [self.copier.copy(target, shard.buffers[0][rows]),
                         self.copier.copy(reference, shard.buffers[1][rows])]
        shard.filled += len(item.clips)
        if shard.filled == len(shard.clips):
            self.futures.append(self.executor.submit(store_shard, self.io, shard, self.pool, self.claims))
            self.result.shards_written.append(shard.index)
            self.current = None
        _raise_write_errors(self.futures)
        self.result.clips += len(item.clips)

    def drain(self) -> None:
        for future in self.futures:
            future.result()


def encode_shards(teacher: Teacher, video: TargetReader, observed: ObservedFrames, writer: TargetWriter,
                  shards: list[int], batch: int, writers: int = 2, readers: int = 2,
                  claims: ShardClaims | None = None, progress: Callable[[int], None] | None = None,
                  io_processes: bool = False) -> ShardsResult:
    """Encode and store whole shards: read ahead, forward, copy back and write, overlapped.

    ``readers``/``writers`` are threads, or with ``io_processes`` worker processes (each driven by
    one thread of this process). With ``claims``, shards held by another builder are skipped and
    every claim is released, also on error (a shard not stored has no ``_done`` marker: a rerun
    redoes it).
    """
    start = time.perf_counter()
    T = video.manifest.array_spec("frames").shape[1]
    shape = (*teacher.grid, teacher.channels)
    cuda = teacher.device.type == "cuda"
    shard_size = min(writer.manifest.shard_size, writer.manifest.num_clips)
    pool = ShardBuffers(shard_size, (T, *shape), (1, *shape), pin=cuda, count=writers + 1)
    io = open_io(video, observed, writer, batch, {"target": (shard_size, T, *shape), "reference": (shard_size, 1, *shape)},
                 readers, writers, cuda, io_processes)
    result = ShardsResult(shards=list(shards))
    read = ReadAhead(io.load, batch_plan(writer, shards, batch), readers=readers, depth=2 * readers + 1, claim=claims)
    try:
        with ThreadPoolExecutor(writers, thread_name_prefix="teacher-write") as executor:
            loop = ShardLoop(teacher, writer, io, pool, executor, claims, result)
            for item in read:
                if not result.startup_s:
                    result.startup_s = time.perf_counter() - start
                loop.step(item)
                if progress is not None:
                    progress(len(item.clips))
            loop.drain()
    finally:
        io.close()
        if claims is not None:
            claims.release_all()
    result.frames, result.wait_read_s = result.clips * T, read.waited_s
    result.seconds = time.perf_counter() - start
    return result
