"""The training loop every foresight trainer shares: :class:`Trainer` (one rank's step) and :func:`fit` (a run).

A trainer supplies a :class:`trainers.task.TrainTask` (the trainable model, a batch -> loss function
and a held-out evaluation) and a resumable stream (an ``IterableDataset`` with ``state_dict`` /
``load_state_dict``, e.g. ``trainers.data.ShardStream``); :func:`fit` does the rest:

- AdamW, gradient clipping, warm-up + cosine (or tri-stage) learning rate (trainers/schedule.py),
  bf16 autocast on a GPU;
- ``runs/<run_id>/step-<N>/`` checkpoints in the run store (storage/runs.py: model, optimizer,
  scheduler, RNG and loader state, step, resolved config, export id, target version ids); the last
  ``keep_last`` complete ones stay;
- exact resume: stopping at step N and resuming gives the same losses as an uninterrupted run (the
  loader's state_dict, trainers/batching.py, and every rank's RNG states are in the checkpoint);
- ``metrics.jsonl`` (one JSON line per log interval and per evaluation) and a tqdm line;
- DDP under ``torchrun`` (each rank reads its own shards of the stream);
- a version guard: a run refuses to resume on an export whose target versions differ from the
  checkpoint's unless ``allow_version_change`` is set, and then records both.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import IterableDataset

from foresight.storage import layout
from foresight.storage.runs import CheckpointInfo, MetricsLog, RunDir, RunSpec, utc_now
from foresight.trainers.batching import ResumableLoader
from foresight.trainers.config import LoopConfig, OptimConfig
from foresight.trainers.distributed import (DistInfo, gather_objects, init_distributed, resolve_device, rng_state,
                                  seed_everything, seed_task_generators, set_rng_state)
from foresight.trainers.prefetch import to_device
from foresight.trainers.schedule import WarmupSchedule, build_optimizer
from foresight.trainers.task import TrainTask

log = logging.getLogger(__name__)


def check_versions(saved: CheckpointInfo, spec: RunSpec, allow_change: bool) -> list[dict[str, Any]]:
    """The version guard: refuse to resume on other target versions unless allowed; return the change log."""
    if saved.target_versions == spec.target_versions:
        return list(saved.version_changes)
    if not allow_change:
        changed = sorted(k for k in set(saved.target_versions) | set(spec.target_versions)
                         if saved.target_versions.get(k) != spec.target_versions.get(k))
        detail = ", ".join(f"{k}: {saved.target_versions.get(k)} -> {spec.target_versions.get(k)}" for k in changed)
        raise ValueError(
            f"run {spec.run_id}: {layout.step_name(saved.step)} was trained on export {saved.export_id}, export "
            f"{spec.export_id} has other target versions ({detail}); pass --allow-version-change to "
            f"continue and record both"
        )
    change = {"step": saved.step, "from_export": saved.export_id, "from_versions": saved.target_versions,
              "to_export": spec.export_id, "to_versions": spec.target_versions, "at": utc_now()}
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
    where = f"run {spec.run_id}: {layout.step_name(latest)}"
    if info.run_id != spec.run_id or info.kind != spec.kind:
        raise ValueError(f"{where} belongs to run '{info.run_id}' ({info.kind}), not this {spec.kind} run; it "
                         "was copied or moved here, refusing to resume from it")
    if info.world != trainer.info.world:
        raise ValueError(
            f"{where} was written by {info.world} ranks; resume with the same "
            f"number of ranks ({trainer.info.world} now) so every rank continues its own shards"
        )
    changes = check_versions(info, spec, allow_change)
    try:
        trainer.load_state(model_state, state)
    except (RuntimeError, KeyError, ValueError) as err:  # torch's state-dict mismatch: pages of key names
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ValueError(f"{where} does not fit this run's model or optimizer (written with another size or "
                         f"architecture?): {first}") from None
    rank = str(trainer.info.rank)
    set_rng_state(state["rng"][rank], trainer.task)
    stream_state = None
    if info.export_id == spec.export_id:
        stream_state = info.stream.get(rank)
    else:  # another export has other shards: its positions mean nothing here, start it afresh
        log.warning("run %s: export changed (%s -> %s); the stream starts from the beginning",
                    spec.run_id, info.export_id, spec.export_id)
    log.info("run %s: resumed from %s", spec.run_id, layout.step_name(latest))
    return _Resume(step=latest, stream=stream_state, version_changes=changes, from_step=latest)


def _save(trainer: Trainer, run: RunDir, spec: RunSpec, loader: ResumableLoader, resume: _Resume,
          metrics: dict[str, Any]) -> str | None:
    """Gather every rank's loader state and RNG state; rank 0 writes the checkpoint."""
    streams = gather_objects(loader.state_dict(), trainer.info)
    rngs = gather_objects(rng_state(trainer.task), trainer.info)
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
    from foresight.schemas import refs
    from foresight.storage import lineage

    inputs = [refs.export(spec.export_id)] if spec.export_id else []
    inputs += map(refs.version, sorted(set(spec.target_versions.values())))
    lineage.emit(spec.root, f"train.{spec.kind}", spec.run_id, inputs=inputs, outputs=[refs.run(spec.run_id)],
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
        _train_until(end, state, stream)
    if info.is_main:
        status = "finished" if trainer.step >= loop.steps else "stopped"
        run.write_run_json(spec, resume.version_changes, status=status)
        _emit_lineage(spec, trainer.step, status, state.last_train | state.last_eval)
    checkpoint = state.checkpoint or run.step_rel(trainer.step)
    return FitResult(spec.run_id, trainer.step, resume.from_step, state.last_train, state.last_eval, checkpoint)


def _train_until(end: int, state: "_RunState", stream: IterableDataset) -> None:
    """Train steps until ``end``, reading ``stream`` through a loader resumed from the checkpoint's state."""
    trainer = state.trainer
    loader = ResumableLoader(trainer.task.collate_fn(), stream, trainer.loop, trainer.device)
    if state.resume.stream:
        loader.load_state_dict(state.resume.stream)
    state.loader = iter(loader)  # the workers start here, in this thread
    progress = _Progress(trainer.loop, trainer.info, trainer.step, state.spec.kind)
    try:
        while trainer.step < end:
            state.pending.append(trainer.train_step(next(loader)))
            progress.update(state.after_step(final=trainer.step == end))
    finally:
        progress.close()
        loader.close()


class _RunState:
    """What the loop keeps between steps: pending losses, last metrics, the loader, timing."""

    def __init__(self, trainer: Trainer, run: RunDir, spec: RunSpec, resume: _Resume, metrics: MetricsLog,
                 eval_stream: IterableDataset | None):
        self.trainer, self.run, self.spec, self.resume, self.metrics = trainer, run, spec, resume, metrics
        self.eval_stream = eval_stream
        self.eval_initial = eval_stream.state_dict() if eval_stream is not None else None
        self.loader: ResumableLoader | None = None  # set by fit once the loader runs
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
            self.checkpoint = _save(trainer, self.run, self.spec, self.loader, self.resume,
                                    {"train": self.last_train, "eval": self.last_eval})
        # samples/s counts training steps only: evaluation and saving move the interval's start.
        self.tick = time.perf_counter() if logged is not None else self.tick + time.perf_counter() - paused
        return logged
