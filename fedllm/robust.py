"""Bounds on one client's influence, applied to a round's valid updates before they are merged.

Two levers decide how far one client moves the server model: the size of its update and its weight.
With the shipped defaults both are bounded relative to the round itself, so they need no tuning
per model: an update longer than `ratio` times the round's median norm is scaled down to that
length (norm bounding, Sun et al. 2019, arXiv 1911.07963, with the bound taken from the round as
in robust aggregation), and an example-count weight above `ratio` times the round's median weight is
capped there. Both hold while fewer than half of the round's clients are malicious (the median is
then an honest client's); docs/threat-model.md says what that leaves an attacker.
"""

from __future__ import annotations

import math
import statistics

import torch

Update = dict[str, torch.Tensor]


def update_norm(update: Update) -> float:
    """‖τ‖: the L2 norm over every module of a model-space update, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_to_median(updates: list[Update], ratio: float) -> tuple[list[Update], list[int]]:
    """Each update longer than `ratio` × the median norm scaled down to that length, and the
    indices of those that were. Fewer than three updates are left as they are (no majority)."""
    if len(updates) < 3:
        return updates, []
    norms = [update_norm(u) for u in updates]
    bound = ratio * statistics.median(norms)
    clipped = [k for k, norm in enumerate(norms) if norm > bound]
    bounded = [
        {name: t * (bound / norms[k]) for name, t in u.items()} if k in clipped else u for k, u in enumerate(updates)
    ]
    return bounded, clipped


def cap_weights(weights: list[float], ratio: float) -> tuple[list[float], list[int]]:
    """Weights above `ratio` × the median weight capped there, and the indices capped. Fewer than
    three weights are left as they are."""
    if len(weights) < 3:
        return weights, []
    cap = ratio * statistics.median(weights)
    capped = [k for k, w in enumerate(weights) if w > cap]
    return [min(w, cap) for w in weights], capped
