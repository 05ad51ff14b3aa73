"""The optimizer and its learning-rate schedule (a callable object, so LambdaLR stores and restores it)."""

from __future__ import annotations

import math

import torch
from torch import nn

from foresight.trainers.config import OptimConfig


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

