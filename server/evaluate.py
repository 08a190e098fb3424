"""Scoring the global model after a round: on the server's test split, on the clients' own held-out
splits (evaluate messages; only scores come back), or both; `evaluate-every` rounds.

The clients' scores are pooled per task, weighted by their examples, into the round's headline
`accuracy` (`metric`), as if one evaluator had scored the union of their splits; each partition's
own headline is in `client_accuracy`. With `evaluation = 'both'` the server's are `server_*`.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedllm.core.aggregator import Aggregator
from fedllm.core.nodes import ReplyRejected
from fedllm.core.server_model import ServerModel
from fedllm.emulator import FULL
from fedllm.evaluation import Scores
from server.grid import MeteredGrid, exchange
from server.validation import checked_scores, error_summary


def evaluate_round(grid: MeteredGrid, aggregator: Aggregator, server: ServerModel, server_round: int, rounds: int,
                   timeout: float) -> dict[str, Any]:
    """The row's evaluation fields after `server_round` ({} on a round `evaluate-every` skips)."""
    cfg = aggregator.cfg
    if not cfg.evaluates(server_round, rounds):
        return {}
    started, fields = time.perf_counter(), {}
    if cfg.evaluation != "clients":
        scores, extra = aggregator.server_method.evaluate(aggregator, server)
        fields |= scores.fields(cfg.metric, prefix="server_" if cfg.evaluation == "both" else "") | extra
    if cfg.evaluation != "server":
        fields |= client_evaluation(grid, aggregator, server_round, timeout)
    return fields | {"evaluate_seconds": time.perf_counter() - started}


def client_evaluation(grid: MeteredGrid, aggregator: Aggregator, server_round: int, timeout: float) -> dict[str, Any]:
    """Send every online node that holds the full model the global state at its rank; pool the
    valid replies' scores. A bad reply is left out with its reason; none valid fails the round."""
    cfg, registry = aggregator.cfg, aggregator.nodes
    nodes = [n for n in registry.online_in_order() if registry.nodes[n].client_model == FULL]
    if not nodes:
        raise RuntimeError("evaluation on the clients needs online nodes that hold the full model; every node "
                           "trains on an emulator here: use evaluation = 'server'")
    states = aggregator.evaluation_states(server_round, nodes)
    config = ConfigRecord({"server-round": server_round})
    messages = [Message(RecordDict({"arrays": ArrayRecord(states[n].state), "config": config}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]
    replies = exchange(grid, messages, timeout,
                       on_reply=lambda r: log(INFO, "round %d: evaluation by node %d in", server_round, r.metadata.src_node_id))
    partitions, scores, rejected = registry.partition_of(), {}, []
    for reply in replies:
        node = grid.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        try:
            if reply.has_error():
                raise ReplyRejected(f"node {node} failed to evaluate: {error_summary(reply.error.reason)}")
            scores[partitions[node]] = checked_scores(node, reply.content, cfg.max_client_examples)
        except ReplyRejected as reason:
            log(WARNING, "round %d: rejected evaluation: %s", server_round, reason)
            rejected.append(str(reason))
    if not scores:
        raise RuntimeError(f"round {server_round}: no valid evaluation reply from the clients; rejected: "
                           f"{rejected or 'none (they timed out)'}")
    ordered = dict(sorted(scores.items()))
    return Scores.pooled(list(ordered.values())).fields(cfg.metric) | {
        "client_accuracy": {str(p): s.headline(cfg.metric) for p, s in ordered.items()},
        "client_metrics": {str(p): s.metrics() for p, s in ordered.items()},
        "client_examples": {str(p): s.counts for p, s in ordered.items()},
        "evaluation_rejected": rejected,
    }
