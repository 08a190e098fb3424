"""The lower reference (`baseline = 'local-only'`): every client trains alone.

The server keeps one update per partition (keys `partition-<p>/<module>`), never merges, and
scores each client's model on the test split; a round's accuracy is their mean (per task), each
client's is in `client_accuracy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedllm.adapters import Delta
from fedllm.core.nodes import NodeInfo, ReplyRejected
from fedllm.core.server_methods.base import ServerMethod
from fedllm.methods import Sent
from fedllm.seeds import refactor_seed
from fedllm.evaluation import Scores

if TYPE_CHECKING:
    from fedllm.core.aggregator import Aggregator, Contribution
    from fedllm.core.server_model import ServerModel


def _slot(partition: int, module: str) -> str:
    return f"partition-{partition}/{module}"


def own_update(global_delta: Delta, partition: int) -> Delta:
    """One partition's update out of the local-only state (module names restored)."""
    prefix = _slot(partition, "")
    return {key[len(prefix):]: t for key, t in global_delta.items() if key.startswith(prefix)}


class LocalOnly(ServerMethod):
    name = "local-only"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.scores: dict[int, Scores] = {}  # partition -> its model's scores
        self.untrained: Scores | None = None  # the base model's, shared by untrained clients
        self.changed: set[int] = set()  # partitions trained since they were last scored

    def initial_update(self, aggregator: Aggregator) -> Delta:
        zero = self.method.zero_update()
        return {_slot(p, module): t.clone() for p in aggregator.nodes.partitions() for module, t in zero.items()}

    def module_of(self, key: str) -> str:
        slot, _, module = key.partition("/")
        return module if slot.startswith("partition-") and slot[len("partition-"):].isdigit() else ""

    def key(self, node: NodeInfo) -> int:
        return node.partition_id

    def states(self, aggregator: Aggregator, server_round: int, nodes: list[NodeInfo]) -> dict[int, Sent]:
        seed = refactor_seed(self.cfg.seed, server_round)
        own = {n.partition_id: own_update(aggregator.global_delta, n.partition_id) or self.method.zero_update()
               for n in nodes}
        return {n.partition_id: self.method.sent_state(own[n.partition_id], n.rank, seed) for n in nodes}

    def reply_state(self, aggregator: Aggregator, node: NodeInfo | None, node_id: int, rank: int) -> Sent:
        if node is None:
            raise ReplyRejected(f"node {node_id} never answered the start-up query, so it has no update of its own")
        if rank != node.rank:
            raise ReplyRejected(f"node {node_id} replied with rank {rank}, but was sent rank(s) {[node.rank]}")
        return aggregator.sent[node.partition_id]

    def combine(self, aggregator: Aggregator, server_round: int, contributions: list[Contribution]) -> tuple[Delta, dict]:
        """Each client's `τ_k` added to its own partition's update; nothing is merged or bounded."""
        new_global = dict(aggregator.global_delta)
        for contribution in contributions:
            partition = aggregator.nodes.nodes[contribution.node_id].partition_id
            for module, t in contribution.update.items():
                slot = _slot(partition, module)
                new_global[slot] = new_global[slot] + t if slot in new_global else t.clone()
            self.changed.add(partition)
        return new_global, aggregator.optimizer_state

    def evaluate(self, aggregator: Aggregator, server: ServerModel) -> tuple[Scores, dict[str, Any]]:
        """The clients' own models' scores pooled (each on the whole test split, so the mean over
        clients); each client's headline in `client_accuracy`. Only those trained since are re-scored."""
        for partition in aggregator.nodes.partitions():
            own = own_update(aggregator.global_delta, partition) or self.method.zero_update()
            if partition in self.scores and partition not in self.changed:
                continue
            if all(not t.any() for t in own.values()):
                self.untrained = self.untrained or server.evaluate(own)
                self.scores[partition] = self.untrained
            else:
                self.scores[partition] = server.evaluate(own)
        self.changed.clear()
        clients = {str(p): s.headline(self.cfg.metric) for p, s in sorted(self.scores.items())}
        return Scores.pooled(list(self.scores.values())), {"client_accuracy": clients}

    def final_update(self, aggregator: Aggregator) -> Delta | None:
        return None  # no single server model: each client keeps its own
