"""A round under secure aggregation: the server learns only sums of what the clients send.

Every exchange is Flower's SecAgg+ protocol (Bell et al. 2020; Flower's `SecAggPlusWorkflow`,
which in Flower 1.42 runs only through the legacy `LegacyContext` + `configure_fit` /
`aggregate_fit` interface, so `_OneExchange` plays that strategy). Clients whose masked vector
does not arrive are dropped from the sum, up to the protocol's reconstruction threshold; beyond
it the round fails (and the run can resume from the last completed round).

One exchange per round: the operators allowed here are linear after each client's own step
(`fedllm.privacy.secure`). With `audit-dir` the server also writes the one thing it learns, the
sum, beside the masked messages (`view-RRRR.safetensors`), so attacks can be run on its view.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedllm.core.aggregator import Aggregator
from fedllm.privacy.secure import IDENTITY_STEP, min_survivors
from server.grid import MeteredGrid
from server.record import RoundResult, weighted_loss

QUANTIZATION_RANGE = 2**22  # Flower's default: values become integers in [0, 2^22]


@dataclass(frozen=True)
class NodeRef:
    """All SecAgg+ needs of a legacy client proxy: its node id."""

    node_id: int


class _OneExchange:
    """The legacy strategy SecAggPlusWorkflow drives: hands out prepared FitIns, keeps the result."""

    def __init__(self, fitins: dict[int, FitIns]) -> None:
        self.fitins = fitins
        self.results: list[tuple[NodeRef, FitRes]] = []
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return [(NodeRef(node), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}


@dataclass
class SecureMean:
    """`Σ n_k x_k / Σ n_k` over the clients that completed the protocol, and their reports."""

    arrays: list[np.ndarray]
    examples: dict[int, int]
    metrics: dict[int, dict]


def secure_mean(
    grid: MeteredGrid, context: Context, aggregator: Aggregator, server_round: int, fitins: dict[int, FitIns],
    timeout: float,
) -> SecureMean:
    """One SecAgg+ exchange: each node gets its FitIns and answers with a masked vector."""
    cfg = aggregator.cfg
    exchange = _OneExchange(fitins)
    legacy = LegacyContext(context, ServerConfig(num_rounds=server_round), exchange)  # type: ignore[arg-type]
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # unused: every node's FitIns has its state
    max_weight = max(aggregator.nodes.nodes[n].num_examples for n in fitins)
    SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares, reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        max_weight=float(max_weight), clipping_range=cfg.secagg_clipping_range,
        quantization_range=QUANTIZATION_RANGE, timeout=timeout,
    )(grid, legacy)
    if not exchange.results:
        raise RuntimeError(
            f"round {server_round}: secure aggregation halted: fewer clients completed the protocol than its "
            f"reconstruction threshold ({cfg.secagg_reconstruction_threshold} of the shares); the run can resume"
        )
    mean = parameters_to_ndarrays(exchange.results[0][1].parameters)
    return SecureMean(
        mean, {ref.node_id: res.num_examples for ref, res in exchange.results},
        {ref.node_id: dict(res.metrics) for ref, res in exchange.results},
    )


def secure_round(
    grid: MeteredGrid, context: Context, aggregator: Aggregator, server_round: int, rounds: int, timeout: float,
) -> RoundResult:
    """Train and merge under SecAgg+: `ΔW_g + server_step(scale · Σ p_k v_k)` from one secure sum."""
    cfg, method = aggregator.cfg, aggregator.method
    nodes = aggregator.sample(server_round)
    aggregator.begin(server_round, nodes)
    if len(aggregator.sent) > 1:
        raise RuntimeError(f"round {server_round}: nodes of ranks {sorted(aggregator.sent)} were sampled; secure "
                           "aggregation sums the same tensors from every client, so all nodes need the same lora-rank")
    rank, sent = next(iter(aggregator.sent.items()))
    identity = cfg.aggregation in IDENTITY_STEP
    names = list(method.upload_shapes(sent, additive=True) if identity else aggregator.global_delta)
    fewest = min_survivors(len(nodes), cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold)
    config = {**aggregator.train_config(server_round), "state-names": "\n".join(sent.state),
              "upload-names": "\n".join(names), "lora-rank": rank, "min-survivors": fewest}
    state = [t.numpy() for t in sent.state.values()]
    result = secure_mean(grid, context, aggregator, server_round, {n: fitins_for(state, config) for n in nodes}, timeout)
    survivors = len(result.examples)
    log(INFO, "round %d/%d: secure sum of %d of %d client(s)", server_round, rounds, survivors, len(nodes))
    mean = {name: torch.from_numpy(np.asarray(a, dtype=np.float32)) for name, a in zip(names, result.arrays)}
    grid.audit_view(f"view-{server_round:04d}", mean)
    aggregator.complete_sum(server_round, mean, sent, upload_coordinates=identity)
    clipped = sum(int(m.get("secure-clipped", 0)) for m in result.metrics.values())
    if clipped:
        log(INFO, "round %d: %d value(s) exceeded secagg-clipping-range %g and were clipped", server_round, clipped,
            cfg.secagg_clipping_range)
    losses = {n: float(m["train_loss"]) for n, m in result.metrics.items() if "train_loss" in m}  # withheld under DP
    loss = weighted_loss(losses, {n: float(w) for n, w in result.examples.items()}) if cfg.dp == "none" else None
    partitions = aggregator.nodes.partition_of()
    train_seconds = {partitions[n]: float(m["train-seconds"]) for n, m in result.metrics.items() if "train-seconds" in m}
    return RoundResult(survivors, len(nodes) - survivors, loss, train_seconds=train_seconds, min_survivors=fewest)


def fitins_for(arrays: list[np.ndarray], config: dict) -> FitIns:
    return FitIns(ndarrays_to_parameters(arrays), config)
