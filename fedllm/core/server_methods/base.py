"""What the server does in a round besides moving bytes: the hooks a server-side method overrides.

The base class is federated fine-tuning itself: a seeded sample of the online nodes, each sent the
PEFT method's state for ΔW_g at its rank, their updates merged by the operator. A baseline or a
cooperation method is a subclass in a file of its own that overrides only what differs, and
`evaluate` is where it acts with the server model at hand each round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fedllm.adapters import Delta
from fedllm.core.nodes import NodeInfo, ReplyRejected
from fedllm.evaluation import Scores
from fedllm.methods import PeftMethod, Sent
from fedllm.seeds import refactor_seed, sampling_rng

if TYPE_CHECKING:
    from fedllm.config import RunConfig
    from fedllm.core.aggregator import Aggregator, Contribution
    from fedllm.core.server_model import ServerModel


class ServerMethod:
    """Federated fine-tuning in model space; subclasses override the hooks that differ."""

    name: ClassVar[str] = "none"  # its `baseline` value

    def __init__(self, cfg: RunConfig, method: PeftMethod) -> None:
        self.cfg, self.method = cfg, method

    def min_clients(self) -> int:
        """Fewest valid replies a round completes with."""
        return self.cfg.min_clients

    def sample(self, ordered: list[int], size: int, server_round: int) -> list[int]:
        """`size` of the online nodes (`ordered` by partition), seeded per round so runs replay."""
        rng = sampling_rng(self.cfg.seed, server_round)
        return sorted(rng.sample(ordered, size), key=ordered.index)

    def train_config(self, aggregator: Aggregator) -> dict[str, Any]:
        """What sampled nodes are told besides the round and their state."""
        return {}

    def initial_update(self, aggregator: Aggregator) -> Delta:
        """ΔW_g of round 0."""
        return self.method.zero_update()

    def module_of(self, key: str) -> str:
        """The model module an entry of ΔW_g updates (a method keeping several per module names them apart)."""
        return key

    def key(self, node: NodeInfo) -> int:
        """Which of the round's states a node is sent: one per rank."""
        return node.rank

    def states(self, aggregator: Aggregator, server_round: int, nodes: list[NodeInfo]) -> dict[int, Sent]:
        """The method's state for ΔW_g at each sampled rank (re-factoring seeded per round)."""
        seed = refactor_seed(self.cfg.seed, server_round)
        ranks = sorted({n.rank for n in nodes})
        return self.method.sent_states(aggregator.global_delta, ranks, seed, aggregator.subspaces)

    def reply_state(self, aggregator: Aggregator, node: NodeInfo | None, node_id: int, rank: int) -> Sent:
        """The state a reply reporting `rank` answers: any rank sent this round."""
        if rank not in aggregator.sent:
            raise ReplyRejected(f"node {node_id} replied with rank {rank}, but was sent rank(s) {sorted(aggregator.sent)}")
        return aggregator.sent[rank]

    def combine(self, aggregator: Aggregator, server_round: int, contributions: list[Contribution]) -> tuple[Delta, dict]:
        """The new ΔW_g and optimizer state: `ΔW_g + server_step(merge(τ))`, influence bounded."""
        return aggregator.stepped(aggregator.merge(server_round, aggregator.bounded_influence(contributions)))

    def evaluate(self, aggregator: Aggregator, server: ServerModel) -> tuple[Scores, dict[str, Any]]:
        """On evaluated rounds, with the server model at hand: its scores on the server's test split,
        and extra fields for the row (the validation split's headline, when there is one)."""
        scores = server.evaluate(aggregator.global_delta)
        if not server.validation:
            return scores, {}
        return scores, {"validation_accuracy": server.validate(aggregator.global_delta).headline(self.cfg.metric)}

    def final_update(self, aggregator: Aggregator) -> Delta | None:
        """The update to export as the run's model and adapter (None: nothing to export)."""
        return aggregator.global_delta
