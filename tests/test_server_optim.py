"""Server optimizers: each against a direct transcription of its update rule over three rounds."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.server_optim import ServerOptimizer


def updates(rounds: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(rounds)]


def run(optimizer: ServerOptimizer, rounds: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    state, steps = {}, []
    for update in rounds:
        step, state = optimizer.step(update, state)
        steps.append(step)
    return steps


def reference(name: str, deltas: list[float], lr: float, mu: float, b1: float, b2: float, tau: float) -> list[float]:
    """The rules of Reddi et al. 2021 (Alg. 2) and FedAvgM, one scalar at a time."""
    m, v, u, out = 0.0, tau**2, 0.0, []
    for d in deltas:
        if name == "momentum":
            u = mu * u + d
            out.append(lr * u)
            continue
        m = b1 * m + (1 - b1) * d
        if name == "adagrad":
            v = v + d * d
        elif name == "yogi":
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) * (v != d * d)
        else:
            v = b2 * v + (1 - b2) * d * d
        out.append(lr * m / (math.sqrt(v) + tau))
    return out


@pytest.mark.parametrize("name", ["momentum", "adagrad", "yogi", "adam"])
def test_each_optimizer_follows_its_update_rule(name):
    optimizer = ServerOptimizer(name, learning_rate=0.3, momentum=0.7, beta1=0.8, beta2=0.95, tau=0.01)
    rounds = updates()
    steps = run(optimizer, rounds)
    for module in ("a", "b"):
        for index in range(rounds[0][module].numel()):
            deltas = [float(r[module].flatten()[index]) for r in rounds]
            expected = reference(name, deltas, 0.3, 0.7, 0.8, 0.95, 0.01)
            got = [float(s[module].flatten()[index]) for s in steps]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_none_passes_the_merged_update_through():
    rounds = updates(2)
    assert all(torch.equal(s["a"], r["a"]) for s, r in zip(run(ServerOptimizer("none"), rounds), rounds))


@pytest.mark.parametrize("name", ["adagrad", "yogi", "adam"])
def test_adaptive_steps_do_not_depend_on_the_update_scale(name):
    optimizer = ServerOptimizer(name, learning_rate=1e-3, tau=1e-9)
    small = run(optimizer, updates(4))
    large = run(optimizer, [{m: 1000 * d for m, d in u.items()} for u in updates(4)])
    for a, b in zip(small, large):
        assert torch.allclose(a["a"], b["a"], rtol=1e-3)


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of none, momentum, adagrad, yogi, adam"):
        ServerOptimizer("sgd")
