"""Pure audit maths: recipe differences, array drift between two versions, array statistics.

Nothing here reads a store: callers pass recipe dicts and clip batches (``(B, ...)`` arrays whose
first axis is the clip), so the same code serves the CLI, reports and tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from foresight.schemas.base import StrictModel

COSINE_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
"""Quantiles of the per-clip cosine similarity that a drift report lists (0 = min, 1 = max)."""


# recipe differences ---------------------------------------------------------------------------
class FieldChange(StrictModel):
    """One field that differs between two records, by dotted path."""

    path: str = Field(description="Dotted path of the field, e.g. 'params.steps' or 'model.weights_sha256.x'.")
    a: Any = Field(default=None, description="Value in the first record (None when absent).")
    b: Any = Field(default=None, description="Value in the second record (None when absent).")
    only_in: str | None = Field(default=None, description="'a' or 'b' when the field exists on one side only.")


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted path: leaf}; lists and scalars are leaves, an empty dict is a leaf too."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def record_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[FieldChange]:
    """Every dotted field whose value differs between ``a`` and ``b`` (sorted by path)."""
    flat_a, flat_b = flatten(a), flatten(b)
    changes = []
    for path in sorted(set(flat_a) | set(flat_b)):
        if path not in flat_b:
            changes.append(FieldChange(path=path, a=flat_a[path], only_in="a"))
        elif path not in flat_a:
            changes.append(FieldChange(path=path, b=flat_b[path], only_in="b"))
        elif flat_a[path] != flat_b[path]:
            changes.append(FieldChange(path=path, a=flat_a[path], b=flat_b[path]))
    return changes


# sampling -------------------------------------------------------------------------------------
def sample_clip_indices(num_clips: int, sample: int | None, seed: int = 0) -> np.ndarray:
    """Sorted clip indices: all clips when ``sample`` is None or covers them, else a seeded subset."""
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    if sample is None or sample >= num_clips:
        return np.arange(num_clips, dtype=np.int64)
    if sample < 1:
        raise ValueError(f"--sample must be at least 1, got {sample}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_clips, size=sample, replace=False)).astype(np.int64)


def spread_indices(count: int, pick: int) -> list[int]:
    """``pick`` indices spread evenly over ``range(count)``, first and last included."""
    if count <= 0 or pick <= 0:
        return []
    if pick >= count:
        return list(range(count))
    if pick == 1:
        return [0]
    return sorted({round(i * (count - 1) / (pick - 1)) for i in range(pick)})


# drift between two arrays ---------------------------------------------------------------------
class DriftStats(StrictModel):
    """How far array B has drifted from array A (A is the reference) over the compared clips."""

    clips: int = Field(description="Number of clips compared.")
    elements: int = Field(description="Number of elements compared.")
    mean_abs_diff: float = Field(description="Mean of |a - b| over all elements.")
    max_abs_diff: float = Field(description="Max of |a - b| over all elements.")
    rel_l2: float = Field(description="||a - b|| / ||a|| over all elements (0 when equal).")
    cosine: dict[str, float] = Field(description="Per-clip cosine similarity: quantiles ('q0'..'q1') and 'mean'.")
    nonfinite_a: int = Field(default=0, description="NaN/inf elements in A (they make the stats NaN).")
    nonfinite_b: int = Field(default=0, description="NaN/inf elements in B.")


class DriftAccumulator:
    """Streams clip batches of two same-shape arrays and accumulates drift statistics in float64."""

    def __init__(self) -> None:
        self.clips = 0
        self.elements = 0
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.nonfinite_a = 0
        self.nonfinite_b = 0
        self.cosines: list[float] = []

    def update(self, a_B: np.ndarray, b_B: np.ndarray) -> None:
        """Add one batch: ``a_B`` and ``b_B`` are (B, ...) with the clip on the first axis."""
        if a_B.shape != b_B.shape:
            raise ValueError(f"drift: batch shapes differ, {a_B.shape} vs {b_B.shape}")
        a = np.asarray(a_B, dtype=np.float64).reshape(len(a_B), -1)
        b = np.asarray(b_B, dtype=np.float64).reshape(len(b_B), -1)
        diff = a - b
        self.clips += a.shape[0]
        self.elements += diff.size
        self.abs_sum += float(np.abs(diff).sum())
        if diff.size:
            self.abs_max = max(self.abs_max, float(np.abs(diff).max()))
        self.diff_sq += float(np.square(diff).sum())
        self.ref_sq += float(np.square(a).sum())
        self.nonfinite_a += int((~np.isfinite(a)).sum())
        self.nonfinite_b += int((~np.isfinite(b)).sum())
        self.cosines.extend(per_clip_cosine(a, b).tolist())

    def result(self) -> DriftStats:
        """The statistics of everything added so far."""
        if self.clips == 0:
            raise ValueError("drift: no clips were compared")
        if self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq / self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else math.inf
        cos = np.asarray(self.cosines)
        summary = {f"q{q:g}": float(np.quantile(cos, q)) for q in COSINE_QUANTILES}
        summary["mean"] = float(cos.mean())
        return DriftStats(clips=self.clips, elements=self.elements, mean_abs_diff=self.abs_sum / self.elements,
                          max_abs_diff=self.abs_max, rel_l2=rel, cosine=summary,
                          nonfinite_a=self.nonfinite_a, nonfinite_b=self.nonfinite_b)


def per_clip_cosine(a_BD: np.ndarray, b_BD: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair; 1 when both rows are zero, 0 when exactly one is."""
    dot = (a_BD * b_BD).sum(axis=1)
    norm_a = np.sqrt(np.square(a_BD).sum(axis=1))
    norm_b = np.sqrt(np.square(b_BD).sum(axis=1))
    both_zero = (norm_a == 0) & (norm_b == 0)
    denom = np.where(norm_a * norm_b > 0, norm_a * norm_b, 1.0)
    cos = np.where(norm_a * norm_b > 0, dot / denom, 0.0)
    return np.where(both_zero, 1.0, cos)


