"""Normalisation statistics of low-dim columns: computed per episode, aggregated per dataset.

Mean and standard deviation aggregate exactly (Chan's parallel update of counts, means and
squared deviations); min and max exactly. Quantiles cannot be merged from two numbers, so each
episode keeps its quantile function on a grid of probabilities, and the dataset q01/q99 are
the quantiles of the frame-weighted mixture of those functions (exact for a single episode,
within the grid's resolution otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from foresight.schemas.dataset import ColumnStats

QUANTILE_GRID = np.unique(np.round(np.concatenate(
    [np.linspace(0.0, 1.0, 101), np.linspace(0.0, 0.02, 21), np.linspace(0.98, 1.0, 21)]), 12))
"""Probabilities each episode keeps its quantiles at: every 1%, and every 0.1% in both 2% tails,
where q01 and q99 of a mixture are decided."""
LOW_Q, HIGH_Q = 0.01, 0.99
_BISECTION_STEPS = 60


@dataclass
class EpisodeStats:
    """Statistics of one column over one episode; vectors are per flattened element (D,)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    """Sum of squared deviations from the mean."""
    min: np.ndarray
    max: np.ndarray
    quantiles_KD: np.ndarray
    """Values at QUANTILE_GRID, (K, D)."""


def episode_stats(values: np.ndarray) -> EpisodeStats:
    """Statistics of a (T, ...) column; elements are flattened to (T, D) and computed in float64."""
    flat_TD = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    if len(flat_TD) == 0:
        raise ValueError("cannot compute statistics of an empty episode")
    mean = flat_TD.mean(axis=0)
    return EpisodeStats(
        count=len(flat_TD), mean=mean, m2=((flat_TD - mean) ** 2).sum(axis=0),
        min=flat_TD.min(axis=0), max=flat_TD.max(axis=0),
        quantiles_KD=np.quantile(flat_TD, QUANTILE_GRID, axis=0),
    )


def aggregate(parts: list[EpisodeStats]) -> ColumnStats:
    """Dataset statistics of one column from its per-episode statistics."""
    if not parts:
        raise ValueError("cannot aggregate statistics of zero episodes")
    return aggregate_columns({"": parts})[""]


def aggregate_columns(parts_by_column: dict[str, list[EpisodeStats]]) -> dict[str, ColumnStats]:
    """Dataset statistics of every column from its per-episode statistics, the same bit for bit as
    :func:`aggregate` of each, with the q01/q99 bisections of all columns run as one.

    Each bisection step evaluates one mixture CDF for every (column, quantile) at once instead of
    one per column and quantile (240 small numpy passes for two columns: most of the statistics'
    cost, which does not grow with the data).
    """
    for name, parts in parts_by_column.items():
        if not parts:
            raise ValueError(f"cannot aggregate statistics of zero episodes (column '{name}')")
    quantiles = _mixture_quantiles({(name, p): parts for name, parts in parts_by_column.items()
                                    for p in (LOW_Q, HIGH_Q)})
    return {name: _column_stats(parts, quantiles[name, LOW_Q], quantiles[name, HIGH_Q])
            for name, parts in parts_by_column.items()}


def _column_stats(parts: list[EpisodeStats], q01_D: np.ndarray, q99_D: np.ndarray) -> ColumnStats:
    counts_E = np.array([p.count for p in parts], dtype=np.float64)
    means_ED = np.stack([p.mean for p in parts])
    total = counts_E.sum()
    mean_D = (counts_E[:, None] * means_ED).sum(axis=0) / total
    m2_D = sum(p.m2 for p in parts) + (counts_E[:, None] * (means_ED - mean_D) ** 2).sum(axis=0)
    return ColumnStats(
        mean=mean_D.tolist(), std=np.sqrt(m2_D / total).tolist(),
        min=np.min([p.min for p in parts], axis=0).tolist(), max=np.max([p.max for p in parts], axis=0).tolist(),
        q01=q01_D.tolist(), q99=q99_D.tolist(), count=int(total),
    )


