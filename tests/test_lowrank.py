"""The factored server path: updates and ΔW_g kept as `L·Rᵀ` give the server model the dense path
gives, for every operator and server optimizer, and its arithmetic is exact to float32 round-off."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.adapters import refactor
from fedllm.checkpoint import RunState, read_state, save_state
from fedllm.core.aggregator import Contribution
from fedllm.lowrank import LowRank, dense, flatten, largest_entry, squared_norm, unflatten
from tests.test_methods import Client, Server, config
from tests.tiny_models import tiny_gpt2, tiny_llama


def random_lowrank(rows: int, cols: int, rank: int, seed: int, scale: float = 1.0) -> LowRank:
    generator = torch.Generator().manual_seed(seed)
    return LowRank.of(scale * torch.randn(rows, rank, generator=generator), torch.randn(cols, rank, generator=generator))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sums_and_scalings_of_factors_equal_those_of_the_dense_matrices():
    a, b = random_lowrank(60, 40, 3, 0), random_lowrank(60, 40, 5, 1)
    total = 2.0 * a - b / 4 + LowRank.combination([a, b], [0.5, -1.0])
    assert isinstance(total, LowRank) and total.rank == 8
    assert relative(total.dense(), 2.5 * a.dense() - 1.25 * b.dense()) < 1e-5
    assert relative((a + torch.ones(60, 40)), a.dense() + 1) < 1e-6, "with a dense tensor the sum is dense"
    assert isinstance(torch.ones(60, 40) - a, torch.Tensor)


def test_compacting_keeps_the_matrix_drops_cancelled_directions_and_is_an_svd():
    a, b = random_lowrank(80, 50, 6, 2), random_lowrank(80, 50, 4, 3, scale=0.01)
    residue = (a + b) - a  # the large term cancels to round-off
    assert residue.rank == 4 and relative(residue.dense(), b.dense()) < 1e-4
    u, sigma, v = (a + b).svd()
    assert torch.allclose(u.T @ u, torch.eye(len(sigma)), atol=1e-5) and torch.allclose(v.T @ v, torch.eye(len(sigma)), atol=1e-5)
    assert torch.all(sigma[:-1] >= sigma[1:])
    assert torch.allclose(sigma, torch.linalg.svdvals((a + b).dense())[: len(sigma)], rtol=1e-4)


def test_a_stack_as_large_as_the_matrix_becomes_dense():
    wide = random_lowrank(10, 8, 6, 4)
    assert isinstance(wide.compacted(), torch.Tensor) and relative(wide.compacted(), wide.dense()) < 1e-6


def test_norms_and_entry_bounds_of_factors_match_the_dense_matrix():
    a = random_lowrank(70, 30, 4, 5)
    assert squared_norm(a) == pytest.approx(float(a.dense().double().pow(2).sum()), rel=1e-6)
    exact = float(a.dense().abs().max())
    assert largest_entry(a) == pytest.approx(exact, rel=1e-6), "above the bound threshold the entry is exact"
    assert exact <= largest_entry(a, exact_above=1e9), "below it, a true upper bound"
    assert largest_entry(LowRank.of(torch.full((3, 1), float("inf")), torch.ones(2, 1))) != largest_entry(a)


def test_overflowing_factors_are_left_for_the_finiteness_checks_not_zeroed():
    huge = LowRank.of(torch.full((4, 2), 1e30), torch.full((6, 2), 1e30))
    assert huge.compacted().rank > 0 and squared_norm(huge) > torch.finfo(torch.float32).max
    nan = LowRank.of(torch.full((4, 2), float("nan")), torch.ones(6, 2))
    assert nan.compacted() is nan


def test_factors_are_stored_and_read_back_as_they_were(tmp_path):
    global_delta = {"a": (random_lowrank(20, 15, 2, 6) + random_lowrank(20, 15, 1, 7)), "b": torch.randn(3, 3)}
    moments = {"u": {"a": random_lowrank(20, 15, 2, 8)}}
    state = read_state(save_state(tmp_path, RunState(1, global_delta, moments, [{"round": 0}, {"round": 1}], {}, "d")))
    restored = state.global_delta["a"]
    assert isinstance(restored, LowRank) and restored.orthogonal
    assert torch.equal(restored.stacked()[0], global_delta["a"].stacked()[0])
    assert torch.equal(state.global_delta["b"], global_delta["b"])
    assert torch.equal(state.optimizer_state["u"]["a"].stacked()[1], moments["u"]["a"].stacked()[1])
    with pytest.raises(ValueError, match="do not pair up"):
        unflatten({k: v for k, v in flatten(global_delta).items() if not k.endswith("@svd-right")})


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_refactoring_factors_gives_the_factors_of_the_dense_update(make_base):
    base = make_base()
    method = Server(config("lora"), base).method
    factored = {m: random_lowrank(*layer.shape, 3, i) for i, (m, layer) in enumerate(method.layers.items())}
    for rank in (2, 4):
        from_factors = refactor(factored, rank, 2.0, method.layouts, seed=0)
        from_dense = refactor({m: u.dense() for m, u in factored.items()}, rank, 2.0, method.layouts, seed=0)
        assert from_factors.relative_error == pytest.approx(from_dense.relative_error, rel=1e-3, abs=1e-6)
        products = [method.model_space(r.state, rank) for r in (from_factors, from_dense)]
        for module in factored:
            assert relative(dense(products[0][module]), dense(products[1][module])) < 1e-4


def wide_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


# Operators continuous in their inputs; the selecting ones (TIES, DARE, ...) may flip an entry at a
# threshold on round-off, so they are compared over one round only, below.
CONTINUOUS = ["weighted_average", "task_arithmetic", "median", "trimmed_mean"]


def run_both(cfg, rounds: int) -> tuple[dict, dict]:
    """ΔW_g after `rounds` rounds of three rank-2 clients, on a factored and on a dense server."""
    base = wide_llama()  # three rounds of three rank-2 clients stay below every layer's dense break-even rank
    servers = [Server(cfg, base), Server(cfg, base)]
    servers[1].method.factored = False
    servers[1].aggregator.start()
    assert servers[0].method.factored and isinstance(next(iter(servers[0].update.values())), LowRank)
    clients = [Client(cfg, base, rank=2) for _ in range(3)]
    for round_ in range(1, rounds + 1):
        for server in servers:
            sent = server.method.sent_state(server.update, 2, seed=round_)
            uploads = [c.round(copy.deepcopy(sent.state), seed=10 * round_ + k) for k, c in enumerate(clients)]
            contributions = [Contribution(k, server.aggregator.absorb(k, u, sent), 10.0 + k) for k, u in enumerate(uploads)]
            server.aggregator.complete(round_, contributions)
    return servers[0].update, servers[1].update


@pytest.mark.parametrize("optimizer", ["none", "momentum", "adam"])
@pytest.mark.parametrize("operator", CONTINUOUS)
def test_three_rounds_of_the_factored_server_give_the_dense_servers_model(operator, optimizer):
    cfg = config("lora", aggregation=operator, **{"server-optimizer": optimizer, "server-learning-rate":
                                                   1e-3 if optimizer == "adam" else 1.0})
    factored, plain = run_both(cfg, rounds=3)
    for module in plain:
        assert relative(dense(factored[module]), plain[module]) < 1e-4, module
    kept = [u for u in factored.values() if isinstance(u, LowRank)]
    assert bool(kept) == (operator in ("weighted_average", "task_arithmetic") and optimizer != "adam"), \
        "a mean keeps ΔW_g factored; entry-wise operators and moments make it dense"


@pytest.mark.parametrize("operator", ["ties", "dare_ties", "della", "breadcrumbs"])
def test_a_round_of_a_selecting_operator_on_factored_updates_is_the_dense_round(operator):
    factored, plain = run_both(config("lora", aggregation=operator), rounds=1)
    for module in plain:
        assert relative(dense(factored[module]), plain[module]) < 1e-3, module


def test_a_clients_update_holds_the_sent_and_uploaded_tensors_and_k_updates_merge_into_k_plus_2_parts():
    cfg = config("lora")
    server = Server(cfg, wide_llama())
    server.aggregator.restore({m: random_lowrank(*layer.shape, 3, i) for i, (m, layer) in enumerate(server.method.layers.items())}, {}, {})
    sent = server.method.sent_state(server.update, 2, seed=0)
    uploads = [{k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(k_)) for k, v in sent.state.items()}
               for k_ in range(4)]
    taus = [server.aggregator.absorb(k, dict(u), sent) for k, u in enumerate(uploads)]
    module = next(iter(server.method.layers))
    held = {t.data_ptr() for u in uploads + [sent.state] for t in u.values()}
    assert all(factor.data_ptr() in held for _, *factors in taus[0][module].parts for factor in factors), \
        "no factor of a client's update is a copy"
    merged = LowRank.combination([t[module] for t in taus], [0.1, 0.2, 0.3, 0.4])
    assert len(merged.parts) == 4 + 2 and merged.rank == (4 + 2) * 2
    expected = sum(c * dense(t[module]) for c, t in zip([0.1, 0.2, 0.3, 0.4], taus))
    assert relative(merged.dense(), expected) < 1e-5
