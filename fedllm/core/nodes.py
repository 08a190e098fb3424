"""The server's node registry: who joined with what, who is online, who was left out and why.

Nodes answer a start-up query once (partition, rank, example count, client model); the transport
checks that answer (`server/validation.py`) and hands it here as a `NodeInfo`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself in the start-up query."""

    partition_id: int
    rank: int
    num_examples: int
    client_model: str = "full"  # 'full' or 'emulator:<keep>' (fedllm.emulator.ClientModel)


class NodeRefused(ValueError):
    """A node whose start-up answer keeps it out of the run."""


class PartitionHeld(NodeRefused):
    """A node claiming a partition an online node holds: asked again next round (the holder may
    have gone, as when an institution restarts its node)."""


class ReplyRejected(ValueError):
    """A client reply that must not enter the aggregate."""


@dataclass
class NodeRegistry:
    """Every admitted node, those online this round, and those left out for good."""

    nodes: dict[int, NodeInfo] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # node -> why it was left out (not asked again)
    online: set[int] = field(default_factory=set)  # admitted nodes connected at the start of this round

    def connected(self, node_ids: set[int]) -> list[int]:
        """Mark the admitted nodes among `node_ids` online; returns the new ones to ask, in id order."""
        self.online = node_ids & set(self.nodes)
        return sorted(node_ids - set(self.nodes) - set(self.refused))

    def admit(self, node_id: int, info: NodeInfo, can_train: Callable[[NodeInfo], None] = lambda info: None) -> None:
        """Register a checked start-up answer: `PartitionHeld` if an online node holds its partition,
        else whatever `can_train` raises (`NodeRefused`: this run cannot train its client model)."""
        holder = next((n for n in self.online if self.nodes[n].partition_id == info.partition_id), None)
        if holder is not None:
            raise PartitionHeld(f"node {node_id}: partition-id {info.partition_id} is already held by online node {holder}")
        can_train(info)
        self.nodes[node_id] = info
        self.online.add(node_id)

    def refuse(self, node_id: int, reason: str) -> None:
        """Leave a node out of the run for good, with the reason (logged and in summary.json)."""
        self.refused[node_id] = reason
        log.warning("node %d cannot take part: %s", node_id, reason)

    def online_in_order(self) -> list[int]:
        """The online nodes by partition, then id: the order sampling and aggregation use."""
        return sorted(self.online, key=lambda n: (self.nodes[n].partition_id, n))

    def partition_of(self) -> dict[int, int]:
        """Each admitted node's partition."""
        return {node: info.partition_id for node, info in self.nodes.items()}

    def partitions(self) -> list[int]:
        """Every admitted node's partition, sorted."""
        return sorted({info.partition_id for info in self.nodes.values()})
