"""The teachers stage's shard loop, without Prefect (flows/teachers.py plugs it into flows/build.py).

Reader threads (or worker processes, see flows/teachers_io.py) read and pin the next batches; the
forward loop uploads each batch on a side CUDA stream, resizes/normalises uint8 frames and runs the
teacher on the compute stream, and queues the copy of the outputs into host shard buffers on a
second side stream; writer threads (or processes) wait for a full shard's copies and store it. The
thread that launches GPU work thus never waits for a copy or a write, only for free buffers. With
worker processes the shard buffers are the shared-memory blocks the writers read, page-locked for
the GPU, so outputs go from the device to the writers without a host copy. A shard is published by
its ``_done`` marker only once fully written, so a killed run resumes cleanly.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field

from foresight.pipelines.teachers import OUTPUT_DTYPE, Teacher
from foresight.pipelines.teachers.graphs import GraphedBatches
from foresight.schemas.base import StrictModel
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.flows.teachers_io import ObservedFrames
from foresight.storage.claims import ClaimSet
from foresight.storage.targets import TargetReader, TargetWriter, encode_part_tensors, stored_parts

log = logging.getLogger(__name__)

STAGE = "teachers"
STAGE_VERSION = 1
STORE_CODECS = {"f16": "raw", "bf16": "bf16", "fp8": "fp8"}
"""TeachersConfig.store_codec -> ArraySpec.codec of the stored target and reference arrays."""
DEFAULT_STORE_CODEC = "f16"
CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


class EngineStats(StrictModel):
    """What one run of the shard loop wrote, and where its time went."""

    shards: list[int] = Field(description="Shards the task was given.")
    shards_written: list[int] = Field(default_factory=list, description="Shards it computed and stored.")
    clips: int = 0
    frames: int = Field(default=0, description="Generated frames encoded (T per clip).")
    seconds: float = 0.0
    wait_read_s: float = Field(default=0.0, description="Time the forward loop waited for input.")
    wait_write_s: float = Field(default=0.0, description="Time the forward loop waited for free output buffers.")
    startup_s: float = Field(default=0.0, description="Time until the first batch was ready (pools, first read).")
    tail_s: float = Field(default=0.0, description="Time from the last batch queued to the end of the run (the "
                                                   "last shards stored, then the I/O shut down: close_s).")
    open_s: float = Field(default=0.0, description="Time opening the store I/O (shared memory, worker pools "
                                                   "started); part of startup_s.")
    close_s: float = Field(default=0.0, description="Time shutting the store I/O down once every shard was stored "
                                                    "(worker pools joined, output buffers unpinned, shared memory "
                                                    "freed); part of tail_s.")
    first_read_s: float = Field(default=0.0, description="I/O in worker processes: the first batch's read in a "
                                                          "reader process (part of startup_s).")
    first_pin_s: float = Field(default=0.0, description="I/O in worker processes: the first batch's copy into "
                                                         "page-locked memory (part of startup_s).")
    host_busy_s: float = Field(default=0.0, description="Time the forward loop spent queueing work (uploads, "
                                                         "forward, copies), waits for buffers excluded.")
    gpu_busy_s: float = Field(default=0.0, description="CUDA: time the compute stream spent on the batches.")
    gpu_idle_s: float = Field(default=0.0, description="CUDA: time the compute stream sat idle between batches "
                                                        "(waiting for the host or an upload).")
    graph_replays: int = Field(default=0, description="CUDA: batches replayed from CUDA graphs (the rest ran "
                                                      "eagerly: the first of each shape, and every batch when off).")
    graphs_failed: str | None = Field(default=None, description="CUDA: why capturing CUDA graphs was given up.")


# ---------------------------------------------------------------- version layout
def teacher_recipe(teacher: Teacher, video_id: str, preset: str | None = None,
                   store_codec: str = DEFAULT_STORE_CODEC) -> TargetRecipe:
    """Recipe of the teacher version: the video version, the teacher identity, its settings, the
    preset they were resolved from and the store codec (each recorded only when not the default,
    so float16 versions keep their ids; a coded version's readers get other values: its own id)."""
    params = {**teacher.params(), "preset": preset} if preset is not None else teacher.params()
    if check_store_codec(store_codec) != DEFAULT_STORE_CODEC:
        params = {**params, "store_codec": store_codec}
    return TargetRecipe(kind="teacher", stage=f"{STAGE}.{teacher.family}", stage_version=STAGE_VERSION,
                        model=teacher.identity, params=params, inputs={"video": video_id})


def check_store_codec(store_codec: str) -> str:
    if store_codec not in STORE_CODECS:
        raise ValueError(f"teachers store codec '{store_codec}': expected one of {sorted(STORE_CODECS)}")
    return store_codec


def teacher_arrays(num_clips: int, num_frames: int, teacher: Teacher, compression: str = "zstd",
                   store_codec: str = DEFAULT_STORE_CODEC) -> list[ArraySpec]:
    """The teacher version's arrays: ``target`` (N, T, h, w, C) and ``reference`` (N, 1, h, w, C),
    float16 as read, stored in ``store_codec`` (storage/targets.py decodes)."""
    h, w = teacher.grid
    dtype = str(OUTPUT_DTYPE).removeprefix("torch.")
    codec = STORE_CODECS[check_store_codec(store_codec)]
    return [ArraySpec(name=name, shape=[num_clips, frames, h, w, teacher.channels], dtype=dtype,
                      compression=compression, codec=codec)
            for name, frames in (("target", num_frames), ("reference", 1))]


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


# ---------------------------------------------------------------- CUDA streams and events
def sleeping_event(timing: bool = False) -> torch.cuda.Event:
    """A CUDA event whose ``synchronize()`` sleeps instead of spinning: with spinning events every
    writer thread waiting for a shard's copies burnt a core that the I/O workers and the thread
    launching GPU work need."""
    return torch.cuda.Event(enable_timing=timing, blocking=True)


@dataclass
class DeviceBatch:
    """An input batch on the teacher's device; ``ready`` marks the end of its upload (None: the
    teacher runs on the CPU and the tensors are the host ones)."""

    item: InputBatch
    frames_BTHWC: torch.Tensor
    observed_BHWC: torch.Tensor
    ready: torch.cuda.Event | None = None


class HostToDevice:
    """Uploads pinned uint8 batches on a side CUDA stream, so the copy of a batch runs on a copy
    engine while the GPU still computes the batches queued before it, instead of holding up the
    compute stream (50 MB a batch of 256 frames)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def send(self, item: InputBatch) -> DeviceBatch:
        """Queue the upload of ``item`` (its pinned host blocks are kept by torch's host allocator
        until the copy is done)."""
        if self.stream is None:
            return DeviceBatch(item, item.frames_BTHWC, item.observed_BHWC)
        with torch.cuda.stream(self.stream):
            frames = item.frames_BTHWC.to(self.device, non_blocking=True)
            observed = item.observed_BHWC.to(self.device, non_blocking=True)
        ready = sleeping_event()
        ready.record(self.stream)
        return DeviceBatch(item, frames, observed, ready)

    def hand_over(self, batch: DeviceBatch) -> None:
        """Order the compute stream after the batch's upload, and tell the caching allocator that
        the uploaded tensors are used there (their memory is not reused before that work ends)."""
        if batch.ready is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(batch.ready)
        batch.frames_BTHWC.record_stream(compute)
        batch.observed_BHWC.record_stream(compute)


class DeviceToHost:
    """Copies device outputs into host buffers; on CUDA on a side stream, so the next forward
    pass is queued without waiting for the copy (the returned event marks its completion)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event | None:
        """Queue ``host.copy_(device)`` for every (device, host) pair after the work queued so far
        on the compute stream; None when already copied (CPU)."""
        if self.stream is None:
            for src, dst in pairs:
                dst.copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.stream)
        done = sleeping_event()
        done.record(self.stream)
        return done


