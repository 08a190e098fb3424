"""The server's half of a round, without Flower: the aggregator owns the exact global update ΔW_g
and the server optimizer's state.

A round: `begin` samples nodes and computes what they are sent (the PEFT method's state for ΔW_g
at each rank); `absorb` turns one node's upload into its update τ_k; `complete` merges the round's
updates with the operator (or, under central DP, takes the noisy mean) and steps,
ΔW_g ← ΔW_g + server_step(merge(τ)). A secure round, where the server learns only a sum, ends with
`complete_sum` instead. What a baseline or another server-side method does differently is its
`ServerMethod`'s (`fedllm.core.server_methods`); the transport (`server/`) only moves bytes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedllm.adapters import Delta, Subspaces
from fedllm.checkpoint import CheckpointError
from fedllm.core.nodes import NodeRegistry, ReplyRejected
from fedllm.core.server_methods import ServerMethod, build_server_method
from fedllm.lowrank import LowRank, Update, compacted, dense, largest_entry
from fedllm.merge import MEAN, RANDOMIZED, get_operator
from fedllm.methods import PeftMethod, Sent
from fedllm.privacy.central import ServerDp
from fedllm.robust import AUTO, AUTO_NORM_RATIO, cap_weights, clip_to_median, update_norm
from fedllm.seeds import operator_seed

if TYPE_CHECKING:
    from fedllm.config import RunConfig

log = logging.getLogger(__name__)

# No fine-tuning moves a weight by this much: a global update with a larger entry is corrupt.
ABSURD_ENTRY = 1e4
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def misfit(keyed: dict[str, tuple[str, Update]], shapes: dict[str, tuple[int, ...]], complete: bool,
           largest: float) -> str | None:
    """Why entries (key → the module it updates, the update) are not updates of the modules `shapes`
    names (each of them at least once if `complete`) with finite entries of at most `largest`; None
    when they are."""
    if unknown := sorted(key for key, (module, _) in keyed.items() if module not in shapes):
        return f"has entries for no module of this model ({', '.join(unknown[:3])})"
    if complete and (missing := sorted(shapes.keys() - {module for module, _ in keyed.values()})):
        return f"lacks modules of this model ({', '.join(missing[:3])})"
    for key, (module, update) in keyed.items():
        if tuple(update.shape) != shapes[module]:
            return f"gives {key} the shape {tuple(update.shape)}, where this model's {module} has {shapes[module]}"
        if not (biggest := largest_entry(update, exact_above=largest)) <= largest:
            return f"has an entry of {biggest:.3g} in {key} (non-finite or above {largest:g})"
    return None


@dataclass(frozen=True)
class Contribution:
    """One node's accepted reply: its update τ_k (per module) and its weight (example count)."""

    node_id: int
    update: Delta
    weight: float


