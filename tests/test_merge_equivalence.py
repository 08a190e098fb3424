"""fedllm's merge operators against mergekit 0.1.5 and peft on the same inputs, the randomized ones
draw for draw.

Shared draws: mergekit and peft draw their DARE and DELLA masks with `torch.bernoulli`. Here it is
replaced, for each test alone, by a function whose k-th call draws client k's uniforms from the
stream fedllm's operator draws (`client_generators(seed, K)`), so both keep the same entries.
What differs by design is stated per test: fedllm rescales the survivors per entry (1/density for
DARE, 1/keep-probability for DELLA) where mergekit matches L1 norms (its `rescale`), so mergekit
runs with `rescale` off and the per-entry factor is applied to its inputs or output; mergekit's
`normalize` is on (its default is off for task_arithmetic, dare_* and breadcrumbs), since fedllm's
operators divide by the total weight.
"""

from __future__ import annotations

import pytest
import torch

from fedllm import merge as M
from fedllm.merge._chunks import client_generators

mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry", reason="mergekit is in the test extra")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.sparsify import magnitude  # noqa: E402

peft_merge = pytest.importorskip("peft.utils.merge_utils")

CLIENTS, SEED = 4, 11
DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


def updates(shape=(24, 20), clients=CLIENTS, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(clients, *shape, generator=generator), torch.rand(clients, generator=generator) + 0.2


def mergekit(method: str, tensors: torch.Tensor, weights: torch.Tensor, **params) -> torch.Tensor:
    """mergekit's `method` on these client updates (as models over a zero base), per-model
    `weight`, `density`, `gamma`, `epsilon`; shared `normalize`, `rescale`, `lambda`, ..."""
    merger = mergekit_registry.get(method)
    clients = list(range(len(tensors)))
    group = TensorGroup.from_tensors([torch.zeros_like(tensors[0]), *tensors.unbind(0)], ids=["base", *clients],
                                     base_index=0)
    per_model = {"weight": weights.tolist(), **{k: [params.pop(k)] * len(clients)
                                                for k in ("density", "gamma", "epsilon") if k in params}}
    shared = {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0, **params}
    return merger.merge_group(group, **shared, **{k: dict(zip(clients, v)) for k, v in per_model.items()})


class SharedDraws:
    """A stand-in for `torch.bernoulli`: call k keeps entry i of client k where client k's i-th
    uniform of fedllm's stream is below the probability given; the probabilities and masks are kept."""

    def __init__(self, seed: int, clients: int) -> None:
        self.generators = client_generators(seed, clients, torch.device("cpu"))
        self.probabilities: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def __call__(self, probabilities: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert not args and not kwargs, "torch.bernoulli called in a way fedllm's draws do not cover"
        k = len(self.masks)
        uniforms = torch.rand(probabilities.numel(), generator=self.generators[k]).view_as(probabilities)
        mask = (uniforms < probabilities).to(probabilities.dtype)
        self.probabilities.append(probabilities.clone())
        self.masks.append(mask)
        return mask


@pytest.fixture
def shared_draws(monkeypatch):
    draws = SharedDraws(SEED, CLIENTS)
    monkeypatch.setattr(torch, "bernoulli", draws)
    return draws


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- deterministic


def test_weighted_average_and_task_arithmetic_are_mergekits_with_normalize():
    x, w = updates()
    close(M.weighted_average(x, w), mergekit("task_arithmetic", x, w))
    close(M.task_arithmetic(x, w, scale=0.7), mergekit("task_arithmetic", x, w, **{"lambda": 0.7}))


@pytest.mark.parametrize("density", DENSITIES)
def test_ties_is_mergekits_ties_at_every_density(density):
    x, w = updates(seed=1)
    close(M.ties(x, w, density=density, scale=1.3), mergekit("ties", x, w, density=density, **{"lambda": 1.3}))


def test_ties_by_count_is_mergekits_count_consensus_with_equal_weights_except_on_a_tied_count():
    """mergekit counts signs unweighted, fedllm weighs them: they agree at equal weights. Where the
    count is tied mergekit elects +, fedllm elects nothing (the entry merges to 0)."""
    x, _ = updates(seed=2)
    equal = torch.ones(CLIENTS)
    merger = mergekit_registry.get("ties")
    object.__setattr__(merger, "consensus_method", "count")  # mergekit's `ties` with count consensus
    try:
        theirs = mergekit("ties", x, equal, density=0.4)
    finally:
        object.__setattr__(merger, "consensus_method", "sum")
    ours = M.ties(x, equal, density=0.4, election="count")
    trimmed = torch.stack([magnitude(row, density=0.4) for row in x])
    tied = trimmed.sign().sum(0) == 0
    assert 0 < int(tied.sum()) < tied.numel()
    close(ours[~tied], theirs[~tied])
    assert (ours[tied] == 0).all() and (theirs[tied] >= 0).all()


@pytest.mark.parametrize("density, gamma", [(0.2, 0.01), (0.5, 0.05), (0.8, 0.1)])
def test_breadcrumbs_and_breadcrumbs_ties_are_mergekits(density, gamma):
    x, w = updates(seed=3)
    close(M.breadcrumbs(x, w, density=density, gamma=gamma), mergekit("breadcrumbs", x, w, density=density, gamma=gamma))
    close(M.breadcrumbs_ties(x, w, density=density, gamma=gamma),
          mergekit("breadcrumbs_ties", x, w, density=density, gamma=gamma))


# --------------------------------------------------------------------------- DARE, draw for draw


@pytest.mark.parametrize("density", DENSITIES)
def test_dare_linear_and_dare_ties_keep_mergekits_entries_at_every_density(density, monkeypatch):
    """fedllm rescales by 1/density per entry, mergekit (rescale off) not at all: a constant factor."""
    x, w = updates(seed=4)
    for ours, method in ((M.dare_linear, "dare_linear"), (M.dare_ties, "dare_ties")):
        monkeypatch.setattr(torch, "bernoulli", SharedDraws(SEED, CLIENTS))
        theirs = mergekit(method, x, w, density=density)
        close(ours(x, w, density=density, seed=SEED) * density, theirs)


@pytest.mark.parametrize("density", DENSITIES)
def test_dare_is_pefts_draw_for_draw_at_every_density(density, monkeypatch):
    """peft rescales by 1/density like fedllm; its weights are used as given (fedllm normalises
    them), and its TIES election is unweighted (equal weights make them agree)."""
    x, w = updates(seed=5)
    tasks, p, equal = list(x.unbind(0)), w / w.sum(), torch.ones(CLIENTS)
    monkeypatch.setattr(torch, "bernoulli", SharedDraws(SEED, CLIENTS))
    close(M.dare_linear(x, w, density=density, seed=SEED), peft_merge.dare_linear(tasks, p, density))
    monkeypatch.setattr(torch, "bernoulli", SharedDraws(SEED, CLIENTS))
    close(M.dare_ties(x, equal, density=density, seed=SEED), peft_merge.dare_ties(tasks, equal, density))


# --------------------------------------------------------------------------- DELLA, draw for draw


@pytest.mark.parametrize("density, epsilon", [(0.3, 0.1), (0.5, 0.15), (0.7, 0.2), (0.5, 0.0)])
def test_della_keeps_mergekits_entries_with_mergekits_probabilities(density, epsilon, shared_draws):
    """DELLA's MagPrune probabilities are mergekit's (1-D tensors: mergekit ranks within rows),
    and the same draws keep the same entries. fedllm divides each survivor by its own keep
    probability: mergekit's TIES (density 1, so no further pruning) on those rescaled survivors
    is fedllm's DELLA, and their weighted sum its `della_linear`."""
    x, w = updates(shape=(480,), seed=6)
    mergekit("della_linear", x, w, density=density, epsilon=epsilon)
    probabilities = torch.stack([p.view(-1) for p in shared_draws.probabilities])
    masks = torch.stack([m.view(-1) for m in shared_draws.masks])
    ours_probabilities = torch.stack([M.sparsify.della_keep_probabilities(row, density, epsilon) for row in x])
    torch.testing.assert_close(ours_probabilities, probabilities, rtol=0, atol=1e-6)
    survivors = x * masks / probabilities
    p = w / w.sum()
    close(M.della_linear(x, w, density=density, epsilon=epsilon, seed=SEED), (p[:, None] * survivors).sum(0))
    close(M.della(x, w, density=density, epsilon=epsilon, seed=SEED), mergekit("ties", survivors, w, density=1.0))
