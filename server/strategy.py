"""The strategy: Flower's FedAvg hooks, with aggregation in model space by a merge operator.

`arrays` carries the exact global update ΔW_g (name -> dense float32). The run's PEFT method says
what each sampled node receives (for LoRA the best rank-r_k factors of ΔW_g) and what its upload
means as an update `τ_k` (for LoRA `s·B'A' − s·BA`, after minus as sent); the operator merges the
τ_k tensor by tensor, and `ΔW_g ← ΔW_g + server_step(merge(τ))`. Nothing here depends on the method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.adapters import Delta
from fedllm.config import AUTO, AUTO_NORM_RATIO, RunConfig
from fedllm.emulator import FULL, LayerMap
from fedllm.merge import RANDOMIZED, get_operator
from fedllm.methods import PeftMethod, Sent
from fedllm.robust import cap_weights, clip_to_median
from fedllm.seeds import operator_seed, refactor_seed, sampling_rng
from server.dp import ServerDp
from server.emulators import EmulatorFleet, restrict
from server.model import ServerModel
from server.validation import (
    NodeBounds, NodeInfo, NodeRefused, PartitionHeld, ReplyRejected, check_examples, check_norm, check_rank,
    check_train_loss, checked_node, checked_upload, error_summary, reply_records,
)

log = logging.getLogger(__name__)


class ModelSpaceStrategy(Strategy):
    """Sampling, re-factoring per rank, and merge-operator aggregation of model-space updates.

    Evaluation happens on the server (the exact model `W0 + ΔW_g` on the held-out split), so the
    federated-evaluation hooks send nothing.
    """

    def __init__(self, cfg: RunConfig, method: PeftMethod) -> None:
        self.cfg = cfg
        self.fraction_train = cfg.fraction_train
        self.min_train_nodes = cfg.min_clients
        self.method = method
        self.codec = cfg.upload_codec()
        self.context: Context | None = None  # the ServerApp's context (secure aggregation's workflow needs it)
        self.dp = ServerDp(cfg) if cfg.dp != "none" else None
        self.operator = get_operator(cfg.aggregation)
        self.operator_params = cfg.aggregation_params()
        self.optimizer = cfg.server_optimizer_settings()
        self.optimizer_state: dict[str, Delta] = {}  # server optimizer moments; part of the run state
        self.nodes: dict[int, NodeInfo] = {}  # every node admitted after its start-up answer
        self.refused: dict[int, str] = {}  # node -> why it was left out (it is not asked again)
        self.online: set[int] = set()  # those connected at the start of this round
        self.sent: dict[int, Sent] = {}  # rank -> what nodes of that rank were sent this round
        self.rejected: list[str] = []
        self.bounded: list[str] = []  # this round's updates scaled down and weights capped, per node
        self.outbox: list[Message] = []  # this round's train messages (message ids are set when pushed)
        self.current: Delta = {}  # ΔW_g as of configure_train
        self.refactor_seconds = 0.0  # this round's time to compute what each rank is sent
        self.emulators: EmulatorFleet | None = None  # set by the ServerApp when nodes may train on emulators

    def sample(self, server_round: int) -> list[int]:
        """Seeded choice among the online nodes, in partition order, so runs are reproducible
        (with `dp-sampling-amplification`, DP's secret Poisson sampling instead)."""
        ordered = self.online_in_order()
        if self.dp is not None and self.cfg.dp_sampling_amplification:
            return self.dp.poisson_sample(ordered, server_round)
        rng = sampling_rng(self.cfg.seed, server_round)
        return sorted(rng.sample(ordered, self.sample_size()), key=ordered.index)

    def online_in_order(self) -> list[int]:
        return sorted(self.online, key=lambda n: (self.nodes[n].partition_id, n))

    def sample_size(self) -> int:
        """Nodes per round: `fraction-train` of those online, at least `min-clients`."""
        online = len(self.online)
        return min(online, max(int(online * self.fraction_train + 1e-9), self.cfg.min_clients))  # 0.29 * 100 is 28.99…

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send each sampled node the method's state for ΔW_g at its rank."""
        global_delta = self.current = arrays.to_torch_state_dict()
        node_ids = self.sample(server_round)
        started = time.perf_counter()
        self.sent = self.states_to_send(server_round, global_delta, node_ids)
        self.refactor_seconds = time.perf_counter() - started
        settings = {**dict(config), **self.train_config(server_round, node_ids)}
        messages = []
        for node_id in node_ids:
            content = RecordDict({**self.state_records(node_id), "config": ConfigRecord(settings)})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        self.outbox = messages  # to name the node of an error reply the SuperLink wrote for it
        return messages

    def train_config(self, server_round: int, node_ids: list[int]) -> dict[str, int]:
        """What every sampled node is told besides its state."""
        return {"server-round": server_round}

    def states_to_send(self, server_round: int, global_delta: Delta, node_ids: list[int]) -> dict[int, Sent]:
        """This round's states, one per rank among `node_ids` (what `sent_to` picks from)."""
        return self.sent_states(server_round, global_delta, {self.nodes[n].rank for n in node_ids})

    def sent_to(self, node_id: int) -> Sent:
        """The state to send `node_id` this round."""
        return self.sent[self.nodes[node_id].rank]

    def state_records(self, node_id: int) -> dict[str, Any]:
        """The records carrying `node_id`'s state: `arrays`, and for an emulator node its identity
        (and, the first time, its weights), with the state of its layers only."""
        state = self.sent_to(node_id).state
        if self.emulators is None:
            return {"arrays": ArrayRecord(state)}
        return self.emulators.records(node_id, self.nodes[node_id].client_model, state)

    @property
    def node_bounds(self) -> NodeBounds:
        """What a start-up answer may claim in this run (the rank bound also from the model's layers)."""
        largest = self.method.largest_rank() or self.cfg.max_client_rank
        return NodeBounds(min(self.cfg.max_client_rank, largest), self.cfg.max_client_examples)

    def admit(self, node_id: int, content: RecordDict) -> NodeInfo:
        """Register a node from its start-up answer, or raise `NodeRefused` saying why it cannot take
        part: a field out of bounds, a partition an online node already holds, a client model this
        run cannot train (the emulator it asks for is built here, once per run)."""
        node = checked_node(node_id, content, self.node_bounds)
        holder = next((n for n in self.online if self.nodes[n].partition_id == node.partition_id), None)
        if holder is not None:
            raise PartitionHeld(f"node {node_id}: partition-id {node.partition_id} is already held by online node {holder}")
        try:
            if self.emulators is not None:
                self.emulators.layer_map(node.client_model)
            elif node.client_model != FULL:
                raise ValueError(f"client-model {node.client_model!r} {self.cfg.emulator_refusal()}")
        except ValueError as error:
            raise NodeRefused(f"node {node_id}: {error}") from None
        self.nodes[node_id] = node
        self.online.add(node_id)
        return node

    def refuse(self, node_id: int, reason: str) -> None:
        """Leave a node out of the run for good, with the reason (logged and in summary.json)."""
        self.refused[node_id] = reason
        log.warning("node %d cannot take part: %s", node_id, reason)

    def layer_map(self, node_id: int) -> LayerMap | None:
        """The emulator layers `node_id` trains on (None: the full model)."""
        info = self.nodes.get(node_id)
        return self.emulators.layer_map(info.client_model) if self.emulators and info else None

    def sent_for(self, node_id: int, metrics: MetricRecord) -> Sent:
        """The state the replying node was sent this round (by the rank it reports); for an
        emulator node the part of it for the layers it keeps."""
        sent = self.sent[check_rank(node_id, metrics, sorted(self.sent))]
        layer_map = self.layer_map(node_id)
        return sent if layer_map is None else restrict(sent, layer_map)

    def sent_states(self, server_round: int, global_delta: Delta, ranks: Iterable[int]) -> dict[int, Sent]:
        """The method's state for ΔW_g at each rank (seeded per round: random directions of a
        re-factoring are the same in a replay)."""
        return {r: self.method.sent_state(global_delta, r, refactor_seed(self.cfg.seed, server_round)) for r in sorted(ranks)}

    def client_update(self, reply: Message) -> tuple[Delta, float]:
        """`τ_k` per module and the example count of one reply; `ReplyRejected` naming the node and
        the problem if anything is wrong with it (checked in this order: error reply, records,
        metrics, uploaded tensors, example count, update norm)."""
        node = self.reply_node(reply)
        if reply.has_error():
            if self.emulators is not None:
                self.emulators.forget(node)
            raise ReplyRejected(f"node {node} failed: {error_summary(reply.error.reason)}")
        arrays, metrics = reply_records(node, reply.content)
        if self.dp is None:
            check_train_loss(node, metrics)
        sent = self.sent_for(node, metrics)
        additive = self.cfg.additive_uploads()
        upload = self.checked_upload(node, arrays, self.method.upload_shapes(sent, additive))
        examples = check_examples(node, metrics, self.nodes.get(node))
        tau = self.method.update_from_upload(upload, sent, additive)
        check_norm(node, tau, None if self.cfg.max_update_norm == AUTO else self.cfg.max_update_norm)
        return tau, float(examples)

    def checked_upload(self, node: int, arrays: ArrayRecord, shapes: dict[str, torch.Size]) -> Delta:
        """The node's upload under the server's names (an emulator's are renamed from its own)."""
        layer_map = self.layer_map(node)
        if layer_map is None:
            return checked_upload(node, arrays, shapes, self.codec)
        return layer_map.full_names(checked_upload(node, arrays, layer_map.emulator_names(shapes), self.codec))

    def reply_node(self, reply: Message) -> int:
        """The node a reply answers for: its sender, or, for an error the SuperLink wrote in the
        node's place (e.g. 'Node Unavailable', sent from the SuperLink's own id), the node asked."""
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in self.outbox if m.metadata.message_id}
        return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def reply_order(self, reply: Message) -> tuple[int, int]:
        """Aggregation order: by partition, then node id; never arrival order, which varies
        with timing and would change the float rounding of every sum (and so the run)."""
        node = self.reply_node(reply)
        info = self.nodes.get(node)
        return (info.partition_id if info else -1, node)

    def merge(self, server_round: int, updates: list[Delta], weights: list[float]) -> Delta:
        """The operator over the clients' updates, tensor by tensor; with central DP, the noisy
        mean of the clipped updates (times the operator's scale)."""
        if self.dp is not None and self.cfg.dp == "central":
            scale = float(self.operator_params.get("scale", 1.0))
            shapes = {module: tensor.shape for module, tensor in self.current.items()}
            mean = self.dp.central_mean(updates, shapes, server_round, population=len(self.online))
            return {k: scale * v for k, v in mean.items()}
        return {
            module: self.merge_module(server_round, index, module, updates, weights)
            for index, module in enumerate(self.current)
        }

    def merge_module(self, server_round: int, index: int, module: str, updates: list[Delta], weights: list[float]) -> torch.Tensor:
        """The operator over the updates that have `module`, with their weights (the operators
        normalise them: a layer only some clients trained is their weighted merge); zero if none has it."""
        having = [k for k, update in enumerate(updates) if module in update]
        if not having:
            return torch.zeros_like(self.current[module])
        return self.operator(
            torch.stack([updates[k][module] for k in having]), torch.tensor([weights[k] for k in having]),
            **self.operator_params, **self.round_seed(server_round, index),
        )

    def round_seed(self, server_round: int, module_index: int) -> dict[str, int]:
        """A fresh, reproducible seed per round and module for randomized operators (DARE, DELLA)."""
        if self.cfg.aggregation not in RANDOMIZED:
            return {}
        return {"seed": operator_seed(self.cfg.seed, server_round, module_index)}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("model-space strategy: %s, aggregation %s %s, fraction-train %.2f, min-clients %d",
                 self.method.name, self.cfg.aggregation, self.operator_params, self.fraction_train, self.min_train_nodes)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """`ΔW_g + server_step(merge(τ_1..τ_K))` over the valid replies, and the round's training metrics.

        Invalid replies are dropped with a logged reason; fewer than `min-clients` valid ones
        fail the round (the run can then resume from its last completed round).
        """
        updates, weights, losses, nodes, self.rejected, self.bounded = [], [], [], [], [], []
        for reply in sorted(replies, key=self.reply_order):
            try:
                tau, examples = self.client_update(reply)
            except ReplyRejected as reason:
                log.warning("round %d: rejected reply: %s", server_round, reason)
                self.rejected.append(str(reason))
                continue
            updates.append(tau)
            weights.append(examples)
            nodes.append(self.reply_node(reply))
            if self.dp is None:
                losses.append(float(reply.content["metrics"]["train_loss"]))
        if len(updates) < self.min_train_nodes and not self.cfg.dp_sampling_amplification:  # Poisson: any size
            raise RuntimeError(
                f"round {server_round}: only {len(updates)} valid replies (min-clients = {self.min_train_nodes}); "
                f"rejected: {self.rejected or 'none'}"
            )
        updates, weights = self.bounded_influence(updates, weights, nodes)
        new_global = self.updated_global(server_round, updates, weights, nodes)
        metrics = MetricRecord({"clients": len(updates), "rejected": len(self.rejected)})
        if self.dp is None:  # under DP clients withhold their loss: ε does not cover it
            metrics["train_loss"] = float(sum(l * n for l, n in zip(losses, weights)) / sum(weights))
        return ArrayRecord(new_global), metrics

    def bounded_influence(self, updates: list[Delta], weights: list[float], nodes: list[int]) -> tuple[list[Delta], list[float]]:
        """The updates and weights with each client's influence bounded relative to the round
        (`max-update-norm = 'auto'`, `max-weight-ratio`); what was bounded is noted per node."""
        if self.cfg.max_update_norm == AUTO and not self.cfg.dp_bounds_updates():
            updates, clipped = clip_to_median(updates, AUTO_NORM_RATIO)
            self.bounded += [f"node {nodes[k]}: update scaled down to {AUTO_NORM_RATIO:g}x the round's median norm"
                             for k in clipped]
        if self.cfg.max_weight_ratio is not None:
            weights, capped = cap_weights(weights, self.cfg.max_weight_ratio)
            self.bounded += [f"node {nodes[k]}: weight capped at {self.cfg.max_weight_ratio:g}x the round's median"
                             for k in capped]
        for note in self.bounded:
            log.warning("%s", note)
        return updates, weights

    def updated_global(self, server_round: int, updates: list[Delta], weights: list[float], nodes: list[int]) -> Delta:
        """`ΔW_g + server_step(merge(τ_1..τ_K))`."""
        merged = self.merge(server_round, updates, weights)
        step, self.optimizer_state = self.optimizer.step(merged, self.optimizer_state)
        return {module: delta + step[module] for module, delta in self.current.items()}

    def initial_update(self) -> Delta:
        """The state of round 0: no update yet."""
        return self.method.zero_update()

    def evaluate(self, server: ServerModel, global_delta: Delta) -> tuple[dict[str, float], dict[str, Any]]:
        """Per-task accuracy of what this strategy trains, and extra fields for the round's row."""
        return server.evaluate(global_delta), {}

    def final_update(self, global_delta: Delta) -> Delta | None:
        """The update to export as the run's model and adapter (None: nothing to export)."""
        return global_delta
