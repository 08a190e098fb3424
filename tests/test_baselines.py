"""The baselines' server methods: what centralized and local-only send, and where updates land.

In-process on the production aggregator (real runs of both are in the tiny study of tests/test_study.py).
"""

from __future__ import annotations

import pytest
import torch

from fedllm.adapters import factor_key
from fedllm.config import ConfigError, RunConfig
from fedllm.core.aggregator import Aggregator, Contribution
from fedllm.core.nodes import NodeInfo
from fedllm.core.server_methods import Centralized, LocalOnly, ServerMethod, build_server_method
from fedllm.core.server_methods.local_only import own_update
from fedllm.methods import Sent
from fedllm.methods.lora import Layer, Lora

MODULE, RANK, SHAPE = "layer", 2, (4, 6)
NODES = {10 + p: NodeInfo(partition_id=p, rank=RANK, num_examples=40) for p in range(4)}


def aggregator(**overrides) -> Aggregator:
    cfg = RunConfig.from_flower(overrides)
    a = Aggregator(cfg, Lora(cfg, {MODULE: Layer(torch.Size(SHAPE), transposed=False)}))
    for node, info in NODES.items():
        a.nodes.admit(node, info)
    a.start()
    return a


def play_round(a: Aggregator, server_round: int) -> dict[int, tuple[Sent, dict]]:
    """Each sampled node's state and the seeded random change it 'trained', merged by the aggregator."""
    nodes = a.sample(server_round)
    a.begin(server_round, nodes)
    played, contributions = {}, []
    for node in nodes:
        sent = a.state_for(node)
        generator = torch.Generator().manual_seed(server_round * 100 + node)
        change = {name: torch.randn(t.shape, generator=generator) * 0.1 for name, t in sent.state.items()}
        contributions.append(Contribution(node, a.absorb(node, change, a.reply_state(node, RANK)), 40.0))
        played[node] = (sent, change)
    a.complete(server_round, contributions)
    return played


def model_space(a: Aggregator, sent: Sent, change: dict) -> torch.Tensor:
    """s·B·A of what the client held after training."""
    a_, b = (sent.state[factor_key(MODULE, f)] + change[factor_key(MODULE, f)] for f in "AB")
    return a.method.scaling(RANK) * b @ a_


@pytest.mark.parametrize("fraction, clients", [(1.0, 4), (0.5, 2), (0.25, 2)])  # 0.25 of 4 is below min-clients 2
def test_centralized_trains_one_client_for_the_steps_of_a_federated_round(fraction, clients):
    a = aggregator(**{"baseline": "centralized", "fraction-train": fraction, "local-steps": 7})
    assert a.sample(1) == [10], "the node of the lowest partition"
    assert a.train_config(1)["local-steps"] == 7 * clients and a.min_clients == 1


def test_centralized_keeps_its_single_update_as_it_is():
    a = aggregator(**{"baseline": "centralized", "aggregation": "ties"})  # an operator would trim a lone update
    ((sent, change),) = play_round(a, 1).values()
    torch.testing.assert_close(a.global_delta[MODULE], model_space(a, sent, change), rtol=1e-5, atol=1e-6)


def test_local_only_keeps_each_clients_update_apart():
    a = aggregator(baseline="local-only")
    assert sorted(a.global_delta) == [f"partition-{p}/{MODULE}" for p in range(4)]
    for node, (sent, change) in play_round(a, 1).items():
        torch.testing.assert_close(own_update(a.global_delta, NODES[node].partition_id)[MODULE],
                                   model_space(a, sent, change), rtol=1e-5, atol=1e-6)
    # the next round sends each client its own update back, and only it
    a.begin(2, a.sample(2))
    for node, info in NODES.items():
        sent = a.state_for(node).state
        torch.testing.assert_close(a.method.scaling(RANK) * sent[factor_key(MODULE, "B")] @ sent[factor_key(MODULE, "A")],
                                   own_update(a.global_delta, info.partition_id)[MODULE], rtol=1e-4, atol=1e-6)
    assert a.server_method.final_update(a) is None, "local-only has no single model to export"


def test_server_methods_are_built_by_baseline_and_baselines_refuse_privacy_settings():
    assert type(build_server_method(RunConfig.from_flower({}), None)) is ServerMethod
    assert isinstance(build_server_method(RunConfig.from_flower({"baseline": "local-only"}), None), LocalOnly)
    assert isinstance(build_server_method(RunConfig.from_flower({"baseline": "centralized"}), None), Centralized)
    with pytest.raises(ConfigError, match="non-private reference; set secure-aggregation = false"):
        RunConfig.from_flower({"baseline": "centralized", "secure-aggregation": True, "peft-method": "ffa-lora"})
    with pytest.raises(ConfigError, match="baseline = 'fedavg' is not accepted"):
        RunConfig.from_flower({"baseline": "fedavg"})