# statistics of one array ----------------------------------------------------------------------
class ArrayStats(StrictModel):
    """Summary of the values of one array over the sampled clips."""

    clips: int = Field(description="Clips the statistics were computed over.")
    elements: int
    mean: float
    std: float
    min: float
    max: float
    abs_mean: float = Field(description="Mean of |x|.")
    zero_fraction: float = Field(description="Fraction of elements exactly 0 (e.g. unwritten fill values).")
    nonfinite: int = Field(description="NaN or inf elements (excluded from the other statistics).")


class StatsAccumulator:
    """Streams clip batches of one array and accumulates :class:`ArrayStats` in float64."""

    def __init__(self) -> None:
        self.clips = self.elements = self.count = self.zeros = self.nonfinite = 0
        self.total = self.total_sq = self.total_abs = 0.0
        self.low, self.high = math.inf, -math.inf

    def update(self, x_B: np.ndarray) -> None:
        """Add one (B, ...) batch of clips."""
        x = np.asarray(x_B, dtype=np.float64).reshape(-1)
        finite = x[np.isfinite(x)]
        self.clips += len(x_B)
        self.elements += x.size
        self.nonfinite += x.size - finite.size
        self.count += finite.size
        self.zeros += int((finite == 0).sum())
        self.total += float(finite.sum())
        self.total_sq += float(np.square(finite).sum())
        self.total_abs += float(np.abs(finite).sum())
        if finite.size:
            self.low, self.high = min(self.low, float(finite.min())), max(self.high, float(finite.max()))

    def result(self) -> ArrayStats:
        if self.count == 0:
            nan = math.nan
            return ArrayStats(clips=self.clips, elements=self.elements, mean=nan, std=nan, min=nan, max=nan,
                              abs_mean=nan, zero_fraction=nan, nonfinite=self.nonfinite)
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return ArrayStats(clips=self.clips, elements=self.elements, mean=mean, std=math.sqrt(var), min=self.low,
                          max=self.high, abs_mean=self.total_abs / self.count,
                          zero_fraction=self.zeros / self.count, nonfinite=self.nonfinite)


def array_stats(x_B: np.ndarray) -> ArrayStats:
    """Statistics of one in-memory (B, ...) clip batch."""
    acc = StatsAccumulator()
    acc.update(x_B)
    return acc.result()
