"""The task a trainer supplies to :func:`trainers.loop.fit`: the trainable model, a loss and a held-out evaluation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from foresight.trainers.exports import decode_coded


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

