"""Per-episode statistics aggregate to the dataset's: exact moments, mixture quantiles."""

from __future__ import annotations

import numpy as np
import pytest

from foresight.pipelines.stats import (
    aggregate,
    aggregate_columns,
    episode_stats,
    format_stats,
    mixture_cdf,
    mixture_quantile,
)


def test_single_episode_matches_numpy_exactly():
    values = np.random.default_rng(0).normal(size=(300, 2, 3))
    stats = aggregate([episode_stats(values)])
    flat = values.reshape(300, -1)
    np.testing.assert_allclose(stats.mean, flat.mean(axis=0))
    np.testing.assert_allclose(stats.std, flat.std(axis=0))
    np.testing.assert_allclose(stats.q01, np.quantile(flat, 0.01, axis=0))
    np.testing.assert_allclose(stats.q99, np.quantile(flat, 0.99, axis=0))
    assert stats.count == 300 and len(stats.min) == 6


def test_aggregate_of_episodes_matches_the_pooled_frames():
    rng = np.random.default_rng(1)
    episodes = [rng.normal(loc, scale, size=(n, 4)) for loc, scale, n in [(0, 1, 400), (3, 0.5, 250), (-1, 2, 90)]]
    pooled = np.concatenate(episodes)
    stats = aggregate([episode_stats(e) for e in episodes])
    np.testing.assert_allclose(stats.mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, pooled.std(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(stats.min, pooled.min(axis=0))
    np.testing.assert_array_equal(stats.max, pooled.max(axis=0))
    spread = pooled.max(axis=0) - pooled.min(axis=0)
    assert np.all(np.abs(np.array(stats.q01) - np.quantile(pooled, 0.01, axis=0)) < 0.02 * spread)
    assert np.all(np.abs(np.array(stats.q99) - np.quantile(pooled, 0.99, axis=0)) < 0.02 * spread)
    assert stats.count == 740


def test_mixture_cdf_is_a_cdf():
    parts = [episode_stats(np.arange(100.0)[:, None]), episode_stats(np.arange(100.0, 200.0)[:, None])]
    quantiles = np.stack([p.quantiles_KD for p in parts])
    weights = np.array([0.5, 0.5])
    assert mixture_cdf(quantiles, weights, np.array([-1.0]))[0] == 0.0
    assert mixture_cdf(quantiles, weights, np.array([500.0]))[0] == 1.0
    assert mixture_cdf(quantiles, weights, np.array([99.5]))[0] == pytest.approx(0.5, abs=0.01)


def test_empty_inputs_are_errors():
    with pytest.raises(ValueError):
        episode_stats(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        aggregate([])


def test_columns_aggregated_together_equal_each_aggregated_alone():
    """The joint bisection of every column's q01/q99 gives each column's statistics bit for bit,
    including one-element columns over 8+ episodes (numpy sums those pairwise) and columns with
    other episode counts (an optional field absent from some episodes)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=10)
    columns = {
        "state": [episode_stats(rng.normal(size=(n, 6))) for n in lengths],
        "action": [episode_stats(rng.normal(size=(n, 14)) * 3) for n in lengths],
        "gripper": [episode_stats(np.round(rng.normal(size=(n, 1)) * 4)) for n in lengths],
        "effort": [episode_stats(rng.normal(size=(n, 2))) for n in lengths[:3]],
        "base": [episode_stats(rng.normal(size=(n, 1))) for n in lengths[:2]],
        "single": [episode_stats(rng.normal(size=(7, 3)))],
    }
    joint = aggregate_columns(columns)
    for name, parts in columns.items():
        counts = np.array([p.count for p in parts], dtype=np.float64)
        quantiles = np.stack([p.quantiles_KD for p in parts])
        for stat, p in (("q01", 0.01), ("q99", 0.99)):  # one bisection per column and quantile
            alone = mixture_quantile(quantiles, counts / counts.sum(), p)
            assert getattr(joint[name], stat) == alone.tolist(), (name, stat)
        assert joint[name].mean == aggregate(parts).mean


def test_format_stats_shows_every_statistic():
    lines = format_stats({"action": aggregate([episode_stats(np.ones((5, 2)))])})
    assert lines[0] == "action (count 5, 2 elements)"
    assert [line.split()[0] for line in lines[1:]] == ["mean", "std", "min", "max", "q01", "q99"]
