"""What the server can learn, and what ε really is, per privacy configuration: the figures in
docs/privacy.md's threat model.

    python simulations/privacy_audit.py [--entries 20000] [--seeds 5]

Secure aggregation (each attack sees exactly what the server would: example counts, the run's
public seed, and the secure sums):

- `two-phase TIES` (the protocol fedllm now refuses): from the sum of agreeing weights Σ p_k m_k
  the server names the agreeing clients per entry (unique subset sums), and where one client
  agreed reads its exact trimmed value from Σ p_k a_k. Reported: share of each client's kept
  entries recovered exactly.
- `DARE seeds`: the attacker regenerates every client's drop mask from (seed, round, partition),
  as the masks were seeded before, and claims "only client j kept this entry, so its value is
  sum / p_j · density". Reported: the precision of those claims (1.0: every claim exact) with
  server-known seeds and with each client's secret randomness (what fedllm does now; the
  precision then falls to the prior P(only j kept), i.e. the attacker learns nothing from the seeds).
- `sparse sum`: under any sparse client step (magnitude_prune, breadcrumbs, dare_linear) an entry
  that only one client kept is, in the sum, that client's value times its weight. The server
  cannot tell those entries from others, but they are there: reported is their share of a
  client's kept entries.

ε (RDP, δ = 1e-5, z = 1, 30 rounds, K = 10): the figures the findings of issue 16 quoted, as
fedllm reports them now and as recomputed from the mechanisms with dp_accounting.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.config import RunConfig  # noqa: E402
from fedllm.privacy import update_noise_multiplier  # noqa: E402
from fedllm.privacy.secure import client_step, min_survivors  # noqa: E402
from fedllm.privacy.central import ServerDp  # noqa: E402

EXAMPLES = [40, 55, 63, 71, 80]  # example counts the server knows from the start-up answers


def two_phase_ties_exposure(clients: int, entries: int, seed: int, density: float = 0.2) -> float:
    """Share of each client's kept entries the server reads exactly from the refused two-phase TIES."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.tensor(EXAMPLES[:clients], dtype=torch.float64)
    p = p / p.sum()
    values = torch.stack([client_step("magnitude_prune", torch.randn(entries, generator=generator).double(),
                                      {"density": density}, 0) for _ in range(clients)])
    sign = torch.sign((p[:, None] * values).sum(0))
    agrees = (torch.sign(values) == sign) & (values != 0)
    weight_sum = (p[:, None] * agrees).sum(0)  # phase 2, first sum
    value_sum = (p[:, None] * values * agrees).sum(0)  # phase 2, second sum
    subsets = {round(float(sum(p[list(s)])), 12): s for r in range(1, clients + 1)
               for s in itertools.combinations(range(clients), r)}
    recovered = kept = 0
    for k in range(clients):
        for e in torch.nonzero(values[k]).flatten().tolist():
            kept += 1
            named = subsets.get(round(float(weight_sum[e]), 12))
            if named == (k,) and float(value_sum[e] / p[k]) == float(values[k, e]):
                recovered += 1
    return recovered / kept


def dare_claim_precision(clients: int, entries: int, seed: int, secret: bool, density: float = 0.5) -> float:
    """Precision of 'only client j kept entry e, its value is sum/(p_j/density)' from regenerated masks."""
    p = torch.tensor(EXAMPLES[:clients], dtype=torch.float64)
    p = p / p.sum()
    public_seeds = [1000 * seed + k for k in range(clients)]  # what the server could compute
    used_seeds = [s + 7_777_777 for s in public_seeds] if secret else public_seeds
    ones = torch.ones(entries)
    truly_kept = torch.stack([client_step("dare_linear", ones, {"density": density}, s) != 0 for s in used_seeds])
    guessed_kept = torch.stack([client_step("dare_linear", ones, {"density": density}, s) != 0 for s in public_seeds])
    right = claims = 0
    for j in range(clients):
        claim = guessed_kept[j] & (guessed_kept.sum(0) == 1)
        truth = truly_kept[j] & (truly_kept.sum(0) == 1)
        claims += int(claim.sum())
        right += int((claim & truth).sum())
    return right / claims


def sparse_sum_exposure(clients: int, density: float) -> float:
    """Share of a client's kept entries that no other client kept (independent trims)."""
    return (1 - density) ** (clients - 1)


def epsilon_figures() -> list[tuple[str, float, float]]:
    """(finding, ε fedllm reports now, ε recomputed from the mechanism) at z = 1, 30 rounds, K = 10."""
    def direct(multipliers: list[float]) -> float:
        events = [dp_accounting.GaussianDpEvent(z) for z in multipliers]
        return RdpAccountant().compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(1e-5)

    rows = []
    adaptive = ServerDp(RunConfig.from_flower({"dp": "central", "dp-adaptive-clipping": True}))
    sigma_b = adaptive.count_noise(10)
    for _ in range(30):
        adaptive.complete_round(10, None)
    rows.append(("adaptive clipping (count at sensitivity 1/2)", adaptive.epsilon(),
                 direct([update_noise_multiplier(1.0, sigma_b), sigma_b / 0.5] * 30)))
    secure = ServerDp(RunConfig.from_flower({"dp": "central", "secure-aggregation": True}))
    fewest = min_survivors(10, 1.0, 0.6)
    for _ in range(30):
        secure.complete_round(6, fewest)
    rows.append(("distributed DP, 6 of 10 survive (noise for T = 6)", secure.epsilon(),
                 direct([math.sqrt(6 / fewest)] * 30)))
    local = ServerDp(RunConfig.from_flower({"dp": "local"}))
    for _ in range(30):
        local.complete_round(10, None)
    rows.append(("local DP (noise 2zC, sensitivity 2C)", local.epsilon(), direct([2 * 1.0 / 2] * 30)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    seeds = range(args.seeds)

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    print(f"Secure aggregation attacks ({args.entries} entries, mean ± sd over {args.seeds} seeds)")
    print("| clients | two-phase TIES: kept entries read exactly | DARE claims exact, server-known seeds | "
          "DARE claims exact, secret masks | sparse sum: kept entries no other client kept (d = 0.2 / 0.5) |")
    print("|---|---|---|---|---|")
    for clients in (2, 3, 5):
        ties = [two_phase_ties_exposure(clients, args.entries, s) for s in seeds]
        public = [dare_claim_precision(clients, args.entries, s, secret=False) for s in seeds]
        secret = [dare_claim_precision(clients, args.entries, s, secret=True) for s in seeds]
        print(f"| {clients} | {spread(ties)} | {spread(public)} | {spread(secret)} | "
              f"{sparse_sum_exposure(clients, 0.2):.2f} / {sparse_sum_exposure(clients, 0.5):.2f} |")
    print("\nε at z = 1, 30 rounds, K = 10, δ = 1e-5 (RDP)")
    print("| mechanism | ε fedllm reports | ε recomputed from the mechanism |")
    print("|---|---|---|")
    for name, reported, recomputed in epsilon_figures():
        print(f"| {name} | {reported:.1f} | {recomputed:.1f} |")


if __name__ == "__main__":
    main()
