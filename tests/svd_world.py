"""Inputs of the tiny SVD shared by the SVD tests: uint8 start frames and text states drawn from
one seeded generator (frames first, then text), so a test's inputs are fixed by its seed."""

from __future__ import annotations

import numpy as np

TEXT_TOKENS, TEXT_DIM = 20, 16
"""The tiny text encoder's states per clip: (tokens, width)."""


def random_clips(seed: int, clips: int, height: int = 32, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(start frames (B, H, W, 3) uint8, text states (B, L, D) float32) of ``clips`` clips."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(clips, height, width, 3), dtype=np.uint8)
    text = rng.normal(size=(clips, TEXT_TOKENS, TEXT_DIM)).astype(np.float32)
    return frames, text


def two_clips() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The speed-setting tests' inputs (speed, attention, cross context): two 32 x 32 clips and
    their noise seeds."""
    return (*random_clips(3, 2), np.array([11, 12], dtype=np.int64))
