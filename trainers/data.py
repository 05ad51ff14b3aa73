"""Streaming datasets that trainers read: `ShardStream` over an export, `ZarrClips` over target versions.

Both yield the same **sample dict** (one clip), so a trainer can switch between them:

    {
      "__key__":  str   webdataset key of the sample, "c<9-digit clip index>" (no dots)
      "meta": {                          clip metadata and provenance (plain JSON types)
          "clip_index": int              row of the clip in the plan (= row in every target array)
          "clip_id", "dataset", "episode_id", "camera": str
          "start", "num_frames", "stride": int     (frames: start + stride * i, i < num_frames)
          "instruction": str
          "split": str | None           split of the episode ("train"/"val"/...)
          "plan_id": str
          "export_id": str | None        None for ZarrClips
          "versions": {field: version_id}   the target version every array field came from
          "codecs": {field: "raw" | "f16" | "bf16" | "fp8"}   how the field was stored
          "stream": {"epoch", "rank", "world_size", "worker", "num_workers", "position"}
                                         where ShardStream produced it (absent for ZarrClips)
      },
      # array fields (numpy arrays; the DataLoader's collate turns them into torch tensors):
      "frames":              uint8   (T, H, W, 3)   generated video (kind "video")
      "onestep":             float16 (T, h, w, C)   SVD one-step features (C = 2560 at full size)
      "seed":                int64   ()             generation seed of the clip
      "<teacher>.target":    float16 (T, h, w, Ct)  teacher maps over the generated frames
      "<teacher>.reference": float16 (1, h, w, Ct)  the same teacher over the observed frame
                                                    (<teacher> = the teacher's name, e.g. "dinov2", "da3")
      "text":                float16 (L, D)         instruction embedding (kind "text")
      "pi0.<array>":         arrays of a "pi0" target version, e.g. "pi0.velocity"
      "actions":             float32 (chunk, A)     episode actions at frames start .. start+chunk-1
                                                    (the chunk after the clip's first frame); rows past
                                                    the episode end repeat the last action
      "actions_mask":        bool    (chunk,)       False where a row was padded past the episode end
      "state":               float32 (S,)           episode state at the clip's first frame
    }

Only the fields the export (or the caller's `fields=`) selected are present. Coded float fields are
decoded to float16 except the "bf16" codec, which decodes to float32 (bfloat16 does not fit float16's
range); pass `float_dtype="float32"` to get float32 for them (raw fields keep their dtype). With
`ShardStream(..., decode_fp8=False)` an "fp8" field stays coded: "<field>" is uint8 (..., C) e4m3 codes
of companded values and "<field>.fp8scale" uint8 (C,) E8M0 scale bytes (see pipelines/export.py);
decode batches on the GPU with `fp8_to_float`. In fp8 exports large raw fields (frames) may be stored
gzip'd; they are inflated only when selected with `fields=`. Statistics for normalising actions and state
(mean, std, min, max, q01, q99 per dimension, over the export's episodes) are in
`ShardStream.stats` (= index.json "stats").

Field names: a "video" version gives its arrays' names ("frames", "onestep", "seed"); a "teacher"
version gives "<teacher>.<array>"; a "text" version gives "text" (its single array); a "pi0" version
gives "pi0.<array>". Use `collate_samples` as the DataLoader's `collate_fn` to stack arrays into torch
tensors and keep "meta" / "__key__" as lists. For per-sample loading through DataLoader workers
(``batch_size=None``) use `collate_zero_copy`: arrays that are views of the memory-mapped shard reach the
main process as views of the same file, without a copy.

Resuming (one protocol, ``state_dict()`` / ``load_state_dict()``): iterated in-process, save
`stream.state_dict()` with the checkpoint, and after `load_state_dict` the next iteration yields exactly
the samples not yet consumed in that epoch. Inside a DataLoader worker the state describes that
worker's position; read through workers with `trainers.batching.ResumableLoader`, whose own
`state_dict()` combines the workers' states of the batches it handed out (prefetched ones excluded), and
resume with the same world size and worker count. Call `stream.set_epoch(e)` at each epoch (like
DistributedSampler); a copy that finished an epoch by itself (in-process, persistent workers) moves on
to the next one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from foresight.pipelines.export import E8M0_TABLE, FP8_POWER, decode_sample, fp8_table, sample_key
from foresight.storage.exports import LOOKAHEAD, BufferPool, ClipSource, ExportIndex, ExportStore, resolve_sources
from foresight.storage.fs import Root
from foresight.storage.mapped import describe_views
from foresight.storage.targets import verify_by_default

log = logging.getLogger(__name__)
FLOAT_DTYPES = {None: None, "float16": np.float16, "float32": np.float32}


# epoch planning (pure; shared by every rank and worker) --------------------------------------
def balanced_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part ``index`` when ``total`` items are cut into ``parts`` contiguous near-equal parts."""
    return total * index // parts, total * (index + 1) // parts


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard positions in the order an epoch reads them (a permutation seeded by seed and epoch)."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards).tolist()