class GpuTimeline:
    """Timing events on the compute stream around every batch, read once the run is over: how long
    the GPU spent on the batches (upload wait excluded: preprocessing, forward, casts) and how long
    it sat idle between them, waiting for the host to queue work or for an upload."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Mark the work queued inside the block as one batch (nothing on the CPU)."""
        if not self.enabled:
            yield
            return
        begin, end = sleeping_event(timing=True), sleeping_event(timing=True)
        begin.record()
        yield
        end.record()
        self.marks.append((begin, end))

    def totals(self) -> tuple[float, float]:
        """(busy, idle) seconds over the batches marked so far; waits for the last one to end."""
        if not self.marks:
            return 0.0, 0.0
        self.marks[-1][1].synchronize()
        busy_ms = sum(begin.elapsed_time(end) for begin, end in self.marks)
        idle_ms = sum(prev_end.elapsed_time(begin) for (_, prev_end), (begin, _) in zip(self.marks, self.marks[1:]))
        return busy_ms / 1e3, idle_ms / 1e3


# ---------------------------------------------------------------- host shard buffers
@dataclass
class ShardBuffer:
    """Host arrays that one shard's outputs are copied into; ``block`` is the shared-memory block
    they live in (process I/O), -1 for private memory."""

    arrays: dict[str, torch.Tensor]  # stored part (storage.targets.stored_parts) -> (shard, ...) host tensor
    block: int = -1
    dtypes: dict[str, str] = field(default_factory=dict)  # part -> stored numpy dtype

    def host(self, name: str, clips: int) -> np.ndarray:
        """The first ``clips`` rows of part ``name`` as numpy, in the part's stored dtype."""
        rows = self.arrays[name][:clips].numpy()
        return rows.view(np.dtype(self.dtypes[name])) if name in self.dtypes else rows


