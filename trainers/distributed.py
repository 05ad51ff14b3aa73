"""Where a process sits in a torchrun job, its device, and the seeds and RNG states a checkpoint keeps."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from foresight.trainers.task import TrainTask

log = logging.getLogger(__name__)


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


def rng_state(task: "TrainTask | None" = None) -> dict[str, Any]:
    """The RNG states a checkpoint keeps: torch CPU, CUDA (when in use) and the task's own generators."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if task is not None and task.generators():
        state["task"] = {name: gen.get_state() for name, gen in task.generators().items()}
    return state


def set_rng_state(state: dict[str, Any], task: "TrainTask | None" = None) -> None:
    """Restore what :func:`rng_state` took; a task generator the state does not hold restarts from its seed."""
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


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (on every rank); [obj] without DDP."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out

