"""Shared training machinery for every foresight trainer.

A trainer supplies a :class:`TrainTask` (the trainable model, a batch -> loss function and a held-out
evaluation) and a resumable stream (an ``IterableDataset`` with ``state_dict``/``load_state_dict``,
e.g. ``trainers.data.ShardStream``); :func:`fit` does the rest:

- AdamW, gradient clipping, warm-up + cosine (or tri-stage) learning rate, bf16 autocast on a GPU;
- ``runs/<run_id>/step-<N>/`` checkpoints (model, optimizer, scheduler, RNG and stream state, step,
  resolved config, export id, target version ids), written under a temporary name and renamed once
  complete; a checkpoint without its ``_COMPLETE`` marker does not exist; the last ``keep_last`` stay;
- exact resume: stopping at step N and resuming gives the same losses as an uninterrupted run;
- ``metrics.jsonl`` (one JSON line per log interval and per evaluation) and a tqdm line;
- DDP under ``torchrun`` (each rank reads its own shards of the stream);
- a version guard: a run refuses to resume on an export whose target versions differ from the
  checkpoint's unless ``allow_version_change`` is set, and then records both.

Exact resume with DataLoader workers: each worker batches its own samples and tags every batch with
its stream's ``state_dict()`` taken right after the batch's last sample. The loop keeps, per worker,
the state of the last batch it *consumed* (not merely prefetched), and which worker the DataLoader's
round robin visits next. On resume each worker loads its own state, and the workers the round robin
would have visited before that one yield one skip marker first, so the batch order continues exactly.
Each worker moves its stream to the next epoch (``set_epoch``) when its part of an epoch ends, so
batches are always full and DDP ranks never run dry.

The stream protocol (ShardStream's): ``__iter__`` yields the current epoch's samples of this rank and
worker from the current position; ``epoch`` / ``set_epoch(e)``; ``state_dict()`` /
``load_state_dict(state)``, where a state taken inside a worker describes that worker's position.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import queue
import random
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import safetensors.torch
import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from schemas.base import StrictModel, validate
from storage import layout
from storage.fs import Root
from storage.targets import verify_by_default

log = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
STEP_PREFIX = "step-"


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
class OptimConfig(StrictModel):
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = Field(1e-4, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, description="AdamW weight decay (not applied to biases, norms, 1-d params).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, description="Max global gradient norm; 0 disables clipping.")
    schedule: Literal["cosine", "tristage", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    warmup_steps: int = Field(100, description="Linear warm-up steps from 0 to the peak LR (at most a tenth of the run).")
    min_lr_ratio: float = Field(0.0, description="Final LR as a fraction of the peak (cosine and tri-stage).")
    hold_fraction: float = Field(0.4, description="Tri-stage: fraction of the steps held at the peak LR.")


class LoopConfig(StrictModel):
    """Steps, batching, devices, logging and checkpointing of one run."""

    steps: int = Field(1000, description="Total optimizer steps of the run.")
    batch_size: int = Field(8, description="Samples per step on each rank.")
    num_workers: int = Field(2, description="DataLoader worker processes per rank (0 = read in the main process).")
    prefetch_factor: int = Field(2, description="Batches each worker keeps ready.")
    pin_memory: bool = Field(False, description="Pin host batches before the GPU copy (one more host copy); "
                                                "batches collated into reusable buffers are page-locked already.")
    reuse_buffers: bool | None = Field(None, description="Collate into a few reusable page-locked buffers per "
                                                         "worker instead of fresh memory per batch (trainers/"
                                                         "slots.py). None: on with CUDA.")
    seed: int = Field(0, description="Seed of initialisation, dropout and noise (rank r uses seed + r).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on the CPU).")
    log_every: int = Field(10, description="Write a metrics line every this many steps.")
    eval_every: int = Field(0, description="Held-out evaluation every this many steps (0 = only at the end).")
    eval_batches: int = Field(4, description="Batches per held-out evaluation.")
    checkpoint_every: int = Field(500, description="Write step-N/ every this many steps (and at the end).")
    keep_last: int = Field(3, description="Complete checkpoints to keep.")
    progress: bool = Field(True, description="Show a tqdm line (rank 0, when stderr is a terminal).")


def load_config(model: type[StrictModel], path: str | os.PathLike[str] | None,
                overrides: dict[str, Any] | None = None) -> Any:
    """A run config from a TOML file (any subset of the model's keys) with CLI ``overrides`` applied on top.

    ``overrides`` maps dotted keys to values (``{"loop.steps": 100}``); None values are skipped.
    Unknown keys are errors naming the key and the file.
    """
    import tomllib

    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        with open(path, "rb") as handle:
            try:
                data = tomllib.load(handle)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path}: not valid TOML ({err})") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate(model, data, where)


class DataConfig(StrictModel):
    """How a trainer reads its export (trainers.data.ShardStream options)."""

    shuffle_buffer: int = Field(16, description="Samples in each worker's shuffle buffer (0 = off).")
    shuffle_shards: bool = Field(True, description="Shuffle the shard order every epoch.")
    verify: bool = Field(default_factory=verify_by_default,
                         description="Check every sample's checksum against index.json while reading (default on; "
                                     "off with `foresight --no-verify`, recorded in the run's config).")
    fp8_on_device: bool = Field(False, description="fp8 exports: keep the uint8 codes (+ '.fp8scale' fields), "
                                                   "move them and decode on the device (TrainTask.prepare): half "
                                                   "the bytes of float16, no CPU decode.")


FP8_SCALE = ".fp8scale"
"""Suffix of the per-channel scales that ShardStream(decode_fp8=False) puts beside an fp8-coded field."""


def collate_fields(samples: list[dict[str, Any]], fields: dict[str, str], slots: Any = None) -> dict[str, Any]:
    """Stack ``fields`` (batch key -> sample field) of ``samples`` into tensors, with any fp8 scales.

    Writes into the next buffer of ``slots`` (trainers.slots.BatchSlots) when given and the batch fits
    it; otherwise uses trainers.data.collate_samples (numpy copies straight into shared memory inside
    workers).
    """
    from trainers.data import collate_samples
    from trainers.slots import batch_layout, fill

    picked = []
    for sample in samples:
        item = {}
        for key, name in fields.items():
            item[key] = sample[name]
            if name + FP8_SCALE in sample:
                item[key + FP8_SCALE] = sample[name + FP8_SCALE]
        picked.append(item)
    buffer = slots.take(batch_layout(picked)) if slots is not None else None
    return fill(buffer, picked) if buffer is not None else collate_samples(picked)


def decode_coded(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch with every fp8-coded field (codes + ``.fp8scale``) decoded to float32 where it lies."""
    if not any(key.endswith(FP8_SCALE) for key in batch):
        return batch
    from trainers.data import fp8_to_float

    decoded = {}
    for key, value in batch.items():
        if key.endswith(FP8_SCALE):
            continue
        scale = batch.get(key + FP8_SCALE)
        decoded[key] = fp8_to_float(value, scale, torch.float32) if scale is not None else value
    return decoded


def open_export(root: Root, export_id: str, fields: list[str], cfg: DataConfig, seed: int,
                pins: dict[str, str] | None = None, shuffle: bool = True):
    """A ShardStream over ``fields`` of an export, pinned to ``pins`` (default: the export's own versions).

    Returns (stream, {field: version id} of the fields read that come from target versions).
    """
    from storage.exports import ExportStore
    from trainers.data import ShardStream

    index = ExportStore(root).index(export_id)
    missing = [f for f in fields if f not in index.fields]
    if missing:
        raise ValueError(f"export '{export_id}': no fields {missing} (it has {sorted(index.fields)})")
    versions = {f: index.versions[f] for f in fields if f in index.versions}
    stream = ShardStream(root, export_id, pins if pins is not None else versions, fields=fields, seed=seed,
                         shuffle_shards=cfg.shuffle_shards and shuffle,
                         shuffle_buffer=cfg.shuffle_buffer if shuffle else 0, verify=cfg.verify,
                         decode_fp8=not cfg.fp8_on_device)
    return stream, versions


def export_sample(root: Root, export_id: str, fields: list[str], clip: int | None = None,
                  verify: bool = True) -> dict[str, Any]:
    """One decoded sample of an export by plan row ``clip`` (default: the export's first sample)."""
    from pipelines.export import decode_sample
    from storage.exports import ExportStore

    store = ExportStore(root)
    index = store.index(export_id)
    for shard_position, shard in enumerate(index.shards):
        for position, shard_clip in enumerate(shard.clips):
            if clip is None or shard_clip == clip:
                _, members = store.read_sample(index, shard_position, position, verify=verify)
                where = f"export '{export_id}', clip {shard_clip}"
                return decode_sample(members, None, where, fields=fields)
    raise ValueError(f"export '{export_id}': no sample of clip {clip} (it has {index.num_samples} samples)")


def check_sample_versions(sample: dict[str, Any], trained: dict[str, str], allow_change: bool, where: str) -> None:
    """Refuse to run a model on fields of other target versions than it was trained on (unless allowed)."""
    given = sample["meta"].get("versions", {})
    changed = {f: (v, given.get(f)) for f, v in trained.items() if f in given and given[f] != v}
    if changed and not allow_change:
        raise ValueError(f"{where}: sample fields come from other target versions than the run was trained on "
                         f"(field: trained, given) {changed}; pass --allow-version-change to use them anyway")


def default_run_id(kind: str, identity: dict[str, Any]) -> str:
    """``<kind>-<12 hex>`` of what defines a run (not its length): rerunning the same command resumes it."""
    from schemas.target import content_id

    return content_id(kind, identity)


# ----------------------------------------------------------------------------------------------
# learning-rate schedules (callable objects, so LambdaLR stores and restores them)
# ----------------------------------------------------------------------------------------------
class WarmupSchedule:
    """LR multiplier: linear warm-up, then cosine / tri-stage (hold, cosine decay) / constant."""

    def __init__(self, total_steps: int, cfg: OptimConfig):
        self.total = max(1, total_steps)
        # A short run (a demo, a smoke test) still spends most of its steps at the peak LR.
        self.warmup = max(0, min(cfg.warmup_steps, self.total // 10))
        self.kind = cfg.schedule
        self.floor = cfg.min_lr_ratio
        self.hold = int(cfg.hold_fraction * (self.total - self.warmup)) if cfg.schedule == "tristage" else 0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        decay_start = self.warmup + self.hold
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, self.total - decay_start))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (biases, norms and 1-d parameters excluded)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


# ----------------------------------------------------------------------------------------------
# distributed + device
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_choice: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device_choice != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def resolve_device(choice: str, info: DistInfo) -> torch.device:
    """The torch device of this rank; ValueError when CUDA is asked for and absent."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(task: "TrainTask | None" = None) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if task is not None and task.generators():
        state["task"] = {name: gen.get_state() for name, gen in task.generators().items()}
    return state


def _set_rng_state(state: dict[str, Any], task: "TrainTask | None" = None) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("task", {})
    for name, gen in (task.generators() if task is not None else {}).items():
        if name in saved:
            gen.set_state(saved[name])
        else:
            log.warning("checkpoint holds no state of the task's '%s' generator: it restarts from its seed", name)


def seed_task_generators(task: "TrainTask", seed: int) -> None:
    """Seed each of the task's own generators from the rank's seed and the generator's name."""
    for name, gen in task.generators().items():
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (on every rank); [obj] without DDP."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# the task a trainer supplies
# ----------------------------------------------------------------------------------------------
class TrainTask(ABC):
    """What the loop trains: ``model`` (the trainable module), a loss and a held-out evaluation.

    ``loss`` receives the model as the loop runs it (DDP-wrapped under torchrun, so call it, don't
    reach into it) and a batch already on the device.
    """

    model: nn.Module

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Samples -> one batch (runs inside DataLoader workers). Default: stack the array fields."""
        return default_collate(samples)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        """The collate function handed to DataLoader workers. Workers started by forkserver receive it
        pickled, so override it with something that does not carry the model. Default: ``self.collate``."""
        return self.collate

    def to(self, device: torch.device) -> None:
        """Move the model and any frozen helpers to ``device``."""
        self.model.to(device)

    def prepare(self, batch: Any) -> Any:
        """Device-side preparation of a batch already on the device. Default: decode fp8-coded fields."""
        return decode_coded(batch) if isinstance(batch, dict) else batch

    def generators(self) -> dict[str, torch.Generator]:
        """The task's own random streams (name -> CPU generator), kept apart from torch's global one
        so that what they draw does not depend on anything else that draws. :func:`fit` seeds each
        from the rank's seed and its name, and every checkpoint holds their states, so a resumed
        run continues each stream exactly. Default: none."""
        return {}

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The scalar training loss of one batch."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Held-out metrics over ``batches`` (model in eval mode, no grad)."""


# ----------------------------------------------------------------------------------------------
# streams: batching with per-worker state, and an in-memory stream
# ----------------------------------------------------------------------------------------------
class MemoryStream(IterableDataset):
    """A resumable stream over in-memory samples, with ShardStream's protocol.

    Iterating yields the current epoch's part of this rank and DataLoader worker (a seeded
    per-epoch shuffle, split by rank then worker) from where it stopped; ``set_epoch`` selects the
    next epoch; ``state_dict()`` (inside a worker: that worker's position) and ``load_state_dict()``
    resume mid-epoch.
    """

    def __init__(self, samples: list[dict[str, Any]], seed: int = 0, rank: int = 0, world: int = 1):
        self.samples = samples
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.position = 0, 0

    def _part(self) -> list[int]:
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return order.tolist()[self.rank * workers + worker::self.world * workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        part = self._part()
        while self.position < len(part):
            self.position += 1
            yield self.samples[part[self.position - 1]]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class StatefulBatches(IterableDataset):
    """Batches of ``stream`` built inside each worker, each tagged with the worker's stream state."""

    def __init__(self, stream: IterableDataset, batch_size: int, collate: Callable[[list], Any],
                 resume: dict[str, Any] | None = None, slots: int = 0, pinned: bool = False):
        self.stream, self.batch_size, self.collate = stream, batch_size, collate
        self.resume = resume or {}
        # ``slots`` reusable buffers per producer (0: fresh memory per batch); ``collate`` must take ``slots=``.
        self.slots, self.pinned = slots, pinned

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info else 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self._worker()
        saved = self.resume.get("workers", {}).get(str(worker))
        if saved is not None:
            self.stream.load_state_dict(saved)
        if self.resume and worker < int(self.resume.get("next_worker", 0)):
            yield {"skip": True, "worker": worker}
        yield from self._batches(worker)

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        from trainers.slots import BatchSlots

        in_worker = get_worker_info() is not None
        ring = BatchSlots(self.slots, shared=in_worker, pinned=self.pinned and not in_worker) if self.slots else None
        samples: list[Any] = []
        empty_passes = 0
        while empty_passes < 2:  # one empty pass is an epoch that ended exactly at a batch boundary
            empty_passes += 1
            for sample in self.stream:
                empty_passes = 0
                samples.append(sample)
                if len(samples) == self.batch_size:
                    state = self.stream.state_dict()
                    taken = ring.next if ring is not None else 0
                    batch = self.collate(samples, slots=ring) if ring is not None else self.collate(samples)
                    reused = ring is not None and ring.next > taken
                    yield {"batch": batch, "worker": worker, "state": state, "slot": reused}
                    samples = []
            self.stream.set_epoch(self.stream.epoch + 1)
        raise ValueError(
            f"stream {type(self.stream).__name__}: worker {worker} received no samples; use fewer "
            f"DataLoader workers x ranks than the export has shards"
        )


class StreamCursor:
    """Main-process bookkeeping of which batches were consumed, per worker, for exact resume."""

    def __init__(self, num_workers: int, resume: dict[str, Any] | None):
        self.num_workers = max(1, num_workers)
        resume = resume or {}
        self.workers: dict[str, Any] = dict(resume.get("workers", {}))
        self.next_worker = int(resume.get("next_worker", 0))

    def consume(self, tag: dict[str, Any]) -> None:
        """Record that the batch tagged ``tag`` went into a training step."""
        self.workers[str(tag["worker"])] = tag["state"]
        self.next_worker = (tag["worker"] + 1) % self.num_workers

    def state(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "workers": self.workers, "next_worker": self.next_worker}


def batch_iterator(task: TrainTask, stream: IterableDataset, cfg: LoopConfig, pin: bool,
                   resume: dict[str, Any] | None, reuse: bool = False,
                   pin_buffers: bool = False) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Endless ``(batch, tag)`` pairs of ``stream``; pass each tag to ``StreamCursor.consume`` once used.

    ``pin``: the DataLoader pins each batch. ``reuse``: collate into reusable buffers when the task's
    collate takes them (page-locked ones in this process with ``pin_buffers``); a tag's ``slot``
    then says the batch lives in one, to be consumed through ``DevicePrefetcher``.
    """
    if resume and int(resume.get("num_workers", 1)) != max(1, cfg.num_workers):
        raise ValueError(
            f"checkpoint stream state was written with {resume.get('num_workers')} DataLoader workers; "
            f"resume with num_workers={resume.get('num_workers')} for an exact resume (got {cfg.num_workers})"
        )
    from trainers.data import worker_context
    from trainers.slots import slots_needed

    collate = task.collate_fn()
    slots = slots_needed(cfg.prefetch_factor, cfg.num_workers) if reuse and _takes_slots(collate) else 0
    batches = StatefulBatches(stream, cfg.batch_size, collate, resume, slots=slots, pinned=pin_buffers)
    loader = DataLoader(
        batches, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin and not slots,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        multiprocessing_context=worker_context() if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
    )
    # The workers start here, in the calling thread, not in whichever thread first asks for a batch.
    return _tagged(iter(loader))


def _takes_slots(collate: Callable) -> bool:
    import inspect

    try:
        return "slots" in inspect.signature(collate).parameters
    except (TypeError, ValueError):
        return False


def _tagged(items: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, dict[str, Any]]]:
    for item in items:
        if not item.get("skip"):
            yield item["batch"], {"worker": item["worker"], "state": item["state"], "slot": item["slot"]}


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors of a nested batch moved to ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


class DevicePrefetcher:
    """Yields ``(batch, tag)`` with the batch on ``device``, prepared ``depth`` batches ahead.

    On a GPU a background thread pulls host batches from the DataLoader and copies them on a side
    stream (the copy, pageable or pinned, blocks that thread, never the training loop); the training
    stream waits on the copy's event. On the CPU batches pass through in the caller's thread unless
    ``threaded`` is set.

    A batch tagged ``slot`` lives in a reusable buffer (trainers/slots.py): its storages are
    page-locked here once, and the thread waits for its copy to finish before it takes the next
    batch, which is what lets the producer overwrite the buffer later. On the CPU such a batch is
    cloned out of its buffer.
    """

    _END = object()

    def __init__(self, batches: Iterator[tuple[Any, Any]], device: torch.device, depth: int = 2,
                 threaded: bool | None = None):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # a bare "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.batches, self.device = batches, device
        self.stopping = threading.Event()
        self.thread = None
        from trainers.slots import HostRegistry

        self.registry = HostRegistry()
        if not (self.cuda if threaded is None else threaded):
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread = threading.Thread(target=self._copy_loop, name="device-prefetch", daemon=True)
        self.thread.start()

    def _copy_loop(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            for host, tag in self.batches:
                if self.stopping.is_set() or not self._put(self._move(host, tag)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(err)
            return
        self._put(self._END)

    def _move(self, host: Any, tag: Any) -> tuple[Any, Any, Any, Any]:
        reused = isinstance(tag, dict) and tag.get("slot")
        if not self.cuda:
            return (_cloned(host) if reused else host), tag, None, None
        if reused:
            self.registry.ensure(host)
        with torch.cuda.stream(self.stream):
            moved = to_device(host, self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if reused:
            done.synchronize()  # the buffer is free again before the producer can be asked for more
        # ``host`` rides along so pinned memory outlives its asynchronous copy.
        return moved, tag, done, host

    def _put(self, item: Any) -> bool:
        """Queue ``item``; False when the prefetcher is being closed."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self.thread is None:
            moved, tag, done, _ = self._move(*next(self.batches))
        else:
            item = self.queue.get()
            if item is self._END:
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            moved, tag, done, _ = item
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            _record_stream(moved, current)
        return moved, tag

    def close(self) -> None:
        """Stop the copy thread and the DataLoader workers now rather than at garbage collection."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer that gets unlocked
        self.registry.close()


def _cloned(batch: Any) -> Any:
    """A nested batch with every tensor copied out of its (reusable) buffer."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: _cloned(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cloned(v) for v in batch)
    return batch


def _record_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator the batch is used on ``stream`` (it was allocated on the copy stream)."""
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            _record_stream(value, stream)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _record_stream(value, stream)


# ----------------------------------------------------------------------------------------------
# run folder: checkpoints, run.json, metrics.jsonl
# ----------------------------------------------------------------------------------------------
class CheckpointInfo(StrictModel):
    """checkpoint.json of one ``step-N/`` folder: what was trained on what, and the stream position."""

    step: int = Field(description="Optimizer steps completed.")
    run_id: str = Field(description="Run this checkpoint belongs to.")
    kind: str = Field(description="Trainer kind, e.g. 'decoupler', 'action-expert', 'shallow-pi'.")
    export_id: str | None = Field(description="Export the run read (None for in-memory data).")
    target_versions: dict[str, str] = Field(description="Field (or role) -> target version id it was trained on.")
    config: dict[str, Any] = Field(description="The resolved run configuration.")
    world: int = Field(description="Number of DDP ranks that wrote the stream state.")
    stream: dict[str, Any] = Field(description="Per-rank stream cursor (rank -> worker states).")
    version_changes: list[dict[str, Any]] = Field(default_factory=list, description="Accepted version changes.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Last logged train and eval metrics.")
    files: dict[str, str] = Field(default_factory=dict, description="File name -> sha256.")
    created: str = Field(default="", description="UTC time the checkpoint was written.")


@dataclass
class RunSpec:
    """Identity of a run: where it lives and what it trains on (recorded in every checkpoint)."""

    root: Root
    run_id: str
    kind: str
    export_id: str | None
    target_versions: dict[str, str]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """``runs/<run_id>/`` under a data root: complete checkpoints, run.json and metrics.jsonl."""

    def __init__(self, root: Root, run_id: str):
        self.root, self.run_id = root, run_id
        self.rel = layout.run_dir(run_id)

    def step_rel(self, step: int) -> str:
        return f"{self.rel}/{STEP_PREFIX}{step}"

    def checkpoints(self) -> list[int]:
        """Steps of complete checkpoints, ascending (a folder without ``_COMPLETE`` does not count)."""
        steps = []
        for name in self.root.ls(self.rel):
            if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
                if self.root.exists(self.rel, name, layout.COMPLETE_MARKER):
                    steps.append(int(name[len(STEP_PREFIX):]))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.checkpoints()
        return steps[-1] if steps else None

    def clear_partial(self) -> None:
        """Remove temporary folders of checkpoints that never completed (a crash mid-write)."""
        for name in self.root.ls(self.rel):
            if name.startswith(".tmp-"):
                self.root.rm(self.rel, name)

    def save(self, info: CheckpointInfo, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> str:
        """Write ``step-N/`` under a temporary name, mark it complete, then rename it into place."""
        final = self.step_rel(info.step)
        if self.root.exists(final, layout.COMPLETE_MARKER):
            return final
        tmp = f"{self.rel}/.tmp-{STEP_PREFIX}{info.step}-{uuid.uuid4().hex[:8]}"
        blobs = {MODEL_FILE: safetensors.torch.save({k: v.contiguous() for k, v in model_state.items()}),
                 TRAINER_FILE: _torch_bytes(trainer_state)}
        for name, data in blobs.items():
            self.root.write_bytes_atomic(f"{tmp}/{name}", data)
        info.files = {name: _sha256(data) for name, data in blobs.items()}
        info.created = _now()
        self.root.write_json_atomic(f"{tmp}/{CHECKPOINT_JSON}", info.model_dump(mode="json"))
        self.root.write_json_atomic(f"{tmp}/{layout.COMPLETE_MARKER}", {"step": info.step})
        if self.root.exists(final):  # an incomplete leftover with the same name
            self.root.rm(final)
        self.root.rename(tmp, final)
        return final

    def info(self, step: int) -> CheckpointInfo:
        where = f"run {self.run_id} {STEP_PREFIX}{step}/{CHECKPOINT_JSON}"
        if not self.root.exists(self.step_rel(step), layout.COMPLETE_MARKER):
            raise ValueError(f"run {self.run_id}: no complete checkpoint {STEP_PREFIX}{step} under {self.root.url}")
        return validate(CheckpointInfo, self.root.read_json(self.step_rel(step), CHECKPOINT_JSON), where)

    def _read_verified(self, step: int, name: str, info: CheckpointInfo) -> bytes:
        data = self.root.read_bytes(self.step_rel(step), name)
        if _sha256(data) != info.files.get(name):
            raise ValueError(f"run {self.run_id} {STEP_PREFIX}{step}/{name}: sha256 does not match checkpoint.json")
        return data

    def load_model(self, step: int | None = None) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
        """(info, model state) of checkpoint ``step`` (default: the newest complete one), checksum verified."""
        step = self.latest() if step is None else step
        if step is None:
            raise ValueError(f"run {self.run_id}: no complete checkpoint under {self.root.url_of(self.rel)}")
        info = self.info(step)
        return info, safetensors.torch.load(self._read_verified(step, MODEL_FILE, info))

    def load(self, step: int) -> tuple[CheckpointInfo, dict[str, torch.Tensor], dict[str, Any]]:
        """(info, model state, trainer state) of a complete checkpoint; checksums verified."""
        info, model_state = self.load_model(step)
        data = self._read_verified(step, TRAINER_FILE, info)
        trainer_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return info, model_state, trainer_state

    def prune(self, keep_last: int) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints."""
        for step in self.checkpoints()[:-keep_last] if keep_last > 0 else []:
            self.root.rm(self.step_rel(step))

    def write_run_json(self, spec: RunSpec, version_changes: list[dict[str, Any]], status: str) -> None:
        self.root.write_json_atomic(f"{self.rel}/{RUN_JSON}", {
            "run_id": spec.run_id, "kind": spec.kind, "export_id": spec.export_id,
            "target_versions": spec.target_versions, "config": spec.config, "extra": spec.extra,
            "version_changes": version_changes, "status": status, "updated": _now(),
        })

    def read_run_json(self) -> dict[str, Any]:
        if not self.root.exists(self.rel, RUN_JSON):
            raise ValueError(f"run {self.run_id}: no {RUN_JSON} under {self.root.url_of(self.rel)}")
        return self.root.read_json(self.rel, RUN_JSON)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line; on resume, lines past the resumed step are dropped."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int):
        self.run, self.enabled = run, enabled
        self.rel = f"{run.rel}/{METRICS}"
        self.lines: list[str] = []
        if enabled and run.root.exists(self.rel):
            kept = [line for line in run.root.read_bytes(self.rel).decode().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.lines = kept
            run.root.write_bytes_atomic(self.rel, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=True)
        self.lines.append(line)
        if self.run.root.is_local:
            with open(self.run.root.path(self.rel), "a") as handle:
                handle.write(line + "\n")
        else:  # object stores cannot append: republish the (small) file
            self.run.root.write_bytes_atomic(self.rel, "".join(x + "\n" for x in self.lines).encode())


def read_metrics(root: Root, run_id: str) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl."""
    rel = f"{layout.run_dir(run_id)}/{METRICS}"
    if not root.exists(rel):
        return []
    return [json.loads(line) for line in root.read_bytes(rel).decode().splitlines() if line.strip()]


def check_versions(saved: CheckpointInfo, spec: RunSpec, allow_change: bool) -> list[dict[str, Any]]:
    """The version guard: refuse to resume on other target versions unless allowed; return the change log."""
    if saved.target_versions == spec.target_versions:
        return list(saved.version_changes)
    if not allow_change:
        changed = sorted(k for k in set(saved.target_versions) | set(spec.target_versions)
                         if saved.target_versions.get(k) != spec.target_versions.get(k))
        detail = ", ".join(f"{k}: {saved.target_versions.get(k)} -> {spec.target_versions.get(k)}" for k in changed)
        raise ValueError(
            f"run {spec.run_id}: {STEP_PREFIX}{saved.step} was trained on export {saved.export_id}, export "
            f"{spec.export_id} has other target versions ({detail}); pass --allow-version-change to "
            f"continue and record both"
        )
    change = {"step": saved.step, "from_export": saved.export_id, "from_versions": saved.target_versions,
              "to_export": spec.export_id, "to_versions": spec.target_versions, "at": _now()}
    log.warning("run %s: continuing on changed target versions (recorded): %s", spec.run_id, change)
    return list(saved.version_changes) + [change]


# ----------------------------------------------------------------------------------------------
# one rank's trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Model (DDP-wrapped under torchrun), AdamW, LR schedule and the training step of one rank."""

    def __init__(self, task: TrainTask, loop: LoopConfig, optim: OptimConfig, info: DistInfo, device: torch.device):
        self.task, self.loop, self.optim_cfg, self.info, self.device = task, loop, optim, info, device
        task.to(device)
        self.model: nn.Module = task.model
        if info.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(task.model, device_ids=ids)
        self.optimizer = build_optimizer(task.model, optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupSchedule(loop.steps, optim))
        self.autocast = device.type == "cuda" and loop.bf16
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        self.step = 0

    def autocast_context(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def train_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a device batch; returns (loss, grad norm) as device tensors (no sync)."""
        self.model.train()
        batch = self.task.prepare(batch)
        with self.autocast_context():
            loss = self.task.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.detach().float(), grad_norm.detach().float()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """The task's held-out metrics (eval mode, autocast as in training), averaged over ranks."""
        self.task.model.eval()
        with self.autocast_context():
            metrics = self.task.evaluate(self.task.model, batches)
        self.task.model.train()
        if self.info.world > 1:
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            metrics = dict(zip(keys, (values / self.info.world).tolist()))
        return metrics

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state(self, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.task.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a pure function of the step and the current config (a longer --steps stretches it).
        schedule = WarmupSchedule(self.loop.steps, self.optim_cfg)
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------------
# fit: the whole run
# ----------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What a finished run reports."""

    run_id: str
    step: int
    resumed_from: int | None
    train: dict[str, float]
    eval: dict[str, float]
    checkpoint: str | None


@dataclass
class _Resume:
    step: int = 0
    stream: dict[str, Any] | None = None
    version_changes: list[dict[str, Any]] = field(default_factory=list)
    from_step: int | None = None


def _restore(trainer: Trainer, run: RunDir, spec: RunSpec, allow_change: bool) -> _Resume:
    """Load the newest complete checkpoint of the run (if any) into the trainer; apply the version guard."""
    latest = run.latest()
    if latest is None:
        return _Resume()
    info, model_state, state = run.load(latest)
    if info.world != trainer.info.world:
        raise ValueError(
            f"run {spec.run_id}: {STEP_PREFIX}{latest} was written by {info.world} ranks; resume with the same "
            f"number of ranks ({trainer.info.world} now) so every rank continues its own shards"
        )
    changes = check_versions(info, spec, allow_change)
    trainer.load_state(model_state, state)
    rank = str(trainer.info.rank)
    _set_rng_state(state["rng"][rank], trainer.task)
    stream_state = None
    if info.export_id == spec.export_id:
        stream_state = info.stream.get(rank)
    else:  # another export has other shards: its positions mean nothing here, start it afresh
        log.warning("run %s: export changed (%s -> %s); the stream starts from the beginning",
                    spec.run_id, info.export_id, spec.export_id)
    log.info("run %s: resumed from %s%d", spec.run_id, STEP_PREFIX, latest)
    return _Resume(step=latest, stream=stream_state, version_changes=changes, from_step=latest)


def _save(trainer: Trainer, run: RunDir, spec: RunSpec, cursor: StreamCursor, resume: _Resume,
          metrics: dict[str, Any]) -> str | None:
    """Gather every rank's stream cursor and RNG state; rank 0 writes the checkpoint."""
    streams = _gather(cursor.state(), trainer.info)
    rngs = _gather(_rng_state(trainer.task), trainer.info)
    path = None
    if trainer.info.is_main:
        info = CheckpointInfo(
            step=trainer.step, run_id=spec.run_id, kind=spec.kind, export_id=spec.export_id,
            target_versions=spec.target_versions, config=spec.config, world=trainer.info.world,
            stream={str(r): s for r, s in enumerate(streams)}, version_changes=resume.version_changes,
            metrics=metrics,
        )
        state = trainer.state() | {"rng": {str(r): s for r, s in enumerate(rngs)}}
        path = run.save(info, trainer.task.model.state_dict(), state)
        run.prune(trainer.loop.keep_last)
    if trainer.info.world > 1:
        dist.barrier()
    return path


def _eval_batches(task: TrainTask, stream: IterableDataset, initial: dict[str, Any], cfg: LoopConfig,
                  device: torch.device) -> Iterator[Any]:
    """Up to ``eval_batches`` batches of one epoch of the held-out stream, the same ones every time."""
    stream.load_state_dict(initial)
    samples: list[Any] = []
    batches = 0
    for sample in stream:
        samples.append(sample)
        if len(samples) == cfg.batch_size:
            yield task.prepare(to_device(task.collate(samples), device))
            samples, batches = [], batches + 1
            if batches == cfg.eval_batches:
                return
    if samples:
        yield task.prepare(to_device(task.collate(samples), device))


class _Progress:
    """A tqdm line on rank 0 when enabled and stderr is a terminal."""

    def __init__(self, cfg: LoopConfig, info: DistInfo, start: int, desc: str):
        import sys

        from tqdm import tqdm

        enabled = cfg.progress and info.is_main and sys.stderr.isatty() and not os.environ.get("FORESIGHT_QUIET")
        self.bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, disable=not enabled)

    def update(self, metrics: dict[str, float] | None) -> None:
        self.bar.update(1)
        if metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.2e}")

    def close(self) -> None:
        self.bar.close()


def _interval_metrics(trainer: Trainer, pending: list[tuple[torch.Tensor, torch.Tensor]], elapsed: float) -> dict:
    """Mean loss / grad norm of the steps since the last log line (averaged over ranks); one sync."""
    stacked = torch.stack([torch.stack(pair) for pair in pending]).mean(0)
    if trainer.info.world > 1:
        dist.all_reduce(stacked)
        stacked /= trainer.info.world
    loss, grad_norm = stacked.tolist()
    if not math.isfinite(loss):
        raise ValueError(f"training diverged: loss is {loss} at step {trainer.step}")
    samples = len(pending) * trainer.loop.batch_size * trainer.info.world
    return {"step": trainer.step, "split": "train", "loss": loss, "grad_norm": grad_norm,
            "lr": trainer.scheduler.get_last_lr()[0], "samples_per_s": samples / max(elapsed, 1e-9)}


def _emit_lineage(spec: RunSpec, step: int, status: str, metrics: dict[str, Any]) -> None:
    """A lineage event: this run (output) was trained on this export and these versions (inputs)."""
    from storage import lineage

    inputs = ([spec.export_id] if spec.export_id else []) + sorted(set(spec.target_versions.values()))
    lineage.emit(spec.root, f"train.{spec.kind}", spec.run_id, inputs=inputs, outputs=[spec.run_id],
                 facets={"step": step, "status": status, "metrics": metrics})


def fit(task: TrainTask, stream: IterableDataset, spec: RunSpec, loop: LoopConfig, optim: OptimConfig,
        eval_stream: IterableDataset | None = None, allow_version_change: bool = False,
        stop_at: int | None = None) -> FitResult:
    """Train ``task`` on ``stream`` for ``loop.steps`` steps, resuming the run's newest complete checkpoint.

    ``stop_at`` ends this invocation early at that step (with a checkpoint), as a preempted job
    would; running again resumes there with the same schedule. Every rank builds its own ``stream``
    (ShardStream splits shards by rank); ``eval_stream`` is the held-out split.
    """
    info = init_distributed(loop.device)
    device = resolve_device(loop.device, info)
    seed_everything(loop.seed + info.rank)
    seed_task_generators(task, loop.seed + info.rank)
    trainer = Trainer(task, loop, optim, info, device)
    run = RunDir(spec.root, spec.run_id)
    if info.is_main:
        run.clear_partial()
    resume = _restore(trainer, run, spec, allow_version_change)
    end = min(loop.steps, stop_at) if stop_at is not None else loop.steps
    state = _RunState(trainer, run, spec, resume, MetricsLog(run, info.is_main, resume.step), eval_stream)
    if trainer.step < end:
        if info.is_main:
            run.write_run_json(spec, resume.version_changes, status="running")
        cuda = device.type == "cuda"
        reuse = cuda if loop.reuse_buffers is None else loop.reuse_buffers
        batches = DevicePrefetcher(batch_iterator(task, stream, loop, loop.pin_memory and cuda, resume.stream,
                                                  reuse=reuse, pin_buffers=cuda), device)
        progress = _Progress(loop, info, trainer.step, spec.kind)
        try:
            while trainer.step < end:
                batch, tag = next(batches)
                state.cursor.consume(tag)
                state.pending.append(trainer.train_step(batch))
                progress.update(state.after_step(final=trainer.step == end))
        finally:
            progress.close()
            batches.close()
    if info.is_main:
        status = "finished" if trainer.step >= loop.steps else "stopped"
        run.write_run_json(spec, resume.version_changes, status=status)
        _emit_lineage(spec, trainer.step, status, state.last_train | state.last_eval)
    checkpoint = state.checkpoint or run.step_rel(trainer.step)
    return FitResult(spec.run_id, trainer.step, resume.from_step, state.last_train, state.last_eval, checkpoint)


class _RunState:
    """What the loop keeps between steps: pending losses, last metrics, the stream cursor, timing."""

    def __init__(self, trainer: Trainer, run: RunDir, spec: RunSpec, resume: _Resume, metrics: MetricsLog,
                 eval_stream: IterableDataset | None):
        self.trainer, self.run, self.spec, self.resume, self.metrics = trainer, run, spec, resume, metrics
        self.eval_stream = eval_stream
        self.eval_initial = eval_stream.state_dict() if eval_stream is not None else None
        self.cursor = StreamCursor(trainer.loop.num_workers, resume.stream)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.checkpoint: str | None = None
        self.tick = time.perf_counter()

    def after_step(self, final: bool) -> dict[str, float] | None:
        """Log, evaluate and checkpoint when due; returns the metrics line when one was written."""
        trainer, loop = self.trainer, self.trainer.loop
        logged = None
        if trainer.step % loop.log_every == 0 or final:
            logged = self.last_train = _interval_metrics(trainer, self.pending, time.perf_counter() - self.tick)
            self.metrics.write(logged)
            self.pending = []
        paused = time.perf_counter()
        if self.eval_stream is not None and ((loop.eval_every and trainer.step % loop.eval_every == 0) or final):
            batches = _eval_batches(trainer.task, self.eval_stream, self.eval_initial, loop, trainer.device)
            self.last_eval = trainer.evaluate(batches)
            self.metrics.write({"step": trainer.step, "split": "val", **self.last_eval})
        if trainer.step % loop.checkpoint_every == 0 or final:
            self.checkpoint = _save(trainer, self.run, self.spec, self.cursor, self.resume,
                                    {"train": self.last_train, "eval": self.last_eval})
        # samples/s counts training steps only: evaluation and saving move the interval's start.
        self.tick = time.perf_counter() if logged is not None else self.tick + time.perf_counter() - paused
        return logged
