"""The update space: exact aggregation of LoRA updates and low-rank re-factoring."""

from __future__ import annotations

import pytest
import torch

from fedllm.adapters import (
    Leading, Subspaces, deltas_from_state, factor_key, leading_singular, refactor, refactor_ranks, subspace_iteration,
)
from fedllm.merge import get_operator


def random_lora_state(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA state dict with random factors for modules of (d_out, d_in) shapes."""
    state = {}
    for module, (d_out, d_in) in shapes.items():
        state[factor_key(module, "A")] = torch.randn(rank, d_in, generator=generator)
        state[factor_key(module, "B")] = torch.randn(d_out, rank, generator=generator)
    return state


def test_aggregating_lora_updates_is_exact_where_factor_averaging_is_not():
    generator = torch.Generator().manual_seed(1)
    shapes = {"layer.q_proj": (24, 16), "layer.down_proj": (16, 40)}
    layouts = {m: False for m in shapes}
    rank, scaling, clients = 4, 2.0, 5
    states = [random_lora_state(shapes, rank, generator) for _ in range(clients)]
    weights = torch.tensor([3.0, 1.0, 7.0, 2.0, 5.0])
    p = weights / weights.sum()
    average = get_operator("weighted_average")
    for module in shapes:
        taus = torch.stack([deltas_from_state(s, scaling, layouts)[module] for s in states])
        merged = average(taus, weights)
        a, b = factor_key(module, "A"), factor_key(module, "B")
        exact = sum(p[k] * scaling * states[k][b] @ states[k][a] for k in range(clients))
        factor_avg = scaling * sum(p[k] * states[k][b] for k in range(clients)) @ sum(p[k] * states[k][a] for k in range(clients))
        assert torch.allclose(merged, exact, atol=1e-5, rtol=1e-5)
        assert (factor_avg - exact).norm() / exact.norm() > 0.1


def test_refactor_is_exact_within_rank_and_reports_truncation_error():
    generator = torch.Generator().manual_seed(2)
    low_rank = torch.randn(30, 3, generator=generator) @ torch.randn(3, 20, generator=generator)
    full = torch.randn(30, 20, generator=generator)
    layouts = {"m": False}
    scaling = 16 / 8
    exact = refactor({"m": low_rank}, 8, scaling, layouts, seed=0)
    product = deltas_from_state(exact.state, scaling, layouts)["m"]
    assert torch.allclose(product, low_rank, atol=1e-4)
    assert exact.relative_error < 1e-5

    truncated = refactor({"m": full}, 4, scaling, layouts, seed=0)
    product = deltas_from_state(truncated.state, scaling, layouts)["m"]
    u, s, vh = torch.linalg.svd(full)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert torch.allclose(product, best, atol=1e-4)
    direct = float((full - best).norm() / full.norm())
    assert truncated.relative_error == pytest.approx(direct, rel=1e-4)


def test_zero_update_refactors_to_trainable_factors_with_zero_product():
    refactored = refactor({"m": torch.zeros(12, 10)}, 4, 2.0, {"m": False}, seed=3)
    a, b = refactored.state[factor_key("m", "A")], refactored.state[factor_key("m", "B")]
    assert torch.count_nonzero(b) == 0
    assert (a.abs().sum(dim=1) > 0).all(), "every A row must be non-zero so B receives gradients"
    assert refactored.relative_error == 0.0


def test_every_rank_is_cut_from_one_factorization_as_if_refactored_alone():
    generator = torch.Generator().manual_seed(3)
    delta = {"q": torch.randn(12, 10, generator=generator), "c": torch.randn(10, 14, generator=generator)}
    layouts = {"q": False, "c": True}
    shared = refactor_ranks(delta, {2: 4.0, 5: 2.0, 8: 1.0}, layouts, seed=7, subspaces=Subspaces())
    for rank, scaling in ((2, 4.0), (5, 2.0), (8, 1.0)):
        alone = refactor(delta, rank, scaling, layouts, seed=7)
        assert shared[rank].state.keys() == alone.state.keys()
        for name, tensor in alone.state.items():
            torch.testing.assert_close(shared[rank].state[name], tensor, rtol=0, atol=0)
        assert shared[rank].squared_error == pytest.approx(alone.squared_error, rel=1e-9)


def large_module(generator: torch.Generator, rows: int = 2100, cols: int = 2200, rank: int = 64):
    """A module above the exact-SVD size with a slowly decaying spectrum σ_i = i^-0.3 (so a cold
    subspace iteration converges slowly) and its singular vectors."""
    u = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
    sigma = torch.arange(1, rank + 1).float() ** -0.3
    return u, sigma, v


def squared_error(leading: Leading, matrix: torch.Tensor) -> float:
    return float((matrix - (leading.u * leading.sigma) @ leading.vh).pow(2).sum())


def test_a_large_modules_factors_start_from_last_rounds_subspace_and_need_one_iteration():
    generator = torch.Generator().manual_seed(0)
    u, sigma, v = large_module(generator)
    first = (u * sigma) @ v.T
    subspaces, rank = Subspaces(), 8
    cold = leading_singular(first, rank, "mlp", subspaces, generator, float(first.double().pow(2).sum()))
    best = float(sigma[rank:].pow(2).sum())  # Eckart–Young: the energy beyond the top 8
    assert squared_error(cold, first) == pytest.approx(best, rel=2e-3)
    assert cold.tail == pytest.approx(squared_error(cold, first), rel=1e-3)
    assert subspaces.bases["mlp"].shape == (2200, rank + 10)
    # the next round's ΔW_g moves a little: one iteration from the kept subspace is near optimal
    du = torch.linalg.qr(torch.randn(2100, 2, generator=generator)).Q
    dv = torch.linalg.qr(torch.randn(2200, 2, generator=generator)).Q
    second = first + 0.05 * du @ dv.T
    basis = torch.linalg.qr(torch.cat([u, du], dim=1)).Q
    best = float(torch.linalg.svdvals(basis.T @ second)[rank:].pow(2).sum())
    warm = leading_singular(second, rank, "mlp", subspaces, generator, float(second.double().pow(2).sum()))
    assert squared_error(warm, second) <= best * (1 + 2e-4)
    # ... where one iteration from a random start is not
    u1, s1, vh1 = subspace_iteration(second, torch.randn(2200, rank + 10, generator=generator), iterations=1)
    assert squared_error(Leading(u1[:, :rank], s1[:rank], vh1[:rank], 0.0), second) > best * 1.01


def test_a_subspace_of_another_shape_is_not_used():
    subspaces = Subspaces({"mlp": torch.ones(2200, 18)})
    assert subspaces.start("mlp", 2200, 18) is not None
    assert subspaces.start("mlp", 2200, 26) is None and subspaces.start("other", 2200, 18) is None