class Aggregator:
    """ΔW_g, the server optimizer's moments, and this round's sent states; changed only here."""

    def __init__(self, cfg: RunConfig, method: PeftMethod, nodes: NodeRegistry | None = None) -> None:
        """`nodes`: the run's registry, when this aggregator merges the clients of another model."""
        self.cfg, self.method = cfg, method
        self.nodes = nodes if nodes is not None else NodeRegistry()
        self.server_method: ServerMethod = build_server_method(cfg, method)
        self.dp = ServerDp(cfg) if cfg.dp != "none" else None
        self.operator = get_operator(cfg.aggregation)
        self.operator_params = cfg.aggregation_params()
        self.optimizer = cfg.server_optimizer_settings()
        self.global_delta: Delta = {}
        self.optimizer_state: dict[str, Delta] = {}  # part of the run state
        self.subspaces = Subspaces()  # where large modules' re-factoring starts next round; part of the run state
        self.sent: dict[int, Sent] = {}  # this round's states, by the server method's key (the rank)
        self.refactor_seconds = 0.0  # this round's time to compute the sent states
        self.bounded: list[str] = []  # this round's updates scaled down and weights capped, per node
        self.merge_weights: dict[int, float] = {}  # this round's weight of each node in the merge (after caps)

    # -- the run -------------------------------------------------------------------------------

    def start(self) -> None:
        """Round 0: no update yet."""
        self.global_delta = self.server_method.initial_update(self)

    def restore(self, global_delta: Delta, optimizer_state: dict[str, Delta], subspaces: dict[str, torch.Tensor]) -> None:
        """The state after a completed round of an earlier run (a checkpoint's), refused unless it
        fits this run's model: the file's checksum shows it is whole, not that it belongs here."""
        shapes = {module: tuple(update.shape) for module, update in self.method.zero_update().items()}
        parts = [("global update", global_delta, True), *((f"optimizer moment {slot!r}", moments, False)
                                                          for slot, moments in optimizer_state.items())]
        for what, delta, complete in parts:
            keyed = {key: (self.server_method.module_of(key), update) for key, update in delta.items()}
            if why := misfit(keyed, shapes, complete, largest=ABSURD_ENTRY if complete else FLOAT32_MAX):
                raise CheckpointError(f"the checkpoint's {what} {why}: it was written for another model or altered. "
                                      "Resume from another round (resume-round) or start the run afresh")
        self.global_delta, self.optimizer_state, self.subspaces = global_delta, optimizer_state, Subspaces(subspaces)

    @property
    def min_clients(self) -> int:
        """Fewest valid replies a round completes with (the server method's; 1 for centralized)."""
        return self.server_method.min_clients()

    @property
    def scale(self) -> float:
        """The operator's `scale`: what a mean operator is besides the mean (DP and secure sums apply it)."""
        return float(self.operator_params.get("scale", 1.0))

    # -- sending -------------------------------------------------------------------------------

    def sample(self, server_round: int) -> list[int]:
        """The nodes that train this round, in partition order."""
        ordered = self.nodes.online_in_order()
        if self.dp is not None and self.cfg.dp_sampling_amplification:
            return self.dp.poisson_sample(ordered, server_round)
        return self.server_method.sample(ordered, self.sample_size(), server_round)

    def sample_size(self) -> int:
        """Nodes per round: `fraction-train` of those online, at least `min-clients`."""
        online = len(self.nodes.online)
        return min(online, max(int(online * self.cfg.fraction_train + 1e-9), self.cfg.min_clients))  # 0.29 * 100 is 28.99…

    def begin(self, server_round: int, node_ids: list[int]) -> None:
        """Compute what the sampled nodes are sent this round (timed: re-factoring can be costly)."""
        started = time.perf_counter()
        self.sent = self.server_method.states(self, server_round, [self.nodes.nodes[n] for n in node_ids])
        self.refactor_seconds = time.perf_counter() - started
        self.bounded = []

    def state_for(self, node_id: int) -> Sent:
        """What `node_id` is sent this round."""
        return self.sent[self.server_method.key(self.nodes.nodes[node_id])]

    def evaluation_states(self, server_round: int, node_ids: list[int]) -> dict[int, Sent]:
        """What each node scores after `server_round` (evaluation where the data lives): ΔW_g as the
        next round will send it. This round's sent states are left as they are."""
        nodes = [self.nodes.nodes[n] for n in node_ids]
        states = self.server_method.states(self, server_round + 1, nodes)
        return {n: states[self.server_method.key(info)] for n, info in zip(node_ids, nodes)}

    def train_config(self, server_round: int) -> dict[str, Any]:
        """What every sampled node is told besides its state."""
        return {"server-round": server_round, **self.server_method.train_config(self)}

    # -- absorbing replies ---------------------------------------------------------------------

    def reply_state(self, node_id: int, rank: int) -> Sent:
        """The state the replying node was sent, by the rank it reports; `ReplyRejected` if none."""
        return self.server_method.reply_state(self, self.nodes.nodes.get(node_id), node_id, rank)

    def upload_shapes(self, sent: Sent) -> dict[str, torch.Size]:
        """Names and shapes of an upload from a node sent `sent`."""
        return self.method.upload_shapes(sent, self.cfg.additive_uploads())

    def absorb(self, node_id: int, upload: Delta, sent: Sent) -> Delta:
        """The node's update τ_k from its checked upload; `ReplyRejected` if its norm is not
        finite or exceeds a numeric `max-update-norm`."""
        tau = self.method.update_from_upload(upload, sent, self.cfg.additive_uploads())
        norm, limit = update_norm(tau), self.cfg.max_update_norm
        if not math.isfinite(norm) or norm > FLOAT32_MAX:  # factors' float64 norm stays finite where s·B·A overflows
            raise ReplyRejected(f"node {node_id}: its model-space update norm is not finite (overflow in s·B·A)")
        if limit not in (None, AUTO) and norm > limit:
            raise ReplyRejected(f"node {node_id}: model-space update norm {norm:.4g} exceeds max-update-norm {limit:g}")
        return tau

    # -- merging and stepping ------------------------------------------------------------------

    def complete(self, server_round: int, contributions: list[Contribution]) -> None:
        """The round's accepted updates into ΔW_g (the server method's combination; by default
        `ΔW_g + server_step(merge(τ_1..τ_K))` with each client's influence bounded)."""
        self.merge_weights = {c.node_id: c.weight for c in contributions}
        self.commit(server_round, *self.server_method.combine(self, server_round, contributions))

    def complete_sum(self, server_round: int, mean: Delta, sent: Sent, upload_coordinates: bool) -> None:
        """A secure round's `Σ p_k v_k` into ΔW_g: `ΔW_g + server_step(scale · Σ p_k τ_k)` (the sum
        is mapped to model space first where clients sent upload coordinates)."""
        if upload_coordinates:
            mean = self.method.additive_update(mean, sent.rank)
        self.commit(server_round, *self.stepped({k: self.scale * v for k, v in mean.items()}))

    def bounded_influence(self, contributions: list[Contribution]) -> list[Contribution]:
        """Each client's influence bounded relative to the round (`max-update-norm = 'auto'`,
        `max-weight-ratio`; `client-weights = 'equal'` counts every client once); what was bounded
        is noted per node."""
        equal = self.cfg.client_weights == "equal"
        updates, weights = [c.update for c in contributions], [1.0 if equal else c.weight for c in contributions]
        nodes = [c.node_id for c in contributions]
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
        self.merge_weights = dict(zip(nodes, weights))
        return [Contribution(n, u, w) for n, u, w in zip(nodes, updates, weights)]

    def merge(self, server_round: int, contributions: list[Contribution]) -> Delta:
        """The operator over the clients' updates, module by module; under central DP the noisy
        mean of the clipped updates (times the operator's scale)."""
        updates = [c.update for c in contributions]
        if self.dp is not None and self.cfg.dp == "central":
            shapes = {module: tensor.shape for module, tensor in self.global_delta.items()}
            mean = self.dp.central_mean(updates, shapes, server_round, population=len(self.nodes.online))
            return {k: self.scale * v for k, v in mean.items()}
        weights = [c.weight for c in contributions]
        return {module: self.merge_module(server_round, index, module, updates, weights)
                for index, module in enumerate(self.global_delta)}

    def merge_module(self, server_round: int, index: int, module: str, updates: list[Delta], weights: list[float]) -> Update:
        """The operator over the updates that have `module`, with their weights (the operators
        normalise them: a layer only some clients trained is their weighted merge); zero if none has it.
        Factored updates stay factored under a mean operator and are densified for any other."""
        having = [k for k, update in enumerate(updates) if module in update]
        if not having:
            current = self.global_delta[module]
            return LowRank.zeros(current.shape) if isinstance(current, LowRank) else torch.zeros_like(current)
        seed = {"seed": operator_seed(self.cfg.seed, server_round, index)} if self.cfg.aggregation in RANDOMIZED else {}
        chosen, claimed = [updates[k][module] for k in having], torch.tensor([weights[k] for k in having])
        if self.operator.kind == MEAN and all(isinstance(u, LowRank) for u in chosen):
            coefficients = self.operator(torch.eye(len(chosen)), claimed, **self.operator_params)  # linear: Σ c_k τ_k
            return LowRank.combination(chosen, coefficients.tolist())
        return self.operator(torch.stack([dense(u) for u in chosen]), claimed, **self.operator_params, **seed)

    def stepped(self, merged: Delta) -> tuple[Delta, dict[str, Delta]]:
        """`ΔW_g + server_step(merged)` and the optimizer's new state (neither committed yet); factored
        modules are re-factored exactly (`LowRank.compacted`)."""
        step, state = self.optimizer.step(merged, self.optimizer_state)
        return {module: compacted(delta + step[module]) for module, delta in self.global_delta.items()}, state

    def commit(self, server_round: int, global_delta: Delta, optimizer_state: dict[str, Delta]) -> None:
        """Take a round's result, unless its global update is not finite or absurdly large: then the
        round fails before ΔW_g and the optimizer state change (the run can resume from its last
        good round; nothing of the failed round is checkpointed)."""
        for module, update in global_delta.items():
            largest = largest_entry(update, exact_above=ABSURD_ENTRY)
            if not math.isfinite(largest) or largest > ABSURD_ENTRY:
                raise RuntimeError(
                    f"round {server_round}: the merged global update of {module} has an entry of {largest:.3g} "
                    f"(non-finite or above {ABSURD_ENTRY:g}); the round is discarded and nothing is checkpointed. "
                    "Resume from an earlier round (resume-round) with stricter max-update-norm / aggregation settings"
                )
        self.global_delta, self.optimizer_state = global_delta, optimizer_state
