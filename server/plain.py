"""A plain round over Flower messages: send each sampled node its state, turn each reply into a
checked update, hand them to the aggregator.

Every reply is hostile until checked (in this order: error reply, records, metrics, uploaded
tensors, example count, update norm); a bad one is left out with its reason and the round goes on
while at least `min-clients` valid replies remain.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedllm.cooperation.knowledge import Answer
from fedllm.core.aggregator import Aggregator, Contribution
from fedllm.core.nodes import ReplyRejected
from fedllm.emulator import LayerMap
from fedllm.methods import Sent
from server.cooperation import Cooperation, Family
from server.emulators import EmulatorFleet, restrict
from server.grid import MeteredGrid, exchange
from server.record import RoundResult, weighted_loss
from server.validation import check_examples, check_rank, check_train_loss, checked_upload, error_summary, reply_records


@dataclass
class Transport:
    """The plain round's wire: what is sent to each node and how its reply becomes an update."""

    aggregator: Aggregator
    emulators: EmulatorFleet | None = None
    cooperation: Cooperation | None = None
    asked: dict[str, int] = field(default_factory=dict)  # this round's message id -> node asked
    answers: dict[int, list[Answer]] = field(default_factory=dict)  # this round's accepted public answers (cooperation)

    def family(self, node_id: int) -> Family | None:
        """The family of a node that trains another model than the server's (None: the server's)."""
        return self.cooperation.family_of(node_id) if self.cooperation else None

    def aggregator_for(self, node_id: int) -> Aggregator:
        """The aggregator that merges the node's updates: the server model's, or its family's."""
        family = self.family(node_id)
        return self.aggregator if family is None else family.aggregator

    def message(self, node_id: int, config: dict[str, Any]) -> Message:
        """A train message: the node's state (an emulator node's for its layers only, another
        model's node its family's with the public prompts) and `config`."""
        if (family := self.family(node_id)) is not None:
            records = self.cooperation.records(node_id, family)
        elif self.emulators is None:
            records = {"arrays": ArrayRecord(self.aggregator.state_for(node_id).state)}
        else:
            state = self.aggregator.state_for(node_id).state
            records = self.emulators.records(node_id, self.aggregator.nodes.nodes[node_id].client_model, state)
        return Message(RecordDict({**records, "config": ConfigRecord(config)}), dst_node_id=node_id,
                       message_type=MessageType.TRAIN)

    def exchange(self, grid: MeteredGrid, messages: list[Message], timeout: float,
                 progress: Callable[[Message], None]) -> list[Message]:
        """Send this round's messages and collect the replies (remembering which node each was for)."""
        replies = exchange(grid, messages, timeout, progress)
        self.asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return replies

    def reply_node(self, reply: Message) -> int:
        """The node a reply answers for: its sender, or, for an error the SuperLink wrote in the
        node's place (e.g. 'Node Unavailable', sent from the SuperLink's own id), the node asked."""
        return self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def reply_order(self, reply: Message) -> tuple[int, int]:
        """Aggregation order: by partition, then node id; never arrival order, which varies with
        timing and would change the float rounding of every sum (and so the run)."""
        node = self.reply_node(reply)
        info = self.aggregator.nodes.nodes.get(node)
        return (info.partition_id if info else -1, node)

    def layer_map(self, node_id: int) -> LayerMap | None:
        """The emulator layers `node_id` trains on (None: the full model)."""
        info = self.aggregator.nodes.nodes.get(node_id)
        return self.emulators.layer_map(info.client_model) if self.emulators and info else None

    def contribution(self, reply: Message) -> tuple[Contribution, float | None]:
        """The reply's update τ_k with its weight, and its train loss (None under DP);
        `ReplyRejected` naming the node and the problem if anything is wrong with it."""
        node = self.reply_node(reply)
        aggregator = self.aggregator_for(node)
        if reply.has_error():
            if self.emulators is not None:
                self.emulators.forget(node)
            raise ReplyRejected(f"node {node} failed: {error_summary(reply.error.reason)}")
        arrays, metrics = reply_records(node, reply.content)
        if aggregator.dp is None:
            check_train_loss(node, metrics)
        sent = self.sent_for(node, check_rank(node, metrics))
        upload = self.upload(node, arrays, aggregator.upload_shapes(sent))
        examples = check_examples(node, metrics, aggregator.nodes.nodes.get(node))
        family = self.family(node)
        answers = self.cooperation.checked_answers(node, family, reply.content) if family else None
        tau = aggregator.absorb(node, upload, sent)
        if answers is not None:
            self.answers[node] = answers
        return Contribution(node, tau, float(examples)), None if aggregator.dp else float(metrics["train_loss"])

    def accepted(self, server_round: int, replies: list[Message]) -> tuple[list[Contribution], dict[int, float | None], list[str]]:
        """The valid replies' contributions and train losses, in aggregation order, and why each
        other reply was rejected."""
        contributions, losses, rejected = [], {}, []
        for reply in sorted(replies, key=self.reply_order):
            try:
                contribution, losses[self.reply_node(reply)] = self.contribution(reply)
            except ReplyRejected as reason:
                log(WARNING, "round %d: rejected reply: %s", server_round, reason)
                rejected.append(str(reason))
                continue
            contributions.append(contribution)
        return contributions, losses, rejected

    def sent_for(self, node_id: int, rank: int) -> Sent:
        """The state the node was sent; for an emulator node the part for the layers it keeps."""
        sent = self.aggregator_for(node_id).reply_state(node_id, rank)
        layer_map = self.layer_map(node_id)
        return sent if layer_map is None else restrict(sent, layer_map)

    def upload(self, node: int, arrays: ArrayRecord, shapes: dict) -> dict:
        """The node's upload under the server's names (an emulator's are renamed from its own)."""
        codec = self.aggregator.cfg.upload_codec()
        layer_map = self.layer_map(node)
        if layer_map is None:
            return checked_upload(node, arrays, shapes, codec)
        return layer_map.full_names(checked_upload(node, arrays, layer_map.emulator_names(shapes), codec))


