"""Merge operators under secure aggregation: what each client computes, what the server learns.

Under SecAgg+ the server learns only `Σ_k p_k x_k` (p_k = n_k / Σn) of what clients send. An
operator runs there when it is linear after a step each client takes on its own update:
`weighted_average` and `task_arithmetic` (no step), `magnitude_prune` and `breadcrumbs` (the
client trims its own update), `dare_linear` (the client drops and rescales with a mask from its
own secret randomness, which the server cannot regenerate); the merge is `scale · Σ_k p_k v_k`.

Refused, with the reason: order statistics (`median`, `trimmed_mean`) need every client's value,
and sign consensus (`ties`, `dare_ties`, `della`) needs the weight of the clients agreeing with
the elected sign per entry, a second release that tells the server which clients agreed and, where
one did, that client's exact value (docs/privacy.md has the measurements).
"""

from __future__ import annotations

import torch

from fedllm.merge import CLIENT_STEP, MEAN, OPERATOR_KINDS, RANDOMIZED, SIGN_CONSENSUS, get_operator, operators_of

SECURE_OPERATORS = operators_of(MEAN, CLIENT_STEP)
IDENTITY_STEP = operators_of(MEAN)  # no client step: any additive coordinates will do
SIGN_CONSENSUS_LEAK = (
    "its disjoint mean needs a second secure sum, of the weights of the clients agreeing with the elected sign, and "
    "with the example-count weights the server knows that sum names the agreeing clients and exposes a lone agreeing "
    "client's exact value (simulations/privacy_audit.py: 76% of a client's kept entries with 2 clients, 47% with 5)"
)


def refusal(operator: str) -> str | None:
    """Why `operator` cannot run under secure aggregation, or None if it can."""
    if operator in SECURE_OPERATORS:
        return None
    why = (SIGN_CONSENSUS_LEAK if OPERATOR_KINDS.get(operator) == SIGN_CONSENSUS
           else "it needs every client's individual update (an order statistic across clients), which secure "
                "aggregation hides from the server")
    return (f"aggregation {operator!r} cannot run under secure aggregation: {why}; with secure-aggregation = true "
            f"use one of {', '.join(SECURE_OPERATORS)}")


def client_step(operator: str, update: torch.Tensor, params: dict, seed: int) -> torch.Tensor:
    """A client's own part of `operator`: the operator applied to this client alone (its trim,
    drop and rescale), without the final `scale`; `seed` must be the client's secret."""
    local = {name: value for name, value in params.items() if name != "scale"}
    if operator in RANDOMIZED:
        local["seed"] = seed
    return get_operator(operator)(update[None], torch.ones(1), **local)


def min_survivors(sampled: int, num_shares: float, reconstruction_threshold: float) -> int:
    """The fewest clients a SecAgg+ sum can complete with: Flower 1.42's `SecAggPlusWorkflow`
    halts once a client has fewer active neighbours (itself included) than its threshold, which
    for fractional settings is max(2, round(threshold · shares)), shares = round(num_shares · K)
    made odd (or K when that leaves ≤ 2)."""
    shares = round(num_shares * sampled)
    if shares < sampled and shares % 2 == 0:
        shares += 1
    if shares <= 2:
        shares = sampled
    return min(sampled, max(round(reconstruction_threshold * shares), 2))