def _mixture_quantiles(jobs: dict[tuple[str, float], list[EpisodeStats]]) -> dict[tuple[str, float], np.ndarray]:
    """The ``p`` quantile of each (column, p) job's mixture; jobs with the same episode weights are
    bisected together, their elements side by side along D.

    Side by side is exact because every step is elementwise in D except the weighted sum over
    episodes, which numpy adds in episode order whatever D is -- except for one element (D == 1)
    and 8 or more episodes, where it sums pairwise: such a job is bisected alone, as before.
    """
    batches: dict[Any, list[tuple[str, float]]] = {}
    for job, parts in jobs.items():
        weights_E = np.array([p.count for p in parts], dtype=np.float64)
        alone = parts[0].quantiles_KD.shape[1] == 1 and len(parts) >= 8
        batches.setdefault(job if alone else (len(parts), (weights_E / weights_E.sum()).tobytes()), []).append(job)
    out: dict[tuple[str, float], np.ndarray] = {}
    for members in batches.values():
        parts_by_job = [jobs[job] for job in members]
        counts_E = np.array([p.count for p in parts_by_job[0]], dtype=np.float64)
        quantiles_EKD = np.concatenate([np.stack([p.quantiles_KD for p in parts]) for parts in parts_by_job], axis=2)
        p_D = np.concatenate([np.full(parts[0].quantiles_KD.shape[1], job[1]) for job, parts in
                              zip(members, parts_by_job)])
        values_D = mixture_quantile(quantiles_EKD, counts_E / counts_E.sum(), p_D)
        bounds = np.cumsum([0, *(parts[0].quantiles_KD.shape[1] for parts in parts_by_job)])
        out.update({job: values_D[lo:hi] for job, lo, hi in zip(members, bounds[:-1], bounds[1:])})
    return out


def mixture_cdf(quantiles_EKD: np.ndarray, weights_E: np.ndarray, x_D: np.ndarray) -> np.ndarray:
    """CDF at ``x_D`` of the weighted mixture of piecewise-linear per-episode quantile functions."""
    below_ED = (quantiles_EKD <= x_D).sum(axis=1)
    k_hi = np.clip(below_ED, 1, len(QUANTILE_GRID) - 1)
    e_E1, d_1D = np.arange(len(quantiles_EKD))[:, None], np.arange(quantiles_EKD.shape[2])[None, :]
    q_lo, q_hi = quantiles_EKD[e_E1, k_hi - 1, d_1D], quantiles_EKD[e_E1, k_hi, d_1D]
    p_lo, p_hi = QUANTILE_GRID[k_hi - 1], QUANTILE_GRID[k_hi]
    span = np.where(q_hi > q_lo, q_hi - q_lo, 1.0)
    within = np.clip((x_D - q_lo) / span, 0.0, 1.0)
    cdf_ED = np.where(below_ED == 0, 0.0, np.where(below_ED >= len(QUANTILE_GRID), 1.0,
                                                   p_lo + within * (p_hi - p_lo)))
    return (weights_E[:, None] * cdf_ED).sum(axis=0)


def mixture_quantile(quantiles_EKD: np.ndarray, weights_E: np.ndarray, p: float | np.ndarray) -> np.ndarray:
    """The ``p`` quantile (D,) of the mixture (``p`` one probability, or one per element (D,)), by
    bisection between the global min and max."""
    if len(quantiles_EKD) == 1:
        p_D = np.broadcast_to(p, quantiles_EKD.shape[2:])
        return np.array([np.interp(p_d, QUANTILE_GRID, q) for p_d, q in zip(p_D, quantiles_EKD[0].T)])
    lo, hi = quantiles_EKD[:, 0, :].min(axis=0), quantiles_EKD[:, -1, :].max(axis=0)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        low_enough = mixture_cdf(quantiles_EKD, weights_E, mid) < p
        lo, hi = np.where(low_enough, mid, lo), np.where(low_enough, hi, mid)
    return 0.5 * (lo + hi)


def format_stats(stats: dict[str, ColumnStats], digits: int = 4) -> list[str]:
    """Human-readable lines (one per column and statistic) for ``foresight info``."""
    lines = []
    for name, col in stats.items():
        lines.append(f"{name} (count {col.count}, {len(col.mean)} elements)")
        for stat in ("mean", "std", "min", "max", "q01", "q99"):
            values = ", ".join(f"{v:.{digits}g}" for v in getattr(col, stat))
            lines.append(f"  {stat:<4} [{values}]")
    return lines