def consumer_pieces(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(shard, first, stop) pieces covering samples [lo, hi) of the epoch's global sample sequence
    (shards in ``order``, samples in tar order)."""
    pieces, start = [], 0
    for shard in order:
        end = start + counts[shard]
        first, stop = max(lo, start), min(hi, end)
        if first < stop:
            pieces.append((shard, first - start, stop - start))
        start = end
    return pieces


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of ``n`` sequentially read items through a random-replacement buffer of ``size``.

    Emission ``e`` happens after ``reads_before(e, n, size)`` items were read; items are identified by
    read position, so the whole order is known without touching data (what makes resuming exact).
    """
    if size <= 1 or n <= 1:
        return np.arange(n)
    size = min(size, n)
    buffer = np.arange(size)
    picks = rng.integers(0, size, n - size)
    order = np.empty(n, dtype=np.int64)
    for step, slot in enumerate(picks):
        order[step] = buffer[slot]
        buffer[slot] = size + step
    order[n - size:] = rng.permutation(buffer)
    return order


def reads_before(emission: int, n: int, size: int) -> int:
    """Items read from the stream before emission number ``emission`` (see shuffle_buffer_order)."""
    return min(n, max(size, 1) + emission)


@dataclass(frozen=True)
class Consumer:
    """Who is iterating: the DDP rank and the DataLoader worker."""

    rank: int
    world_size: int
    worker: int
    num_workers: int


def ddp_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_pins(where: str, field_versions: Mapping[str, str], pins: Sequence[str] | Mapping[str, str],
               fields: Sequence[str]) -> None:
    """Refuse a data source whose target versions differ from the caller's pins.

    ``field_versions`` maps every field of the source to its version; ``pins`` is a list of version
    ids, or a {field: version} mapping for field-exact pins. Every pinned version must be in the
    source, and every selected field must come from a pinned version.
    """
    if isinstance(pins, str) or not isinstance(pins, (Sequence, Mapping)):
        raise ValueError(f"{where}: pin versions as a list of ids or a {{field: version}} mapping, "
                         f"not {pins!r}")
    pinned = dict(pins) if isinstance(pins, Mapping) else None
    pinned_ids = set(pinned.values()) if pinned is not None else set(pins)
    if not pinned_ids:
        raise ValueError(f"{where}: no target versions pinned; pass the version ids the trainer was "
                         f"configured with (the source has {sorted(set(field_versions.values()))})")
    missing = sorted(pinned_ids - set(field_versions.values()))
    if missing:
        raise ValueError(f"{where}: pinned target versions {missing} are not in this source, which was made "
                         f"from {sorted(set(field_versions.values()))}; version mismatch, refusing to read")
    for field in fields:
        version = field_versions.get(field)
        if version is None:
            continue
        wanted = pinned.get(field, version) if pinned is not None else version
        if version not in pinned_ids or version != wanted:
            raise ValueError(f"{where}: field '{field}' comes from target version '{version}', which is not "
                             f"the pinned one ({wanted if pinned is not None else sorted(pinned_ids)}); "
                             "version mismatch, refusing to mix versions")


# ShardStream -----------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Sequential, shuffled, resumable samples of one export, split over DDP ranks and DataLoader workers.

    Each epoch orders the shards by a permutation seeded with (seed, epoch), concatenates their samples,
    cuts that sequence into one contiguous near-equal range per rank and then per worker (every sample
    exactly once, rank sizes differ by at most one), and passes each worker's range through a seeded
    shuffle buffer. Ranges are read sequentially by byte offset; nothing is ever unpickled.

    With ``verify`` (default on) every sample's bytes are checked against index.json before they are
    parsed; a mismatch is a one-line ValueError naming the export, shard, sample and shard URL. The
    first read of a sample in a process is checked by a helper thread up to ``verify_ahead``
    samples ahead of the consumer (default storage.exports.LOOKAHEAD in-process, none inside DataLoader
    workers, whose checks already run beside the consumer; 0: in the consumer's thread), so the hash
    of the next sample overlaps the consumer's pass over this one; no sample is handed out before its
    check passed, and a stream left mid-epoch (its iterator closed or dropped) stops the thread.
    Samples of an unmodified memory-mapped shard file that this process already checked are not
    checked again (later epochs).
    """

    def __init__(self, root: Root | str | None, export_id: str, versions: Sequence[str] | Mapping[str, str],
                 fields: Sequence[str] | None = None, seed: int = 0, shuffle_shards: bool = True,
                 shuffle_buffer: int = 0, verify: bool | None = None, float_dtype: str | None = None,
                 rank: int | None = None, world_size: int | None = None, decode_fp8: bool = True,
                 allow_null: bool = False, verify_ahead: int | None = None):
        self.store = ExportStore(root)
        self.index: ExportIndex = self.store.index(export_id)
        self.export_id = export_id
        if self.index.null_versions and not allow_null:
            raise ValueError(f"export '{export_id}': made from null-model versions {self.index.null_versions} "
                             "(a simulation, not targets); pass allow_null=True to read it anyway")
        self.fields = list(self.index.fields) if fields is None else list(fields)
        unknown = sorted(set(self.fields) - set(self.index.fields))
        if unknown:
            raise ValueError(f"export '{export_id}': no fields {unknown} (has {sorted(self.index.fields)})")
        check_pins(f"export '{export_id}'", self.index.versions, versions, self.fields)
        self.pins = dict(versions) if isinstance(versions, Mapping) else sorted(versions)
        if float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype {float_dtype!r}: expected one of {list(FLOAT_DTYPES)}")
        # Each sample's checksum is checked while reading unless --no-verify (or verify=False) says not to.
        self.verify = verify_by_default() if verify is None else bool(verify)
        if verify_ahead is not None and verify_ahead < 0:
            raise ValueError(f"export '{export_id}': verify_ahead {verify_ahead} must be >= 0")
        self.verify_ahead = verify_ahead
        self.float_dtype, self.seed = float_dtype, seed
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, max(0, int(shuffle_buffer))
        self.rank, self.world_size, self.decode_fp8 = rank, world_size, decode_fp8
        self.epoch = 0
        self._consumed: dict[int, int] = {}  # worker -> samples of this epoch this copy has yielded
        self._start: dict[int, int] = {}  # worker -> where the next iteration starts (load_state_dict)
        self._resume_layout: tuple[int, int] | None = None
        self._finished = False  # this copy iterated its whole epoch; the next iteration moves on
        self._pool: BufferPool | None = None
        self.store.accept_mapped_views(self.index)  # samples handed over by collate_zero_copy

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the read buffers of this process.
        return {**self.__dict__, "_pool": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.store.accept_mapped_views(self.index)  # a process that receives the stream can read its views

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Action/state normalisation statistics of the export (index.json "stats")."""
        return {name: stats.model_dump() for name, stats in self.index.stats.items()}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles shards and buffers), like DistributedSampler.set_epoch.

        Setting the current epoch again keeps a loaded resume point. Without set_epoch, a copy that
        iterated a whole epoch itself (in-process, or a persistent DataLoader worker) moves on to the
        next epoch at its next iteration.
        """
        if epoch != self.epoch:
            self.epoch, self._consumed, self._start, self._resume_layout = int(epoch), {}, {}, None
        self._finished = False

    def _rank_world(self) -> tuple[int, int]:
        detected = ddp_rank_world()
        rank = detected[0] if self.rank is None else self.rank
        world = detected[1] if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise ValueError(f"ShardStream: rank {rank} is outside world size {world}")
        return rank, world

    def __len__(self) -> int:
        """Samples this rank yields per epoch (summed over its DataLoader workers)."""
        rank, world = self._rank_world()
        lo, hi = balanced_range(self.index.num_samples, world, rank)
        return hi - lo

    def _consumer(self) -> Consumer:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._start and self._resume_layout is not None and self._resume_layout != (world, workers):
            raise ValueError(f"ShardStream: state was saved with world size x workers = {self._resume_layout}, "
                             f"resuming with {(world, workers)}; an exact resume needs the same split")
        return Consumer(rank, world, worker, workers)

    def _pieces(self, consumer: Consumer) -> list[tuple[int, int, int]]:
        lo, hi = balanced_range(self.index.num_samples, consumer.world_size, consumer.rank)
        w_lo, w_hi = balanced_range(hi - lo, consumer.num_workers, consumer.worker)
        counts = [shard.samples for shard in self.index.shards]
        order = epoch_shard_order(len(counts), self.seed, self.epoch, self.shuffle_shards)
        return consumer_pieces(counts, order, lo + w_lo, lo + w_hi)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._finished:
            self.set_epoch(self.epoch + 1)
        consumer = self._consumer()
        pieces = self._pieces(consumer)
        total = sum(stop - first for _, first, stop in pieces)
        rng = np.random.default_rng([self.seed, self.epoch, consumer.rank, consumer.worker, 1])
        order = shuffle_buffer_order(total, self.shuffle_buffer, rng)
        start = min(self._start.pop(consumer.worker, 0), total)
        self._resume_layout = (consumer.world_size, consumer.num_workers)
        # Resuming at emission `start`: what the interrupted run had read is re-read (buffered items
        # by random access), and sequential reading continues after it.
        read = reads_before(start - 1, total, self.shuffle_buffer) if 0 < start < total else 0
        if self._pool is None:
            # buffers in flight: the shuffle buffer, the consumer's, and those checked ahead (read_pieces)
            self._pool = BufferPool(self.shuffle_buffer + 4 + LOOKAHEAD + 1)
        buffered = self._resume_buffer(pieces, order, start, read)
        reader = self._sequential(pieces, read)
        try:
            for emission in range(start, total):
                while read < reads_before(emission, total, self.shuffle_buffer):
                    position, item = next(reader)
                    assert position == read, "sequential reader out of step with the buffer plan"
                    buffered[position], item = item, None  # no stray reference: keeps the buffer poolable
                    read += 1
                self._consumed[consumer.worker] = emission + 1
                yield self._decode(*buffered.pop(int(order[emission])), consumer, emission)
        finally:
            reader.close()  # stops the verifying thread of a stream left mid-epoch
        self._finished = True

    def _locate(self, pieces: list[tuple[int, int, int]], position: int) -> tuple[int, int, int]:
        """(piece number, shard, sample in shard) of a worker-local read position."""
        offset = 0
        for number, (shard, first, stop) in enumerate(pieces):
            if position < offset + stop - first:
                return number, shard, first + position - offset
            offset += stop - first
        raise IndexError(f"read position {position} is past this worker's {offset} samples")

    def _sequential(self, pieces: list[tuple[int, int, int]], start: int) -> Iterator[tuple[int, Any]]:
        """(position, (clip, members)) from worker-local read position ``start`` on, one open shard at a
        time; verified samples are checked ahead of the consumer in a background thread (read_pieces)."""
        total = sum(stop - first for _, first, stop in pieces)
        if start >= total:
            return
        number, _, sample = self._locate(pieces, start)
        rest = [(pieces[number][0], sample, pieces[number][2]), *pieces[number + 1:]]
        samples = self.store.read_pieces(self.index, rest, verify=self.verify, pool=self._pool,
                                         lookahead=self._lookahead())
        try:
            yield from enumerate(samples, start)
        finally:
            samples.close()

    def _lookahead(self) -> int:
        """Samples checked ahead in a background thread: ``verify_ahead``, else LOOKAHEAD in-process and
        none inside a DataLoader worker (the workers' checks already run beside the consumer)."""
        if self.verify_ahead is not None:
            return self.verify_ahead
        return LOOKAHEAD if get_worker_info() is None else 0

    def _resume_buffer(self, pieces: list[tuple[int, int, int]], order: np.ndarray, start: int,
                       read: int) -> dict[int, Any]:
        """Items that sat in the shuffle buffer when the saved state was taken, re-read by random access."""
        waiting = set(range(read)) - set(order[:start].tolist())
        buffered = {}
        for position in sorted(waiting):
            _, shard, sample = self._locate(pieces, position)
            buffered[position] = self.store.read_sample(self.index, shard, sample, verify=self.verify, pool=self._pool)
        return buffered

    def _decode(self, clip: int, members: list, consumer: Consumer, emission: int) -> dict[str, Any]:
        where = f"export '{self.export_id}', clip {clip}"
        sample = decode_sample(members, FLOAT_DTYPES[self.float_dtype], where, fields=self.fields,
                               decode_fp8_fields=self.decode_fp8)
        meta = sample["meta"]
        if meta.get("export_id") != self.export_id or meta.get("clip_index") != clip:
            raise ValueError(f"{where}: sample metadata names export {meta.get('export_id')!r}, clip "
                             f"{meta.get('clip_index')!r}; the shard does not belong to this export")
        check_pins(where, meta.get("versions", {}), self.pins, self.fields)
        missing = [f for f in self.fields if f not in sample]
        if missing:
            raise ValueError(f"{where}: sample has no members for fields {missing}")
        meta["stream"] = {"epoch": self.epoch, "rank": consumer.rank, "world_size": consumer.world_size,
                          "worker": consumer.worker, "num_workers": consumer.num_workers, "position": emission}
        return sample

    # resuming ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands in the current epoch (JSON-serialisable)."""
        rank, world = self._rank_world()
        return {"export_id": self.export_id, "seed": self.seed, "epoch": self.epoch, "rank": rank,
                "world_size": world, "layout": list(self._resume_layout) if self._resume_layout else None,
                "shuffle_shards": self.shuffle_shards, "shuffle_buffer": self.shuffle_buffer,
                "consumed": {str(worker): count for worker, count in sorted(self._consumed.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields exactly the samples of the epoch not consumed yet."""
        mine = {"export_id": self.export_id, "seed": self.seed, "shuffle_shards": self.shuffle_shards,
                "shuffle_buffer": self.shuffle_buffer}
        differs = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differs:
            raise ValueError(f"ShardStream: saved state does not match this stream (saved, now): {differs}")
        rank, world = self._rank_world()
        if (state.get("rank"), state.get("world_size")) != (rank, world):
            raise ValueError(f"ShardStream: state of rank {state.get('rank')}/{state.get('world_size')} "
                             f"loaded on rank {rank}/{world}")
        self.epoch, self._finished = int(state["epoch"]), False
        self._consumed = {int(worker): int(count) for worker, count in state["consumed"].items()}
        self._start = dict(self._consumed)
        self._resume_layout = tuple(state["layout"]) if state.get("layout") else None
        log.info("export %s: resuming epoch %d after %s samples per worker", self.export_id, self.epoch,
                 self._consumed)


def fp8_to_float(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode an fp8 field kept coded (``ShardStream(decode_fp8=False)``), on any device.

    ``codes`` uint8 (..., C) e4m3fn codes and ``scale`` the uint8 E8M0 scale bytes '<field>.fp8scale',
    (C,) per sample or (B, C) for a batch of codes (B, ..., C). Returns ``sign(q) * (|q| / 448)**(1/p)
    * 2**(scale - 127)`` in ``dtype``: the same 256-entry table as the CPU decode (float32 here), one
    gather and one multiply. Moving uint8 codes to the GPU and decoding there halves the bytes of
    float16 and skips the CPU decode.
    """
    if codes.dtype != torch.uint8 or scale.dtype != torch.uint8:
        raise ValueError(f"fp8_to_float: expected uint8 codes and uint8 E8M0 scales, got {codes.dtype} and "
                         f"{scale.dtype} (float scales come from the earlier linear fp8 format: re-export)")
    table = torch.from_numpy(fp8_table(FP8_POWER, "float32").copy()).to(codes.device)
    powers = torch.from_numpy(E8M0_TABLE.copy()).to(codes.device)
    # int32 indices are enough on CUDA; the CPU kernel of index_select is far faster with int64.
    index_dtype = torch.int64 if codes.device.type == "cpu" else torch.int32
    values = torch.index_select(table, 0, codes.reshape(-1).to(index_dtype)).reshape(codes.shape)
    scale_C = torch.index_select(powers, 0, scale.reshape(-1).to(codes.device, index_dtype)).reshape(scale.shape)
    if scale_C.dim() == 2 and codes.dim() > 2:
        scale_C = scale_C.reshape(scale_C.shape[0], *([1] * (codes.dim() - 2)), scale_C.shape[1])
    return (values * scale_C).to(dtype)


def worker_context():
    """Multiprocessing context for DataLoader workers over these datasets.

    Forked workers inherit Prefect's exit hooks when a flow ran earlier in the same process (the
    demo, tests) and then die with exit code 1 on shutdown; a forkserver starts them clean. Without
    Prefect loaded, plain fork is kept because it starts workers fastest.
    """
    import multiprocessing
    import sys

    return multiprocessing.get_context("forkserver") if "prefect" in sys.modules else None


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DataLoader collate_fn: stack array fields into torch tensors; keep "meta" and "__key__" as lists.

    Inside a DataLoader worker the stacked tensors are allocated in shared memory (as torch's
    default_collate does), so a batch crosses to the main process without another copy. The copy
    itself is numpy's: torch's CPU copy of float16 is an order of magnitude slower on this build.
    """
    in_worker = get_worker_info() is not None
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        if name in ("meta", "__key__") or not isinstance(values[0], np.ndarray):
            batch[name] = values
        else:
            batch[name] = _stack(values, in_worker)
    return batch


def _stack(values: Sequence[np.ndarray], shared: bool) -> torch.Tensor:
    first = np.asarray(values[0])
    shape = (len(values), *first.shape)
    if not shared:
        return torch.from_numpy(np.stack(values))
    dtype = torch.from_numpy(first[:0] if first.ndim else first.reshape(1)[:0]).dtype
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * first.itemsize)
    out = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    np.stack(values, out=out.numpy())
    return out


class ZeroCopyCollate:
    """DataLoader collate_fn for per-sample loading in worker processes, without copying mapped arrays.

        loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=collate_zero_copy)

    With ``batch_size=None`` the DataLoader calls it on each sample and it returns the sample dict
    with its arrays as torch tensors, like the default ``default_convert`` (numpy arrays with
    ``as_tensors=False``); given a list of samples (``batch_size=k``) it returns the list, each sample
    converted, not stacked. "meta" and "__key__" pass through.

    ShardStream's arrays on a local root are views of the memory-mapped shard (f16 and raw fields,
    fp8 codes kept with ``decode_fp8=False``). Inside a worker each such view leaves as a descriptor
    (file, byte offset, dtype, shape, file identity; see storage/mapped.py) and the main process maps
    the same bytes of the shard again: no copy, the page cache is shared, and a shard deleted or
    replaced in between is refused with a ValueError. Other arrays (fp8 decoded on the CPU,
    inflated gzip'd fields, anything read from an object store) are copied into shared memory, as
    ``collate_samples`` does. In-process (``num_workers=0``) nothing is copied either way.

    When to use it: per-sample loading through workers (a consumer that takes one sample at a time,
    or batches and pins on its own in the main process). Batched training goes through
    trainers/batching.py's StatefulBatches, which collates inside the workers into reusable page-locked
    buffers; ``collate_samples`` stacks batches into fresh shared memory.
    """

    def __init__(self, as_tensors: bool = True):
        self.as_tensors = as_tensors

    def __call__(self, item: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any] | list:
        if isinstance(item, Mapping):
            return self._sample(item)
        return [self._sample(sample) for sample in item]

    def _sample(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        if get_worker_info() is None:
            return {name: self._convert(value) for name, value in sample.items()}
        views = describe_views(sample)
        handed: dict[str, Any] = {}
        for name, value in sample.items():
            if name in views:  # unpickles in the receiving process as a view of the shard (+ a tensor)
                handed[name] = _Arrival(torch.from_numpy, views[name]) if self.as_tensors else views[name]
            elif _tensor_compatible(value):
                shared = _stack([value], shared=True)[0]
                handed[name] = shared if self.as_tensors else _Arrival(torch.Tensor.numpy, shared)
            else:
                handed[name] = value
        return handed

    def _convert(self, value: Any) -> Any:
        return torch.from_numpy(value) if self.as_tensors and _tensor_compatible(value) else value


collate_zero_copy = ZeroCopyCollate()
"""``ZeroCopyCollate()``: per-sample collate_fn returning tensors (see ZeroCopyCollate)."""


def _tensor_compatible(value: Any) -> bool:
    # Numeric and bool arrays (what default_convert turns into tensors); strings and objects stay numpy.
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


@dataclass(frozen=True)
class _Arrival:
    """``function(value)``, applied where it is unpickled (turns a received view into a tensor there)."""

    function: Any
    value: Any

    def __reduce__(self):
        return self.function, (self.value,)


# ZarrClips -------------------------------------------------------------------------------------
class ZarrClips(Dataset):
    """Random access by clip straight over pinned target versions (no export needed).

    ``versions`` pins the target versions (ids, or 'alias=id'); versions made from different upstream
    versions are refused. Items are sample dicts (see the module docstring) with ``meta["export_id"]``
    None and every codec 'raw'. With ``verify`` (default: on unless ``--no-verify``) every zarr shard
    object is checked against its recorded checksum as it is read (storage.targets.TargetReader).
    """

    def __init__(self, root: Root | str | None, plan_id: str, versions: Sequence[str],
                 fields: Sequence[str] | None = None, split: str | None = None, verify: bool | None = None,
                 float_dtype: str | None = None, action_chunk: int = 10, action_column: str = "action",
                 state_column: str = "state", allow_null: bool = False):
        if float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype {float_dtype!r}: expected one of {list(FLOAT_DTYPES)}")
        if isinstance(versions, str) or not versions:
            raise ValueError(f"plan '{plan_id}': pin the target versions to read as a non-empty list of ids")
        root = ExportStore(root).root
        sources = resolve_sources(root, plan_id, list(versions), fields, action_column, state_column, allow_null)
        self.source = ClipSource(root, plan_id, sources, action_chunk, verify=verify)
        self.clips = [i for i in range(len(self.source.rows)) if split is None or self.source.split(i) == split]
        if not self.clips:
            raise ValueError(f"plan '{plan_id}': no clips of split '{split}'")
        self.float_dtype = float_dtype

    @property
    def versions(self) -> dict[str, str]:
        """Field -> target version id."""
        return self.source.versions

    def stats(self) -> dict[str, dict[str, Any]]:
        """Action/state statistics over the episodes of this dataset's clips (like index.json "stats")."""
        return {name: s.model_dump() for name, s in self.source.episode_stats(self.clips).items()}

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, item: int) -> dict[str, Any]:
        clip = self.clips[item]
        arrays = self.source.read([clip])[0]
        dtype = FLOAT_DTYPES[self.float_dtype]
        for field in self.source.target_sources():
            if dtype is not None and arrays[field].dtype.kind == "f":
                arrays[field] = arrays[field].astype(dtype, copy=False)
        meta = self.source.meta(clip, None)
        meta["codecs"] = {field: "raw" for field in arrays}
        return {"__key__": sample_key(clip), "meta": meta, **arrays}
