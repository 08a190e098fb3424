"""What f malicious clients out of K can do to one round's merge, per operator: the table in
docs/threat-model.md.

    python simulations/threat_table.py [--clients 5 10] [--entries 4096] [--seeds 20]

Honest clients send model-space updates that share a direction (what training on one task family
gives) plus their own noise, with example counts 40..80. The f attackers each try three attacks:

- `scale`: its own honest update ×1e6 (the `norm` fault);
- `flip`: the honest consensus reversed, sent as long as the defaults let through (3× the median
  norm; without them, ×1e3), with the example count the others have;
- `flip+claim`: `flip` while claiming 10^6 examples.

Each cell is the deviation the attack causes, ‖merge(attacked) − merge(honest)‖ / ‖merge(honest)‖,
mean over seeds, first with the shipped defaults (`max-update-norm = 'auto'`, `max-weight-ratio =
4`, applied before the operator as the server does), then with both off. 1.0 means the attackers
moved the merge as far as the whole honest merge is long. Operators at their default parameters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.config import RunConfig  # noqa: E402
from fedllm.merge import OPERATORS, RANDOMIZED, get_operator  # noqa: E402
from fedllm.robust import AUTO_NORM_RATIO, cap_weights, clip_to_median  # noqa: E402

ATTACKS = ("scale", "flip", "flip+claim")
WEIGHT_RATIO = RunConfig().max_weight_ratio


def honest_round(clients: int, entries: int, seed: int) -> tuple[list[torch.Tensor], list[float]]:
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(entries, generator=generator)
    updates = [0.01 * (shared + torch.randn(entries, generator=generator)) for _ in range(clients)]
    weights = [float(w) for w in torch.randint(40, 81, (clients,), generator=generator)]
    return updates, weights


def attacked(updates: list[torch.Tensor], weights: list[float], f: int, attack: str, defaults: bool):
    """The round with the first `f` clients attacking."""
    consensus = torch.stack(updates[f:]).mean(0)
    norms = sorted(float(u.norm()) for u in updates)
    longest_allowed = (AUTO_NORM_RATIO if defaults else 1e3) * norms[len(norms) // 2]
    updates, weights = list(updates), list(weights)
    for k in range(f):
        if attack == "scale":
            updates[k] = updates[k] * 1e6
        else:
            updates[k] = -consensus / consensus.norm() * longest_allowed
        if attack == "flip+claim":
            weights[k] = 1e6
    return updates, weights


def merged(operator: str, updates: list[torch.Tensor], weights: list[float], defaults: bool) -> torch.Tensor:
    if defaults:
        bounded, _ = clip_to_median([{"u": u} for u in updates], AUTO_NORM_RATIO)
        updates = [b["u"] for b in bounded]
        weights, _ = cap_weights(weights, WEIGHT_RATIO)
    params = {"seed": 0} if operator in RANDOMIZED else {}
    return get_operator(operator)(torch.stack(updates), torch.tensor(weights), **params)


def deviation(operator: str, clients: int, f: int, attack: str, defaults: bool, entries: int, seeds: int) -> float:
    values = []
    for seed in range(seeds):
        updates, weights = honest_round(clients, entries, seed)
        reference = merged(operator, updates, weights, defaults)
        bad_updates, bad_weights = attacked(updates, weights, f, attack, defaults)
        values.append(float((merged(operator, bad_updates, bad_weights, defaults) - reference).norm() / reference.norm()))
    return statistics.mean(values)


def table(clients: int, entries: int, seeds: int) -> str:
    attackers = sorted({1, (clients - 1) // 2})
    header = [f"f={f}, {attack}" for f in attackers for attack in ATTACKS]
    rows = [f"K = {clients}: deviation with the defaults (without them)", "",
            "| operator | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for operator in sorted(OPERATORS):
        cells = []
        for f in attackers:
            for attack in ATTACKS:
                on = deviation(operator, clients, f, attack, True, entries, seeds)
                off = deviation(operator, clients, f, attack, False, entries, seeds)
                cells.append(f"{on:.2f} ({_big(off)})")
        rows.append(f"| {operator} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _big(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--entries", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    for clients in args.clients:
        print(table(clients, args.entries, args.seeds), end="\n\n")


if __name__ == "__main__":
    main()