ShardParts = dict[str, tuple[tuple[int, ...], str]]
"""Host shard buffer layout: stored part -> ((shard clips, ...), numpy dtype)."""


def shard_parts(writer: TargetWriter, shard_size: int) -> ShardParts:
    """The stored parts of the version's arrays (codes and scales for a coded one), shard-sized."""
    return {part.name: ((shard_size, *part.shape[1:]), part.dtype)
            for spec in writer.manifest.arrays for part in stored_parts(spec)}


def compiled_codec(writer: TargetWriter, device: torch.device, batch: int, backend: str = "inductor") -> str | None:
    """The torch.compile backend the loop encodes the version's fp8 arrays with, or None (eager).

    On CUDA only (elsewhere the encoding is not what bounds a run). The compile happens here, once
    per process and before the timed loop, for the batch's shapes of every fp8 array; a compiled
    encoding that fails to compile or does not give the eager kernels' bytes on this machine is not
    used (warning)."""
    # Batches of 1 clip (a shard's last, or --batch 1) too: the compiled graph is dynamic in the
    # batch size, but torch.compile specialises a size of 1, which would otherwise compile in the loop.
    shapes = [(clips, math.prod(spec.shape[1:-1]), spec.shape[-1]) for clips in sorted({batch, 1})
              for spec in writer.manifest.arrays if spec.codec == "fp8"]
    if device.type != "cuda" or not shapes:
        return None
    from foresight.pipelines import float_codecs

    try:
        exact = float_codecs.compiled_fp8_is_exact(shapes, device, backend)
    except Exception as err:  # noqa: BLE001 - no compiler, a backend error: the eager kernels still work
        log.warning("teacher version %s: the fp8 encoding could not be compiled (%s: %s); encoding eagerly",
                    writer.version_id, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    if not exact:
        log.warning("teacher version %s: the compiled fp8 encoding (%s) differs from the eager kernels' bytes "
                    "on this machine; encoding eagerly", writer.version_id, backend)
        return None
    return backend


def torch_host(array: np.ndarray) -> torch.Tensor:
    """A tensor over the bytes of host ``array`` (uint16, which torch barely supports, as int16)."""
    return torch.from_numpy(array.view(np.int16) if array.dtype == np.uint16 else array)


class ShardBuffers:
    """A fixed pool of whole-shard host buffers, reused once a shard is stored (bounds memory, and
    pinning is paid once); taking one blocks while every buffer waits to be written."""

    def __init__(self, buffers: list[ShardBuffer]):
        self._free: queue.Queue[ShardBuffer] = queue.Queue()
        for buffer in buffers:
            self._free.put(buffer)

    @classmethod
    def allocate(cls, parts: ShardParts, count: int, pin: bool) -> "ShardBuffers":
        """``count`` private buffers of the given parts (pinned for CUDA)."""
        def tensor(shape: tuple[int, ...], dtype: str) -> torch.Tensor:
            return torch_host(np.empty(0, dtype=dtype)).new_empty(shape, pin_memory=pin)

        dtypes = {name: dtype for name, (_, dtype) in parts.items()}
        return cls([ShardBuffer({name: tensor(*layout) for name, layout in parts.items()}, dtypes=dtypes)
                    for _ in range(count)])

    def take(self) -> tuple[ShardBuffer, float]:
        """A free buffer and the seconds waited for it."""
        start = time.perf_counter()
        buffer = self._free.get()
        return buffer, time.perf_counter() - start

    def give(self, buffer: ShardBuffer) -> None:
        self._free.put(buffer)


def pin_host_arrays(arrays: list[np.ndarray], device: torch.device) -> list[int]:
    """Page-lock host arrays (shared memory) for the GPU, so device-to-host copies land in them
    directly and asynchronously; returns the addresses pinned, to unpin before unmapping. Stops at
    the first refusal, logged: copies into the arrays left unpinned are synchronous (correct, slower)."""
    cudart, pinned = torch.cuda.cudart(), []
    for array in arrays:
        error = int(cudart.cudaHostRegister(array.ctypes.data, array.nbytes, CUDA_HOST_REGISTER_PORTABLE))
        if error:
            log.warning("teachers: cannot page-lock %.0f MB of shared memory (cudaError %d); copies into "
                        "%d of %d output arrays will be synchronous", array.nbytes / 1e6, error,
                        len(arrays) - len(pinned), len(arrays))
            _take_pending_cuda_error(device)
            break
        pinned.append(array.ctypes.data)
    return pinned


def _take_pending_cuda_error(device: torch.device) -> None:
    """A failed runtime call leaves its error pending, and torch would report it at the next kernel
    launch check as that kernel's failure; one throw-away launch takes it now."""
    try:
        torch.zeros(1, device=device)
    except RuntimeError as err:
        log.debug("teachers: took the pending CUDA error: %s", err)


def unpin_host_arrays(addresses: list[int]) -> None:
    cudart = torch.cuda.cudart()
    for address in addresses:
        cudart.cudaHostUnregister(address)


# ---------------------------------------------------------------- store I/O
class ThreadIO:
    """Store reads and writes in threads of this process (small runs, tests, Dask workers)."""

    first_load: tuple[float, float] | None = None  # not split here: a thread reads and pins in one call

    def __init__(self, video: TargetReader, observed: ObservedFrames, writer: TargetWriter,
                 out_parts: ShardParts, writers: int, pin: bool):
        self.video, self.observed, self.writer, self.pin = video, observed, writer, pin
        self.buffers = ShardBuffers.allocate(out_parts, count=writers + 1, pin=pin)

    def load(self, shard: int, clips: range, claim: Any) -> InputBatch:
        return load_batch(self.video, self.observed, shard, clips, self.pin, claim)

    def store(self, shard: int, clips: int, buffer: ShardBuffer) -> None:
        self.writer.write_shard(shard, {name: buffer.host(name, clips) for name in buffer.arrays}, encoded=True)

    def reads_done(self) -> None:
        """Every batch was read (the reads are threads of ReadAhead: nothing to stop)."""

    def close(self) -> None:
        """Nothing to release: the threads belong to the caller's executors."""
        self.video = self.observed = self.writer = self.buffers = None


class ProcessIO:
    """Store reads and writes in worker processes (own zarr event loop and GIL each), exchanging
    batches and shards through shared memory. The output blocks are the shard buffers themselves
    (page-locked on CUDA): the device copies outputs straight into what the writers compress."""

    def __init__(self, video: TargetReader, writer: TargetWriter, batch: int, out_parts: ShardParts,
                 readers: int, writers: int, device: torch.device):
        from foresight.flows import teachers_io

        self.device, self.pin = device, device.type == "cuda"
        frames = tuple(video.manifest.array_spec("frames").shape[1:])
        self.in_blocks = teachers_io.SharedBlocks.create([teachers_io.BlockSpec("frames", (batch, *frames), "uint8")],
                                                         count=2 * readers + 1)
        try:
            self.out_blocks = teachers_io.SharedBlocks.create(
                [teachers_io.BlockSpec(name, shape, dtype) for name, (shape, dtype) in out_parts.items()],
                count=writers + 1)
        except BaseException:
            self.in_blocks.close()
            raise
        self.free_in: queue.Queue[int] = queue.Queue()
        for block in range(len(self.in_blocks)):
            self.free_in.put(block)
        self.read_pool = self.write_pool = self.pinner = None
        self.first_load: tuple[float, float] | None = None  # the first batch's (read, page-lock copy) seconds
        self.pinned: list[int] = []
        self.buffers = ShardBuffers([])
        try:
            self._start(video, writer, readers, writers)
        except BaseException:
            self.close()
            raise

    def _start(self, video: TargetReader, writer: TargetWriter, readers: int, writers: int) -> None:
        """Offer the output blocks as shard buffers (on CUDA as a background thread page-locks
        each, GBs for DA3, so the first batches do not wait for all of them) and start the workers."""
        if self.pin:
            self.pinner = threading.Thread(target=self._pin_blocks, name="teacher-pin", daemon=True)
            self.pinner.start()
        else:
            for buffer in self._block_buffers():
                self.buffers.give(buffer)
        self.read_pool, self.write_pool = self._start_workers(video, writer, readers, writers)

    def _block_buffers(self) -> list[ShardBuffer]:
        dtypes = {spec.name: spec.dtype for spec in self.out_blocks.specs}
        return [ShardBuffer({name: torch_host(view) for name, view in views.items()}, block, dtypes)
                for block, views in enumerate(self.out_blocks.views)]

    def _pin_blocks(self) -> None:
        """Page-lock the output blocks one by one, offering each as soon as it is; after a refusal
        (logged) or an error, the rest are offered as they are (their copies are synchronous)."""
        buffers = self._block_buffers()
        try:
            while buffers:
                arrays = [tensor.numpy() for tensor in buffers[0].arrays.values()]
                pinned = pin_host_arrays(arrays, self.device)
                self.pinned += pinned
                if len(pinned) < len(arrays):
                    break
                self.buffers.give(buffers.pop(0))
        finally:
            for buffer in buffers:
                self.buffers.give(buffer)

    def _start_workers(self, video: TargetReader, writer: TargetWriter, readers: int,
                       writers: int) -> tuple[ProcessPoolExecutor, ProcessPoolExecutor]:
        """Both pools, every worker started now and in parallel (a pool starts its workers one
        per submitted job otherwise, the writers in the middle of the run)."""
        import multiprocessing

        from foresight.flows import teachers_io

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["foresight.flows.teachers_io"])
        root_url = writer.root.url
        read_pool = ProcessPoolExecutor(readers, mp_context=context, initializer=teachers_io.init_reader,
                                        initargs=(root_url, video.version_id, self.in_blocks.describe()))
        write_pool = ProcessPoolExecutor(writers, mp_context=context, initializer=teachers_io.init_writer,
                                         initargs=(root_url, writer.version_id, self.out_blocks.describe()))
        for pool, count in ((read_pool, readers), (write_pool, writers)):
            for _ in range(count):
                pool.submit(teachers_io.worker_ready)
        return read_pool, write_pool

    def load(self, shard: int, clips: range, claim: Any) -> InputBatch:
        from foresight.flows import teachers_io

        block = self.free_in.get()
        try:
            started = time.perf_counter()
            observed = self.read_pool.submit(teachers_io.read_batch_job, block, clips.start, clips.stop).result()
            read = time.perf_counter()
            view = torch.from_numpy(self.in_blocks.views[block]["frames"][:len(clips)])
            frames = torch.empty(view.shape, dtype=view.dtype, pin_memory=self.pin)
            frames.copy_(view)
        finally:
            self.free_in.put(block)
        obs = torch.from_numpy(observed)
        obs = obs.pin_memory() if self.pin else obs
        if self.first_load is None:
            self.first_load = (read - started, time.perf_counter() - read)
        return InputBatch(shard, clips, frames, obs, claim)

    def store(self, shard: int, clips: int, buffer: ShardBuffer) -> None:
        """Have a writer process store the shard from the block its outputs were copied into."""
        from foresight.flows import teachers_io

        self.write_pool.submit(teachers_io.write_shard_job, buffer.block, shard, clips).result()

    def reads_done(self) -> None:
        """Every batch was read: the reader processes exit now, while the last batches are computed
        and written, instead of in the run's tail."""
        if self.read_pool is not None:
            self.read_pool.shutdown(wait=False)

    def close(self) -> None:
        """Stop the workers (after their current job; both pools at once), let queued device copies
        into the blocks finish (an error may leave some), unpin and free the shared memory."""
        pools = [pool for pool in (self.read_pool, self.write_pool) if pool is not None]
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for pool in pools:
            pool.shutdown(wait=True)
        if self.pinner is not None:
            self.pinner.join()
        try:
            if self.pinned:
                torch.cuda.synchronize(self.device)
                unpin_host_arrays(self.pinned)
        finally:
            self.buffers = None
            self.in_blocks.close()
            self.out_blocks.close()


