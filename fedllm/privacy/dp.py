"""Client-level differential privacy primitives on model-space updates (pure functions, no Flower).

An update is `dict[str, Tensor]` (float32, one client's model-space update). The unit of privacy is
one client: neighbouring runs differ by adding or removing one client's whole contribution
(central and distributed DP), or, for local DP, by replacing a client's input with any other.

- Clipping: one global L2 norm per update, Δ ← Δ·min(1, C/‖Δ‖)   (DP-FedAvg, McMahan et al. 2018,
  arXiv 1710.06963).
- Gaussian noise with multiplier z on a release of sensitivity S: σ = z·S. Central: S = C on the
  sum. Distributed under secure aggregation: each client adds σ/√T, T the fewest clients the
  protocol lets a round complete with, so any completed sum carries at least N(0, (zC)²). Local:
  S = 2C (any two inputs, both clipped to C).
- Adaptive clipping: C tracks a quantile γ of the update norms from a noisy count of unclipped
  clients, with centred bits b − ½ (sensitivity ½), as in Andrew et al. 2021, "Differentially
  Private Learning with Adaptive Clipping", arXiv 1905.03871, Sec. 3.1.
- Accounting with Google's `dp_accounting` (RDP or PLD): one Gaussian release per round, with
  amplification by Poisson sampling of rate q when the run samples clients that way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

Update = dict[str, torch.Tensor]
ACCOUNTANTS = ("rdp", "pld")


def update_norm(update: Update) -> float:
    """L2 norm of all tensors of the update taken together, accumulated in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.values()))


def clip(update: Update, clip_norm: float) -> tuple[Update, float]:
    """Scale the whole update by min(1, C/‖Δ‖) (DP-FedAvg, arXiv 1710.06963); return it and ‖Δ‖ before clipping.

    An update already within C (including a zero update) is returned unchanged (as copies).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(update)
    if norm <= clip_norm:
        return {name: t.clone() for name, t in update.items()}, norm
    scale = clip_norm / norm
    return {name: t * scale for name, t in update.items()}, norm


def gaussian_noise(shapes: dict[str, torch.Size], std: float, generator: torch.Generator) -> Update:
    """Independent N(0, std²) float32 entries per tensor, drawn from `generator` in the order of the
    tensors' names (not of `shapes`: a dict read back from a checkpoint may list them otherwise)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return {
        name: torch.randn(shapes[name], generator=generator, dtype=torch.float32) * std for name in sorted(shapes)
    }


def central_noise_std(clip_norm: float, noise_multiplier: float) -> float:
    """σ = z·C, added once to the SUM of clipped updates (its add/remove-one-client sensitivity is C)."""
    return noise_multiplier * clip_norm


def distributed_noise_std(clip_norm: float, noise_multiplier: float, min_survivors: int) -> float:
    """σ_k = z·C/√T from each client, T the fewest clients a secure sum can complete with: any sum
    of S ≥ T clients carries N(0, z²C²·S/T), at least what central DP puts on the sum."""
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be >= 1, got {min_survivors}")
    return noise_multiplier * clip_norm / math.sqrt(min_survivors)


def distributed_multiplier(noise_multiplier: float, survivors: int, min_survivors: int) -> float:
    """The multiplier a completed distributed-DP sum actually has: z·√(S/T) for S of the clients
    that each added σ_k = z·C/√T (S ≥ T, so never below z)."""
    return noise_multiplier * math.sqrt(survivors / min_survivors)


def local_noise_std(clip_norm: float, noise_multiplier: float) -> float:
    """σ = z·2C on each client's own clipped update: local DP protects any two inputs of the
    client, whose clipped updates differ by up to 2C, so every upload is a Gaussian mechanism with
    multiplier z (the usual local definition, Dwork & Roth 2014, Def. 2.4 with replacement)."""
    return noise_multiplier * 2 * clip_norm


