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
from dataclasses import dataclass

from fedllm.lowrank import Update as ModuleUpdate, squared_norm
from fedllm.settings import Settings, positive, setting

AUTO = "auto"
AUTO_NORM_RATIO = 3.0  # max-update-norm = 'auto': updates are scaled down to this multiple of the round's median norm

Update = dict[str, ModuleUpdate]


def update_norm(update: Update) -> float:
    """‖τ‖: the L2 norm over every module of a model-space update, in float64."""
    return math.sqrt(sum(squared_norm(t) for t in update.values()))


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


@dataclass(frozen=True)
class RobustSettings(Settings):
    """Bounds on what one node can claim and how far its update can move the merge."""

    max_update_norm: float | str | None = setting(
        "max-update-norm", AUTO, lambda v: v == AUTO or (not isinstance(v, str) and v > 0),
        "'auto', '' (off) or a number > 0",
        "bound on a client's model-space update norm ‖τ_k‖: 'auto' scales an update down to "
        f"{AUTO_NORM_RATIO:g}x the round's median norm (docs/threat-model.md); a number rejects updates above it",
    )
    max_weight_ratio: float | None = setting(
        "max-weight-ratio", 4.0, lambda v: v >= 1, "'' (off) or a number >= 1",
        "cap on a client's example-count weight, as a multiple of the round's median (claimed examples buy "
        "no more influence than that)",
    )
    max_client_rank: int = setting(
        "max-client-rank", 256, positive, "an integer >= 1",
        "largest LoRA rank a node may report (also at most the smallest adapted layer's min(d_in, d_out))",
    )
    max_client_examples: int = setting(
        "max-client-examples", 10_000_000, positive, "an integer >= 1",
        "largest training-example count a node may report; a node claiming more is left out",
    )