def start_fork_server() -> None:
    """Start the fork server that I/O worker processes are forked from, now and in the background:
    it imports the store stack (~0.5 s) while the caller loads its teacher, instead of in front of
    the first read. Harmless when it already runs."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(["foresight.flows.teachers_io"])
    forkserver.ensure_running()


def open_io(video: TargetReader, observed: ObservedFrames, writer: TargetWriter, batch: int,
            out_parts: ShardParts, readers: int, writers: int, device: torch.device,
            processes: bool) -> "ThreadIO | ProcessIO":
    """Process I/O when asked for and possible (not inside a daemonic worker, enough shared
    memory), else thread I/O; the fallback is logged, never silent."""
    import multiprocessing

    if processes and multiprocessing.current_process().daemon:
        log.warning("teachers: running inside a daemonic worker process: store I/O uses threads")
    elif processes:
        try:
            return ProcessIO(video, writer, batch, out_parts, readers, writers, device)
        except (MemoryError, OSError) as err:
            log.warning("teachers: no shared memory for process I/O (%s): store I/O uses threads", err)
    return ThreadIO(video, observed, writer, out_parts, writers, device.type == "cuda")


# ---------------------------------------------------------------- the forward loop
@dataclass
class OpenShard:
    """A shard whose batches are being computed into a host buffer."""

    index: int
    clips: range
    buffer: ShardBuffer
    filled: int = 0
    events: list[Any] = field(default_factory=list)
    claim: Any = None


def store_shard(io: ThreadIO | ProcessIO, shard: OpenShard, claims: ClaimSet | None = None) -> None:
    """Wait for the shard's device copies, store it (data, then its _done marker), recycle its
    host buffer (also on error, so the forward loop never waits for it), release its claim."""
    try:
        for event in shard.events:
            if event is not None:
                event.synchronize()
        io.store(shard.index, len(shard.clips), shard.buffer)
    finally:
        io.buffers.give(shard.buffer)
    if claims is not None:
        claims.release(shard.index)


class ShardLoop:
    """The forward side of :func:`encode_shards`: fills shard buffers batch by batch and hands
    every full shard to the writer threads."""

    def __init__(self, teacher: Teacher, writer: TargetWriter, io: ThreadIO | ProcessIO,
                 executor: ThreadPoolExecutor, claims: ClaimSet | None, result: EngineStats,
                 cuda_graphs: bool = False, codec_backend: str | None = None):
        self.teacher, self.writer, self.io, self.executor = teacher, writer, io, executor
        self.codec_backend = codec_backend
        self.claims, self.result = claims, result
        self.upload, self.download = HostToDevice(teacher.device), DeviceToHost(teacher.device)
        self.graphed = GraphedBatches(self.encode_batch) if cuda_graphs and teacher.device.type == "cuda" else None
        self.timeline = GpuTimeline(teacher.device)
        self.current: OpenShard | None = None
        self.futures: list[Future] = []

    def _open(self, item: InputBatch) -> OpenShard:
        if self.current is None:
            buffer, waited = self.io.buffers.take()
            self.result.wait_write_s += waited
            self.current = OpenShard(item.shard, self.writer.shard_clips(item.shard), buffer, claim=item.claim)
        return self.current

    def step(self, item: InputBatch) -> None:
        """Upload one batch, forward it, queue its copy into the shard buffer, submit the shard
        when full; nothing here waits for the GPU."""
        started, waited = time.perf_counter(), self.result.wait_write_s
        batch = self.upload.send(item)
        shard = self._open(item)
        self.upload.hand_over(batch)
        with self.timeline.batch():
            if self.graphed is None:
                parts, slot = self.encode_batch(batch.frames_BTHWC, batch.observed_BHWC), None
            else:
                parts, slot = self.graphed(batch.frames_BTHWC, batch.observed_BHWC)
        rows = slice(item.clips.start - shard.clips.start, item.clips.stop - shard.clips.start)
        copied = self.download.copy([(tensor, shard.buffer.arrays[name][rows]) for name, tensor in parts.items()])
        shard.events.append(copied)
        if self.graphed is not None:
            self.graphed.release_after(slot, copied)
        shard.filled += len(item.clips)
        if shard.filled == len(shard.clips):
            self._submit(shard)
        self._raise_write_errors()
        self.result.clips += len(item.clips)
        self.result.host_busy_s += time.perf_counter() - started - (self.result.wait_write_s - waited)

    @torch.inference_mode()
    def encode_batch(self, frames_BTHWC: torch.Tensor, observed_BHWC: torch.Tensor) -> dict[str, torch.Tensor]:
        """All the device work of one batch: the teacher's target and reference maps, encoded as the
        store's parts. Coded arrays (bf16, fp8) are encoded here, on the device: the host gets a
        half-size copy and the writers only store bytes. In inference mode with or without CUDA
        graphs, as :func:`compiled_codec` compiled the codec: no second compile in the loop."""
        target, reference = self.teacher.encode_clips(frames_BTHWC, observed_BHWC)
        outputs = {"target": target, "reference": reference}
        return {name: tensor for spec in self.writer.manifest.arrays
                for name, tensor in encode_part_tensors(spec, outputs[spec.name], self.codec_backend).items()}

    def _submit(self, shard: OpenShard) -> None:
        self.futures.append(self.executor.submit(store_shard, self.io, shard, self.claims))
        self.result.shards_written.append(shard.index)
        self.current = None

    def _raise_write_errors(self) -> None:
        """Re-raise the first failed write; forget the stored shards."""
        for future in [f for f in self.futures if f.done()]:
            if future.exception() is not None:
                raise future.exception()
            self.futures.remove(future)

    def drain(self) -> None:
        """Wait until every submitted shard is stored; record the GPU's busy and idle time."""
        for future in self.futures:
            future.result()
        self.result.gpu_busy_s, self.result.gpu_idle_s = self.timeline.totals()
        if self.graphed is not None:
            self.result.graph_replays, self.result.graphs_failed = self.graphed.replays, self.graphed.failed