def clipped_fraction_bits(norms: list[float], clip_norm: float) -> list[int]:
    """b_k = 1 if ‖Δ_k‖ ≤ C (client k was not clipped) else 0 (Andrew et al. 2021, arXiv 1905.03871, Alg. 1)."""
    return [1 if norm <= clip_norm else 0 for norm in norms]


def noisy_fraction(bits: list[int], count_std: float, generator: torch.Generator) -> float:
    """b̄ = (Σ_k (b_k − ½) + N(0, σ_b²)) / K + ½: the private fraction of unclipped clients.

    The bits are centred, so adding or removing one client moves the noised sum by at most ½;
    that is the sensitivity `update_noise_multiplier` assumes (arXiv 1905.03871, Sec. 3.1).
    """
    if not bits:
        raise ValueError("noisy_fraction needs at least one bit")
    if count_std < 0:
        raise ValueError(f"count_std must be >= 0, got {count_std}")
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_std
    return (sum(b - 0.5 for b in bits) + noise) / len(bits) + 0.5


def next_clip_norm(
    clip_norm: float, noisy_fraction_unclipped: float, target_quantile: float, learning_rate: float
) -> float:
    """Geometric update C ← C·exp(−η·(b̄ − γ)) towards the γ-quantile of the norms (arXiv 1905.03871, Sec. 2.2)."""
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
    return clip_norm * math.exp(-learning_rate * (noisy_fraction_unclipped - target_quantile))


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update's multiplier when the noisy count (std σ_b on the sum of
    centred bits, sensitivity ½, so multiplier 2σ_b) shares the budget; the pair is then one Gaussian
    mechanism with multiplier z, because Gaussian mechanisms compose as (Σ z_i⁻²)^(−1/2) (arXiv 1905.03871, Sec. 3.1)."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for adaptive clipping with DP, got {noise_multiplier}")
    if not count_std > 0:
        raise ValueError(f"count_std must be > 0 for adaptive clipping with DP, got {count_std}")
    remaining = noise_multiplier**-2 - (2 * count_std) ** -2
    if remaining <= 0:
        raise ValueError(
            f"count noise std {count_std} would consume the whole privacy budget of noise multiplier "
            f"{noise_multiplier}: need 2·count_std > noise_multiplier (raise count_std or lower noise_multiplier)"
        )
    return remaining**-0.5


@dataclass(frozen=True)
class Accountant:
    """ε of a run of Gaussian releases under add/remove-one-client, with `dp_accounting` ("rdp" or "pld").

    With `sampling_rate` q < 1 each round's release is amplified by Poisson sampling: it assumes
    every client took part in a round independently with probability q, drawn from randomness that
    no one who sees the outputs knows (fedllm's `dp-sampling-amplification` draws it so).
    """

    kind: str = "rdp"
    delta: float = 1e-5
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNTANTS:
            raise ValueError(f"accountant {self.kind!r} is unknown; choose one of {', '.join(ACCOUNTANTS)}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")

    def epsilon(self, noise_multipliers: list[float]) -> float:
        """ε(δ) after one Gaussian release per entry (Poisson-sampled at q < 1), composed."""
        if any(z < 0 for z in noise_multipliers):
            raise ValueError(f"noise multipliers must be >= 0, got {noise_multipliers}")
        if not noise_multipliers:
            return 0.0
        if any(z == 0 for z in noise_multipliers):
            return math.inf
        import dp_accounting  # here, not at the top: clients never account, and it is slow to import
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant

        def release(z: float) -> dp_accounting.DpEvent:
            gaussian = dp_accounting.GaussianDpEvent(z)
            return gaussian if self.sampling_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)

        event = dp_accounting.ComposedDpEvent(
            [dp_accounting.SelfComposedDpEvent(release(z), count) for z, count in Counter(noise_multipliers).items()]
        )
        if self.kind == "rdp":
            accountant = rdp_privacy_accountant.RdpAccountant()
        else:
            accountant = pld_privacy_accountant.PLDAccountant()
        return float(accountant.compose(event).get_epsilon(self.delta))
