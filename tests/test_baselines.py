"""The baselines' strategies: what centralized and local-only send, and where updates land.

(Real runs of both are in the tiny study of tests/test_study.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.adapters import factor_key
from fedllm.config import ConfigError, RunConfig
from fedllm.methods.lora import Layer, Lora
from server.baselines import CentralizedStrategy, LocalOnlyStrategy, build_strategy, own_update
from server.strategy import ModelSpaceStrategy
from server.validation import NodeInfo

MODULE, RANK, SHAPE = "layer", 2, (4, 6)


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    """Messages are created outside a Flower app here: give them a run id as the ServerApp would."""
    from flwr.supercore.task_identity import TaskIdentity

    for identity in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, identity, 1)


NODES = {10 + p: NodeInfo(partition_id=p, rank=RANK, num_examples=40) for p in range(4)}


def strategy(kind: type[ModelSpaceStrategy], **overrides) -> ModelSpaceStrategy:
    cfg = RunConfig.from_flower(overrides)
    s = kind(cfg, Lora(cfg, {MODULE: Layer(torch.Size(SHAPE), transposed=False)}))
    s.nodes, s.online = dict(NODES), set(NODES)
    return s


def trained_reply(message, seed: int) -> SimpleNamespace:
    """A reply to `message` whose A and B moved by a seeded random step."""
    node, received = message.metadata.dst_node_id, message.content["arrays"].to_torch_state_dict()
    generator = torch.Generator().manual_seed(seed)
    change = {name: torch.randn(t.shape, generator=generator) * 0.1 for name, t in received.items()}
    metrics = MetricRecord({"num-examples": 40, "train_loss": 0.5, "lora-rank": RANK})
    content = RecordDict({"arrays": ArrayRecord(change), "metrics": metrics})
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), content=content,
                           has_error=lambda: False)


def play_round(s: ModelSpaceStrategy, server_round: int, global_delta: dict) -> tuple[list, dict]:
    messages = list(s.configure_train(server_round, ArrayRecord(global_delta), ConfigRecord(), grid=None))
    replies = [trained_reply(m, seed=server_round * 100 + m.metadata.dst_node_id) for m in messages]
    arrays, _ = s.aggregate_train(server_round, replies)
    return messages, arrays.to_torch_state_dict()


def model_space(s: ModelSpaceStrategy, message, reply) -> torch.Tensor:
    """s·B·A of what the client held after training."""
    sent, change = message.content["arrays"].to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict()
    a, b = (sent[factor_key(MODULE, f)] + change[factor_key(MODULE, f)] for f in "AB")
    return s.method.scaling(RANK) * b @ a


@pytest.mark.parametrize("fraction, clients", [(1.0, 4), (0.5, 2), (0.25, 2)])  # 0.25 of 4 is below min-clients 2
def test_centralized_trains_one_client_for_the_steps_of_a_federated_round(fraction, clients):
    s = strategy(CentralizedStrategy, **{"fraction-train": fraction, "local-steps": 7})
    (message,) = s.configure_train(1, ArrayRecord(s.initial_update()), ConfigRecord(), grid=None)
    assert message.metadata.dst_node_id == 10, "the node of the lowest partition"
    assert message.content["config"]["local-steps"] == 7 * clients


def test_centralized_keeps_its_single_update_as_it_is():
    s = strategy(CentralizedStrategy, **{"aggregation": "ties"})  # an operator would trim a lone update
    (message,), new_global = play_round(s, 1, s.initial_update())
    reply = trained_reply(message, seed=100 + message.metadata.dst_node_id)
    torch.testing.assert_close(new_global[MODULE], model_space(s, message, reply), rtol=1e-5, atol=1e-6)


def test_local_only_keeps_each_clients_update_apart():
    s = strategy(LocalOnlyStrategy)
    state = s.initial_update()
    assert sorted(state) == [f"partition-{p}/{MODULE}" for p in range(4)]
    messages, after_one = play_round(s, 1, state)
    for message in messages:
        partition = NODES[message.metadata.dst_node_id].partition_id
        reply = trained_reply(message, seed=100 + message.metadata.dst_node_id)
        torch.testing.assert_close(own_update(after_one, partition)[MODULE], model_space(s, message, reply),
                                   rtol=1e-5, atol=1e-6)
    # the next round sends each client its own update back, and only it
    messages = list(s.configure_train(2, ArrayRecord(after_one), ConfigRecord(), grid=None))
    for message in messages:
        partition = NODES[message.metadata.dst_node_id].partition_id
        sent = message.content["arrays"].to_torch_state_dict()
        a, b = sent[factor_key(MODULE, "A")], sent[factor_key(MODULE, "B")]
        torch.testing.assert_close(s.method.scaling(RANK) * b @ a, own_update(after_one, partition)[MODULE],
                                   rtol=1e-4, atol=1e-6)
    assert s.final_update(after_one) is None, "local-only has no single model to export"


def test_build_strategy_and_baselines_refuse_privacy_settings():
    assert type(build_strategy(RunConfig.from_flower({}), None)) is ModelSpaceStrategy
    assert isinstance(build_strategy(RunConfig.from_flower({"baseline": "local-only"}), None), LocalOnlyStrategy)
    with pytest.raises(ConfigError, match="non-private reference; set secure-aggregation = false"):
        RunConfig.from_flower({"baseline": "centralized", "secure-aggregation": True, "peft-method": "ffa-lora"})
    with pytest.raises(ConfigError, match="baseline = 'fedavg' is not accepted"):
        RunConfig.from_flower({"baseline": "fedavg"})
