"""The configuration of a training run: optimizer + schedule, the loop, and how the export is read.

Every trainer's run config (trainers/decoupler.py, action_expert.py, shallow_pi.py) nests these;
``load_config`` reads one from TOML with command-line overrides on top.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from foresight.schemas.base import StrictModel, validate
from foresight.storage.targets import verify_by_default


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

    steps: int = Field(1000, ge=1, description="Total optimizer steps of the run.")
    batch_size: int = Field(8, ge=1, description="Samples per step on each rank.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0 = read in the main process).")
    prefetch_factor: int = Field(2, ge=1, description="Batches each worker keeps ready.")
    pin_memory: bool = Field(False, description="Pin host batches before the GPU copy (one more host copy); "
                                                "batches collated into reusable buffers are page-locked already.")
    reuse_buffers: bool | None = Field(None, description="Collate into a few reusable page-locked buffers per "
                                                         "worker instead of fresh memory per batch (trainers/"
                                                         "slots.py). None: on with CUDA.")
    seed: int = Field(0, description="Seed of initialisation, dropout and noise (rank r uses seed + r).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on the CPU).")
    log_every: int = Field(10, ge=1, description="Write a metrics line every this many steps.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every this many steps (0 = only at the end).")
    eval_batches: int = Field(4, ge=1, description="Batches per held-out evaluation.")
    checkpoint_every: int = Field(500, ge=1, description="Write step-N/ every this many steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Complete checkpoints to keep.")
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
        for depth, key in enumerate(parents, 1):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{where}: '{'.'.join(parents[:depth])}' must be a table (it holds "
                                 f"{node!r}), so '{dotted}' cannot be set")
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

