"""Which nodes take part: the start-up query to each new node, and who is online each round.

Called before every round, so a node that (re)joins takes part from the next round on and a node
that left is not sampled. A node's answer is checked (`server/validation.py`) and registered in
the aggregator's `NodeRegistry`, or the node is left out with the reason.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.core.aggregator import Aggregator
from fedllm.core.nodes import NodeInfo, NodeRefused, PartitionHeld
from fedllm.emulator import FULL, ClientModel
from server.cooperation import Cooperation
from server.emulators import EmulatorFleet
from server.grid import exchange
from server.validation import NodeBounds, checked_node, error_summary


def node_bounds(aggregator: Aggregator) -> NodeBounds:
    """What a start-up answer may claim in this run (the rank bound also from the model's layers)."""
    cfg = aggregator.cfg
    largest = aggregator.method.largest_rank() or cfg.max_client_rank
    return NodeBounds(min(cfg.max_client_rank, largest), cfg.max_client_examples)


def trainable(node_id: int, info: NodeInfo, aggregator: Aggregator, emulators: EmulatorFleet | None,
              cooperation: Cooperation | None) -> None:
    """`NodeRefused` if this run cannot train the node's client model (the emulator or the other
    model it asks for is built here, once per run)."""
    try:
        other = ClientModel.parse(info.client_model).other
        if other is not None:
            if cooperation is None:
                raise ValueError(f"client-model {other!r} is another model than the server's; this run has "
                                 "cooperation = 'none'")
            cooperation.family(other)
        elif emulators is not None:
            emulators.layer_map(info.client_model)
        elif info.client_model != FULL:
            raise ValueError(f"client-model {info.client_model!r} {aggregator.cfg.emulator_refusal()}")
    except (ValueError, OSError) as error:
        raise NodeRefused(f"node {node_id}: {error}") from None


def admit(aggregator: Aggregator, emulators: EmulatorFleet | None, cooperation: Cooperation | None, node_id: int,
          content: RecordDict) -> NodeInfo:
    """Register a node from its start-up answer, or raise `NodeRefused` saying why it cannot take
    part: a field out of bounds, a partition an online node holds, a client model this run cannot train."""
    info = checked_node(node_id, content, node_bounds(aggregator))
    aggregator.nodes.admit(node_id, info, lambda info: trainable(node_id, info, aggregator, emulators, cooperation))
    return info


def refresh_nodes(grid: Grid, aggregator: Aggregator, emulators: EmulatorFleet | None,
                  cooperation: Cooperation | None, timeout: float, wait: bool = False) -> None:
    """Mark which nodes are online and ask new ones for their partition, rank and data size; with
    `wait`, wait up to `timeout` for min-clients nodes to connect."""
    registry, fewest = aggregator.nodes, aggregator.min_clients
    deadline = time.monotonic() + timeout
    while wait and len(online := set(grid.get_node_ids())) < fewest:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(online)} node(s) online after {timeout:.0f} s; min-clients = {fewest}")
        log(INFO, "waiting for nodes: %d connected, min-clients = %d", len(online), fewest)
        time.sleep(1)
    new = registry.connected(set(grid.get_node_ids()))
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
    replies = exchange(grid, queries, timeout, on_reply=lambda r: None) if queries else []
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # who claims a partition first: not timing
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d could not start: %s", node_id, error_summary(reply.error.reason))
            continue
        try:
            info = admit(aggregator, emulators, cooperation, node_id, reply.content)
        except PartitionHeld as reason:
            log(WARNING, "%s; asking it again next round", reason)
            continue
        except NodeRefused as reason:
            registry.refuse(node_id, str(reason))
            continue
        log(INFO, "node %d joined: partition %d, rank %d, %d examples, %s", node_id,
            info.partition_id, info.rank, info.num_examples, info.client_model)
    if len(registry.online) < fewest:
        raise RuntimeError(f"only {len(registry.online)} usable node(s); min-clients = {fewest}"
                           + (f"; left out: {'; '.join(registry.refused.values())}" if registry.refused else ""))