def encode_shards(teacher: Teacher, video: TargetReader, observed: ObservedFrames, writer: TargetWriter,
                  shards: list[int], batch: int, writers: int = 2, readers: int = 2,
                  claims: ClaimSet | None = None, io_processes: bool = False, cuda_graphs: bool = False,
                  codec_backend: str | None = None) -> EngineStats:
    """Encode and store whole shards: read ahead, upload, forward, copy back and write, overlapped.

    ``readers``/``writers`` are threads, or with ``io_processes`` worker processes (each driven by
    one thread of this process). With ``claims``, shards held by another builder are skipped and
    every claim is released, also on error (a shard not stored has no ``_done`` marker: a rerun
    redoes it). ``cuda_graphs``: on a CUDA device, replay each batch's device work from CUDA graphs
    (see :mod:`foresight.pipelines.teachers.graphs`; the same bytes). ``codec_backend``: encode fp8
    arrays with the compiled encoding (see :func:`compiled_codec`, which checks it gives the same bytes).
    """
    start = time.perf_counter()
    T = video.manifest.array_spec("frames").shape[1]
    shard_size = min(writer.manifest.shard_size, writer.manifest.num_clips)
    out_parts = shard_parts(writer, shard_size)
    io = open_io(video, observed, writer, batch, out_parts, readers, writers, teacher.device, io_processes)
    result = EngineStats(shards=list(shards), open_s=time.perf_counter() - start)
    read = ReadAhead(io.load, batch_plan(writer, shards, batch), readers=readers, depth=2 * readers + 1,
                     claim=None if claims is None else claims.take)
    try:
        with ThreadPoolExecutor(writers, thread_name_prefix="teacher-write") as executor:
            loop = ShardLoop(teacher, writer, io, executor, claims, result, cuda_graphs, codec_backend)
            last = _feed(loop, read, start)
            io.reads_done()
            loop.drain()
    finally:
        closing = time.perf_counter()
        io.close()
        result.close_s = time.perf_counter() - closing
        if claims is not None:
            claims.release_all()
    result.frames, result.wait_read_s = result.clips * T, read.waited_s
    result.first_read_s, result.first_pin_s = io.first_load or (0.0, 0.0)
    result.seconds = time.perf_counter() - start
    result.tail_s = time.perf_counter() - last
    return result


def _feed(loop: ShardLoop, read: ReadAhead, start: float) -> float:
    """Run every read batch through the loop; returns when the last one was queued."""
    for item in read:
        if not loop.result.startup_s:
            loop.result.startup_s = time.perf_counter() - start
        loop.step(item)
    return time.perf_counter()
