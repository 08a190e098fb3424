"""Differential privacy on the server: central DP-FedAvg with optional adaptive clipping and
sampling amplification, and the accountant of every DP run.

Central DP (McMahan et al. 2018, arXiv 1710.06963): every client's model-space update is clipped
to norm C, the clipped updates are summed, Gaussian noise N(0, (zC)²) is added to the sum, and
the sum is divided by the number of clients (by the expected number q·N under Poisson sampling,
so the divisor reveals nothing), so one client changes the released mean by at most C/K. With
adaptive clipping (Andrew et al. 2021, arXiv 1905.03871) C follows a quantile of the update norms,
learnt from a noisy count of centred bits; the update's noise multiplier shrinks so that the
round still costs one release at `dp-noise-multiplier`. Local DP and DP under secure aggregation
add their noise on the clients (`client/privacy.py`); the server accounts for what was released:
under secure aggregation z·√(S/T) for S survivors of clients calibrated for T.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedllm.adapters import Delta
from fedllm.config import RunConfig
from fedllm.privacy import (
    Accountant, central_noise_std, clip, clipped_fraction_bits, distributed_multiplier, gaussian_noise,
    next_clip_norm, noisy_fraction, update_noise_multiplier,
)
from fedllm.seeds import secret_generator


@dataclass
class ServerDp:
    """The run's DP state: the current clip norm and the noise multiplier of every completed round."""

    cfg: RunConfig
    clip_norm: float = 0.0
    releases: list[float] = field(default_factory=list)  # per completed round: its noise multiplier
    accountant: Accountant = field(init=False)

    def __post_init__(self) -> None:
        self.clip_norm = self.clip_norm or self.cfg.dp_clip_norm
        sampling_rate = self.cfg.fraction_train if self.cfg.dp_sampling_amplification else 1.0  # q; 1: none
        self.accountant = Accountant(self.cfg.dp_accountant, self.cfg.dp_delta, sampling_rate)

    def describe(self) -> list[str]:
        """What this DP configuration does that a user might not expect, said at start-up."""
        cfg = self.cfg
        notes = [f"dp = {cfg.dp!r}: clients are weighted equally (aggregation {cfg.aggregation!r} becomes a uniform "
                 "mean: an example-count weight would let one client move the mean by more than C/K), and they "
                 "withhold their train loss, training time and example count, which ε does not cover"]
        if cfg.dp == "local":
            notes.append("dp = 'local': each upload gets N(0, (2zC)²), sensitivity 2C (any two inputs of a client); "
                         "ε is per client, for one that took part in every round")
        if cfg.dp_sampling_amplification:
            notes.append(f"dp-sampling-amplification: each node takes part with probability {cfg.fraction_train:g} "
                         "from secret randomness (Poisson), the mean divides by the expected count, and ε assumes no "
                         "reader of the outputs learns who was sampled; min-clients does not apply to the sample")
        return notes

    def epsilon(self) -> float:
        """ε after the completed rounds."""
        return self.accountant.epsilon(self.releases)

    def allows_another_round(self) -> bool:
        """Whether one more round (at worst a release at z) keeps ε within `dp-target-epsilon`."""
        target = self.cfg.dp_target_epsilon
        return target is None or self.accountant.epsilon([*self.releases, self.cfg.dp_noise_multiplier]) <= target

    def complete_round(self, survivors: int, min_survivors: int | None) -> float:
        """Account for a completed round; under secure aggregation with `survivors` of the clients
        whose noise was calibrated for `min_survivors`. Returns the round's multiplier."""
        z = self.cfg.dp_noise_multiplier
        if self.cfg.secure_aggregation:
            z = distributed_multiplier(z, survivors, min_survivors)
        self.releases.append(z)
        return z

    def restore(self, rows: list[dict]) -> None:
        """The state after the rounds recorded in `rows` (metrics.jsonl, round 0 first)."""
        self.releases = [float(row["dp_noise_multiplier"]) for row in rows[1:]]
        self.clip_norm = float(rows[-1].get("dp_clip_norm", self.clip_norm))

    def _secret(self, *labels: object) -> torch.Generator:
        """One secret stream of this run: `secret-seed`'s (else the OS's), apart per public seed and label."""
        return secret_generator(self.cfg.secret_seed, self.cfg.seed, *labels)

    def poisson_sample(self, nodes: list[int], server_round: int) -> list[int]:
        """Each node independently with probability q, from secret randomness (its own stream per round)."""
        draws = torch.rand(len(nodes), generator=self._secret("sample", server_round),
                           dtype=torch.float64)
        return [node for node, draw in zip(nodes, draws.tolist()) if draw < self.cfg.fraction_train]

    def count_noise(self, count: int) -> float:
        """`dp-count-noise`, else max(K/20, z): the paper's K/20, but never so small that the
        count would use up the round's budget (2σ_b must exceed z)."""
        return self.cfg.dp_count_noise or max(count / 20, self.cfg.dp_noise_multiplier)

    def central_mean(self, updates: list[Delta], shapes: dict[str, torch.Size], server_round: int,
                     population: int) -> Delta:
        """`(Σ clip(τ_k) + N(0, (z_Δ C)²)) / K`, then (adaptive) the next C from a noisy count.

        K is the number of updates, or q·`population` under Poisson sampling (then the sample may
        be empty, and the round releases noise alone). Noise is drawn from its own stream per round.
        """
        z = self.cfg.dp_noise_multiplier
        expected = self.cfg.fraction_train * population if self.cfg.dp_sampling_amplification else len(updates)
        clipped, norms = zip(*(clip(u, self.clip_norm) for u in updates)) if updates else ((), ())
        count_std = self.count_noise(round(expected))
        if self.cfg.dp_adaptive_clipping and z > 0:
            z = update_noise_multiplier(z, count_std)
        generator = self._secret("central-noise", server_round)
        noise = gaussian_noise(shapes, central_noise_std(self.clip_norm, z), generator)
        mean = {k: (sum((c[k] for c in clipped), torch.zeros(shape)) + noise[k]) / expected
                for k, shape in shapes.items()}
        if self.cfg.dp_adaptive_clipping and norms:
            bits = clipped_fraction_bits(list(norms), self.clip_norm)
            fraction = noisy_fraction(bits, count_std, self._secret("count-noise", server_round))
            self.clip_norm = next_clip_norm(self.clip_norm, fraction, self.cfg.dp_target_quantile,
                                            self.cfg.dp_clip_learning_rate)
        return mean
