"""Reference runs that bracket federated training (`baseline = centralized | local-only`).

Each is the model-space strategy with the hooks that differ overridden, so it runs, evaluates,
meters bytes and writes outputs exactly like a federated run of the same config.
"""

from __future__ import annotations

from typing import Any

from flwr.app import MetricRecord

from fedllm.adapters import Delta
from fedllm.config import RunConfig
from fedllm.methods import PeftMethod, Sent
from fedllm.seeds import refactor_seed
from fedllm.train import mean_accuracy
from server.model import ServerModel
from server.strategy import ModelSpaceStrategy
from server.validation import ReplyRejected, check_rank


class CentralizedStrategy(ModelSpaceStrategy):
    """The upper reference: one client trains on every partition pooled, each round for as many
    steps as the round's sampled clients train together (same examples seen, same rounds), and
    its update is taken as it is."""

    def __init__(self, cfg: RunConfig, method: PeftMethod) -> None:
        super().__init__(cfg, method)
        self.min_train_nodes = 1

    def sample(self, server_round: int) -> list[int]:
        return self.online_in_order()[:1]

    def train_config(self, server_round: int, node_ids: list[int]) -> dict[str, int]:
        return {**super().train_config(server_round, node_ids), "local-steps": self.cfg.local_steps * self.sample_size()}

    def merge(self, server_round: int, updates: list[Delta], weights: list[float]) -> Delta:
        (update,) = updates
        return update


def _slot(partition: int, module: str) -> str:
    return f"partition-{partition}/{module}"


def own_update(global_delta: Delta, partition: int) -> Delta:
    """One partition's update out of the local-only state (module names restored)."""
    prefix = _slot(partition, "")
    return {key[len(prefix):]: t for key, t in global_delta.items() if key.startswith(prefix)}


class LocalOnlyStrategy(ModelSpaceStrategy):
    """The lower reference: every client trains alone. The server keeps one update per partition
    (keys `partition-<p>/<module>`), never merges, and scores each client's model on the test
    split; a round's accuracy is their mean (per task), each client's is in `client_accuracy`."""

    def __init__(self, cfg: RunConfig, method: PeftMethod) -> None:
        super().__init__(cfg, method)
        self.scores: dict[int, dict[str, float]] = {}  # partition -> per-task accuracy of its model
        self.untrained: dict[str, float] | None = None  # the base model's, shared by untrained clients
        self.changed: set[int] = set()  # partitions trained since they were last scored

    def partitions(self) -> list[int]:
        return sorted({info.partition_id for info in self.nodes.values()})

    def initial_update(self) -> Delta:
        zero = self.method.zero_update()
        return {_slot(p, module): t.clone() for p in self.partitions() for module, t in zero.items()}

    def states_to_send(self, server_round: int, global_delta: Delta, node_ids: list[int]) -> dict[int, Sent]:
        seed = refactor_seed(self.cfg.seed, server_round)
        states = {}
        for node_id in node_ids:
            info = self.nodes[node_id]
            own = own_update(global_delta, info.partition_id) or self.method.zero_update()
            states[info.partition_id] = self.method.sent_state(own, info.rank, seed)
        return states

    def sent_to(self, node_id: int) -> Sent:
        return self.sent[self.nodes[node_id].partition_id]

    def sent_for(self, node_id: int, metrics: MetricRecord) -> Sent:
        if node_id not in self.nodes:
            raise ReplyRejected(f"node {node_id} never answered the start-up query, so it has no update of its own")
        check_rank(node_id, metrics, [self.nodes[node_id].rank])
        return self.sent_to(node_id)

    def bounded_influence(self, updates: list[Delta], weights: list[float], nodes: list[int]) -> tuple[list[Delta], list[float]]:
        return updates, weights  # nothing is merged: no client's update reaches another's model

    def updated_global(self, server_round: int, updates: list[Delta], weights: list[float], nodes: list[int]) -> Delta:
        """Each client's `τ_k` added to its own partition's update; nothing is merged."""
        new_global = dict(self.current)
        for node_id, tau in zip(nodes, updates):
            partition = self.nodes[node_id].partition_id
            for module, t in tau.items():
                slot = _slot(partition, module)
                new_global[slot] = new_global[slot] + t if slot in new_global else t.clone()
            self.changed.add(partition)
        return new_global

    def evaluate(self, server: ServerModel, global_delta: Delta) -> tuple[dict[str, float], dict[str, Any]]:
        """Mean per-task accuracy over the clients' own models (only those trained since are re-scored)."""
        for partition in self.partitions():
            own = own_update(global_delta, partition) or self.method.zero_update()
            if partition in self.scores and partition not in self.changed:
                continue
            if all(not t.any() for t in own.values()):
                self.untrained = self.untrained or server.evaluate(own)
                self.scores[partition] = self.untrained
            else:
                self.scores[partition] = server.evaluate(own)
        self.changed.clear()
        tasks = next(iter(self.scores.values()))
        per_task = {task: sum(s[task] for s in self.scores.values()) / len(self.scores) for task in tasks}
        return per_task, {"client_accuracy": {str(p): mean_accuracy(s) for p, s in sorted(self.scores.items())}}

    def final_update(self, global_delta: Delta) -> Delta | None:
        return None  # no single server model: each client keeps its own


STRATEGIES: dict[str, type[ModelSpaceStrategy]] = {
    "none": ModelSpaceStrategy, "centralized": CentralizedStrategy, "local-only": LocalOnlyStrategy,
}


def build_strategy(cfg: RunConfig, method: PeftMethod) -> ModelSpaceStrategy:
    """The run's strategy: federated, or one of the baselines (`baseline`)."""
    return STRATEGIES[cfg.baseline](cfg, method)
