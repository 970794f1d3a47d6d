"""Timestep groups: contiguous timestep ranges that share activation scales (one graph each).

Torch-free, so the fake-quant model, the exporter and the runtime sampler on an edge device map a
timestep to its group with the same code.
"""

from __future__ import annotations

__all__ = ["group_index", "split_groups"]


def split_groups(timesteps: list[float], n_groups: int, num_train_timesteps: int = 1000) -> list[list[float]]:
    """Split the calibration ``timesteps`` into ``n_groups`` contiguous runs of (nearly) equal
    count and return their ranges ``[lo, hi)``, which tile [0, num_train_timesteps) with edges
    halfway between neighbouring groups."""
    ts = sorted(set(float(t) for t in timesteps))
    if not 1 <= n_groups <= len(ts):
        raise ValueError(f"timestep groups must be 1..{len(ts)} (the calibration timesteps), got {n_groups}")
    bounds = [round(i * len(ts) / n_groups) for i in range(n_groups + 1)]
    runs = [ts[bounds[i] : bounds[i + 1]] for i in range(n_groups)]
    edges = [0.0] + [(runs[i][-1] + runs[i + 1][0]) / 2 for i in range(n_groups - 1)] + [float(num_train_timesteps)]
    return [[edges[i], edges[i + 1]] for i in range(n_groups)]


def group_index(t: float, ranges: list[list[float]]) -> int:
    """The group whose ``[lo, hi)`` holds ``t`` (the nearest end group outside all ranges)."""
    if not ranges:
        return 0
    for i, (lo, hi) in enumerate(ranges):
        if lo <= t < hi:
            return i
    return 0 if t < ranges[0][0] else len(ranges) - 1
