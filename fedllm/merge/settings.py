"""The merge operator's run-config keys: `aggregation` and its `aggregation-<param>` parameters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fedllm.merge import OPERATOR_PARAMS, OPERATORS
from fedllm.merge._checks import ELECTIONS
from fedllm.settings import ConfigError, Settings, choice, positive, setting

PREFIX = "aggregation-"
CLIENT_WEIGHTS = ("examples", "equal")


@dataclass(frozen=True)
class MergeSettings(Settings):
    """How the server merges the clients' model-space updates."""

    aggregation: str = choice(
        "aggregation", "weighted_average", OPERATORS,
        "merge operator applied to the clients' model-space updates",
    )
    aggregation_density: float | None = setting(
        "aggregation-density", None, lambda v: 0 < v <= 1, "'' (operator default) or a number in (0, 1]",
        "fraction of each update kept (ties, dare_*, magnitude_prune, breadcrumbs, della)",
    )
    aggregation_scale: float | None = setting(
        "aggregation-scale", None, positive, "'' (operator default) or a number > 0", "scale of the merged update",
    )
    aggregation_gamma: float | None = setting(
        "aggregation-gamma", None, lambda v: 0 <= v < 1, "'' (operator default) or a number in [0, 1)",
        "breadcrumbs: fraction of largest entries dropped",
    )
    aggregation_epsilon: float | None = setting(
        "aggregation-epsilon", None, lambda v: 0 <= v < 1, "'' (operator default) or a number in [0, 1)",
        "della: spread of keep probabilities",
    )
    aggregation_beta: float | None = setting(
        "aggregation-beta", None, lambda v: 0 <= v < 0.5, "'' (operator default) or a number in [0, 0.5)",
        "trimmed_mean: fraction dropped at each end",
    )
    aggregation_election: str | None = setting(
        "aggregation-election", None, lambda v: v in ELECTIONS, "'' (operator default, mass), 'mass' or 'count'",
        "TIES family: elect each entry's sign by the weighted sum of the updates (mass) or of their signs (count)",
    )
    client_weights: str = choice(
        "client-weights", "examples", CLIENT_WEIGHTS,
        "a client's weight in the merge: its example count (FedAvg), or equal for all (the merging papers' unweighted merge)",
    )

    def check(self) -> None:
        """An operator parameter the operator does not take is an error; equal weights need a merge
        the server computes from each update (secure sums and central DP weight on their own)."""
        self.aggregation_params()
        if self.client_weights == "equal" and (self.secure_aggregation or self.dp != "none"):
            raise ConfigError("run-config client-weights = 'equal' does not combine with secure-aggregation or dp: "
                              "those weigh clients in their own sums; leave client-weights = 'examples'")

    def aggregation_params(self) -> dict[str, Any]:
        """The `aggregation-<param>` keys that are set, as keyword arguments of the operator."""
        accepted = OPERATOR_PARAMS[self.aggregation]
        params = {}
        for f in fields(MergeSettings):
            key = f.metadata.get("key", "")
            if not key.startswith(PREFIX) or getattr(self, f.name) is None:
                continue
            name = key[len(PREFIX):]
            if name not in accepted:
                takes = [f"{PREFIX}{p}" for p in accepted if p != "seed"]
                raise ConfigError(f"run-config {key!r} is not a parameter of aggregation {self.aggregation!r}; "
                                  f"it takes {', '.join(takes) or 'no parameters'}")
            params[name] = getattr(self, f.name)
        return params
