"""One bad client among three or more cannot take over the merge under the shipped defaults: its
update is scaled down to a few times the round's median norm and its weight is capped."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedllm.adapters import factor_key
from fedllm.config import ConfigError, RunConfig
from fedllm.core.nodes import NodeInfo
from fedllm.lowrank import dense
from fedllm.robust import AUTO_NORM_RATIO, cap_weights, clip_to_median, update_norm
from tests.test_faults import MODULE, RANK, reply, transport


def updates(scales: list[float]) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"m": torch.randn(5, 3, generator=generator) * s} for s in scales]


def test_an_update_far_above_the_median_is_scaled_down_to_the_bound_and_the_others_untouched():
    honest = updates([1.0, 1.1, 0.9, 1e6])
    bounded, clipped = clip_to_median(honest, AUTO_NORM_RATIO)
    median = sorted(update_norm(u) for u in honest)[1:3]
    assert clipped == [3]
    assert update_norm(bounded[3]) == pytest.approx(AUTO_NORM_RATIO * sum(median) / 2, rel=1e-6)
    assert all(bounded[k] is honest[k] for k in range(3))
    assert torch.allclose(bounded[3]["m"] / update_norm(bounded[3]), honest[3]["m"] / update_norm(honest[3]))


def test_two_updates_have_no_majority_and_are_left_alone():
    pair = updates([1.0, 1e6])
    assert clip_to_median(pair, AUTO_NORM_RATIO) == (pair, [])
    assert cap_weights([40.0, 1e9], 4.0) == ([40.0, 1e9], [])


def test_a_claimed_weight_is_capped_at_a_multiple_of_the_median():
    assert cap_weights([40.0, 60.0, 1e9], 4.0) == ([40.0, 60.0, 240.0], [2])
    assert cap_weights([40.0, 60.0, 200.0], 4.0) == ([40.0, 60.0, 200.0], [])


def three_clients(attacker_scale: float = 1.0, attacker_examples: int = 40, **overrides):
    """The plain round's reply handling with three admitted nodes, and their replies: node 22's B
    times `attacker_scale`, its example count `attacker_examples` (what it also claimed at start-up)."""
    nodes = {20: NodeInfo(0, RANK, 40), 21: NodeInfo(1, RANK, 50), 22: NodeInfo(2, RANK, attacker_examples)}
    s = transport(nodes, **{"max-update-norm": "auto", **overrides})
    replies = []
    for node in (20, 21, 22):
        generator = torch.Generator().manual_seed(node)
        b = torch.randn(4, RANK, generator=generator) * 0.1 * (attacker_scale if node == 22 else 1.0)
        arrays = ArrayRecord({factor_key(MODULE, "A"): torch.randn(RANK, 6, generator=generator) * 0.1,
                              factor_key(MODULE, "B"): b})
        metrics = MetricRecord({"num-examples": nodes[node].num_examples, "train_loss": 0.5, "lora-rank": RANK})
        replies.append(reply(RecordDict({"arrays": arrays, "metrics": metrics}), node=node))
    return s, replies


def merged(s, replies) -> torch.Tensor:
    """ΔW_g after the round (not committed: the unbounded attack is meant to go past the absurd-entry check)."""
    contributions, _, rejected = s.accepted(1, replies)
    assert not rejected
    new_global, _ = s.aggregator.server_method.combine(s.aggregator, 1, contributions)
    return dense(new_global[MODULE])


def test_a_client_scaling_its_upload_a_millionfold_moves_the_merge_a_few_honest_updates_at_most():
    honest_round, honest_replies = three_clients()
    honest = merged(honest_round, honest_replies)
    s, replies = three_clients(attacker_scale=1e6)
    attacked = merged(s, replies)
    assert attacked.norm() <= AUTO_NORM_RATIO * honest.norm() * 3
    assert s.aggregator.bounded == [f"node 22: update scaled down to {AUTO_NORM_RATIO:g}x the round's median norm"]
    unbounded, replies = three_clients(attacker_scale=1e6, **{"max-update-norm": ""})
    assert merged(unbounded, replies).norm() > 1e4 * honest.norm(), "without the bound the attack works"


def test_a_client_claiming_a_million_examples_gains_no_more_than_the_capped_weight():
    s, replies = three_clients(attacker_examples=10**6)
    taus = [dense(s.contribution(r)[0].update[MODULE]) for r in replies]
    expected = (40 * taus[0] + 50 * taus[1] + 4 * 50 * taus[2]) / (40 + 50 + 4 * 50)  # capped at 4x the median, 50
    assert torch.allclose(merged(s, replies), expected, atol=1e-6)
    assert s.aggregator.bounded == ["node 22: weight capped at 4x the round's median"]
    uncapped, replies = three_clients(attacker_examples=10**6, **{"max-weight-ratio": ""})
    cosine = torch.nn.functional.cosine_similarity(merged(uncapped, replies).flatten(), taus[2].flatten(), dim=0)
    assert cosine > 0.9999, "without the cap the claimed examples buy the whole merge"


def test_equal_client_weights_merge_every_client_alike_whatever_it_claims():
    s, replies = three_clients(attacker_examples=10**6, **{"client-weights": "equal", "max-weight-ratio": ""})
    taus = [dense(s.contribution(r)[0].update[MODULE]) for r in replies]
    assert torch.allclose(merged(s, replies), sum(taus) / 3, atol=1e-6)
    assert s.aggregator.merge_weights == {20: 1.0, 21: 1.0, 22: 1.0}


@pytest.mark.parametrize("privacy", [{"secure-aggregation": True}, {"dp": "central", "dp-clip-norm": 1.0}])
def test_equal_client_weights_are_refused_where_the_privacy_layer_weighs_clients_itself(privacy):
    with pytest.raises(ConfigError, match="client-weights = 'equal' does not combine"):
        RunConfig.from_flower({"client-weights": "equal", **privacy})