def reply_metric(reply: Message, key: str) -> int | float | None:
    """A number from a reply's metrics, or None if absent (for progress and timing only)."""
    if reply.has_error() or "metrics" not in reply.content.metric_records:
        return None
    value = reply.content.metric_records["metrics"].get(key)
    return value if isinstance(value, (int, float)) else None


def plain_round(grid: MeteredGrid, transport: Transport, server_round: int, rounds: int, timeout: float) -> RoundResult:
    """Send each sampled node its state, collect the replies, merge the valid ones."""
    aggregator, cooperation = transport.aggregator, transport.cooperation
    node_ids = aggregator.sample(server_round)
    aggregator.begin(server_round, [n for n in node_ids if transport.family(n) is None])
    if cooperation is not None:
        cooperation.begin(server_round, node_ids)
    transport.answers = {}
    config = aggregator.train_config(server_round)
    messages = [transport.message(node_id, config) for node_id in node_ids]
    done = 0

    def progress(reply: Message) -> None:
        nonlocal done
        done += 1
        loss = reply_metric(reply, "train_loss")
        status = "failed" if reply.has_error() else f"loss {loss:.3f}" if loss is not None else "no loss reported"
        log(INFO, "round %d/%d: client %d/%d done (%s)", server_round, rounds, done, len(messages), status)

    replies = transport.exchange(grid, messages, timeout, progress)
    aggregating = time.perf_counter()  # checking and decoding the replies, then the merge
    contributions, losses, rejected = transport.accepted(server_round, replies)
    if len(contributions) < aggregator.min_clients and not aggregator.cfg.dp_sampling_amplification:  # Poisson: any size
        raise RuntimeError(f"round {server_round}: only {len(contributions)} valid replies "
                           f"(min-clients = {aggregator.min_clients}); rejected: {rejected or 'none'}")
    own = [c for c in contributions if transport.family(c.node_id) is None]  # of the server's model
    if own or cooperation is None:
        aggregator.complete(server_round, own)
    weights = {c.node_id: c.weight for c in contributions} | (aggregator.merge_weights if own else {})
    extra = {} if cooperation is None else cooperation.complete(server_round, contributions, transport.answers, aggregator)
    aggregate_seconds = time.perf_counter() - aggregating - extra.get("cooperation_seconds", 0.0)
    processes = sorted({p for r in replies if None not in (p := (reply_metric(r, "pid"), reply_metric(r, "model-builds")))})
    train_seconds, startup_seconds, overhead_seconds = (reported_seconds(transport, replies, key) for key in
                                                        ("train-seconds", "startup-seconds", "overhead-seconds"))
    loss = weighted_loss(losses, weights) if aggregator.dp is None else None
    return RoundResult(len(contributions), len(messages) - len(replies), loss, rejected, processes, train_seconds,
                       aggregate_seconds, startup_seconds=startup_seconds, overhead_seconds=overhead_seconds, extra=extra)


def reported_seconds(transport: Transport, replies: list[Message], key: str) -> dict[int, float]:
    """A timing each node reported, per partition (a value that is not a finite count of seconds is left out)."""
    partitions = transport.aggregator.nodes.partition_of()
    return {partitions[node]: float(seconds) for r in replies
            if (node := transport.reply_node(r)) in partitions and (seconds := reply_metric(r, key)) is not None
            and math.isfinite(seconds) and seconds >= 0}
