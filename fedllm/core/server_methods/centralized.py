"""The upper reference (`baseline = 'centralized'`): one client trains on every partition pooled,
each round for as many steps as the round's sampled clients train together (same examples seen,
same rounds), and its update is taken as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedllm.adapters import Delta
from fedllm.core.server_methods.base import ServerMethod

if TYPE_CHECKING:
    from fedllm.core.aggregator import Aggregator, Contribution


class Centralized(ServerMethod):
    name = "centralized"

    def min_clients(self) -> int:
        return 1

    def sample(self, ordered: list[int], size: int, server_round: int) -> list[int]:
        return ordered[:1]

    def train_config(self, aggregator: Aggregator) -> dict[str, Any]:
        return {"local-steps": self.cfg.local_steps * aggregator.sample_size()}

    def combine(self, aggregator: Aggregator, server_round: int, contributions: list[Contribution]) -> tuple[Delta, dict]:
        (only,) = aggregator.bounded_influence(contributions)
        return aggregator.stepped(only.update)
