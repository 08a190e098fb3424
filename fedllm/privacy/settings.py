"""Privacy's run-config keys: secure aggregation (SecAgg+), differential privacy, and the secret
seed of what the server must not predict (docs/privacy.md)."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.merge import MEAN, operators_of
from fedllm.privacy.dp import ACCOUNTANTS
from fedllm.privacy.secure import refusal
from fedllm.robust import AUTO
from fedllm.settings import ConfigError, Settings, choice, anything, positive, setting

DP_OPERATORS = operators_of(MEAN)  # a mean of clipped updates has sensitivity C / K


@dataclass(frozen=True)
class PrivacySettings(Settings):
    """Secure aggregation and client-level differential privacy."""

    secure_aggregation: bool = setting(
        "secure-aggregation", False, anything, "true or false",
        "clients' updates are summed under SecAgg+; the server sees only sums (docs/privacy.md)",
    )
    secagg_clipping_range: float = setting(
        "secagg-clipping-range", 8.0, positive, "a number > 0",
        "secure aggregation: largest |value| sent (larger ones are clipped and counted)",
    )
    secagg_num_shares: float = setting(
        "secagg-num-shares", 1.0, lambda v: 0 < v <= 1, "a fraction in (0, 1]",
        "secure aggregation: share of the sampled clients each client's secrets are split among",
    )
    secagg_reconstruction_threshold: float = setting(
        "secagg-reconstruction-threshold", 0.6, lambda v: 0 < v <= 1, "a fraction in (0, 1]",
        "secure aggregation: share of the shares needed to unmask (more may drop out, at least 2 remain)",
    )
    dp: str = setting(
        "dp", "none", lambda v: v in ("none", "central", "local"), "none, central or local",
        "client-level differential privacy: noise on the sum (central) or on each upload (local)",
    )
    dp_clip_norm: float = setting(
        "dp-clip-norm", 1.0, positive, "a number > 0", "DP: bound C on each client's update norm (initial C if adaptive)",
    )
    dp_noise_multiplier: float = setting(
        "dp-noise-multiplier", 1.0, lambda v: v >= 0, "a number >= 0", "DP: noise std z in units of C (z = 0: clip only, ε = ∞)",
    )
    dp_adaptive_clipping: bool = setting(
        "dp-adaptive-clipping", False, anything, "true or false",
        "DP central: adapt C towards a quantile of the update norms (Andrew et al. 2021)",
    )
    dp_target_quantile: float = setting(
        "dp-target-quantile", 0.5, lambda v: 0 < v < 1, "a number in (0, 1)", "DP adaptive clipping: share of updates left unclipped",
    )
    dp_clip_learning_rate: float = setting(
        "dp-clip-learning-rate", 0.2, positive, "a number > 0", "DP adaptive clipping: step of the geometric update of C",
    )
    dp_count_noise: float | None = setting(
        "dp-count-noise", None, positive, "'' (max(sampled clients / 20, z)) or a number > dp-noise-multiplier / 2",
        "DP adaptive clipping: noise std on the count of unclipped updates",
    )
    dp_delta: float = setting("dp-delta", 1e-5, lambda v: 0 < v < 1, "a number in (0, 1)", "DP: δ of the (ε, δ) guarantee")
    dp_target_epsilon: float | None = setting(
        "dp-target-epsilon", None, positive, "'' (no limit) or a number > 0",
        "DP: stop, with outputs saved, before a round would take ε past this",
    )
    dp_sampling_amplification: bool = setting(
        "dp-sampling-amplification", False, anything, "true or false",
        "central DP without secure aggregation: sample each node with probability fraction-train from secret "
        "randomness (Poisson) and account with amplification by sampling",
    )
    dp_accountant: str = choice(
        "dp-accountant", "rdp", ACCOUNTANTS, "DP: Google dp-accounting's RDP or PLD accountant",
    )
    secret_seed: int | None = setting(
        "secret-seed", None, lambda v: v >= 0, "'' (secret, from the OS) or an integer >= 0",
        "seed of what the server must not predict (DP noise and sampling, secure DARE/DELLA drop masks); "
        "set it only for reproducible experiments, and then keep it secret",
    )

    def check(self) -> None:
        self.check_secure_aggregation()
        self.check_dp()

    def check_secure_aggregation(self) -> None:
        """What secure aggregation cannot combine with, refused before anything starts."""
        if not self.secure_aggregation:
            return
        if why := refusal(self.aggregation):
            raise ConfigError(f"run-config {why}")
        problems = {
            "upload-dtype": self.upload_dtype != "float32",
            "upload-sparsity": self.upload_sparsity is not None,
        }
        if bad := [key for key, set_ in problems.items() if set_]:
            raise ConfigError(f"run-config {', '.join(bad)} cannot be set with secure-aggregation = true: SecAgg+ "
                              "quantizes and masks every value itself, so leave them at their defaults")
        if self.max_update_norm not in (None, AUTO):
            raise ConfigError("run-config max-update-norm needs the server to see each update's norm, which secure "
                              "aggregation hides; bound updates with dp-clip-norm instead, or leave it ''")
        if len({int(r) for r in self.client_ranks.split(",") if r.strip()}) > 1:
            raise ConfigError("run-config client-ranks gives clients different ranks; secure aggregation sums the same "
                              "tensors from every client, so leave client-ranks '' (one lora-rank for all)")
        if self.min_clients < 2:
            raise ConfigError("run-config min-clients must be >= 2 with secure-aggregation = true (SecAgg+ masks "
                              "each update with the others')")

    def check_dp(self) -> None:
        """DP needs a merge whose sensitivity is bounded by the clip norm: the (uniform) mean."""
        if self.dp == "none":
            if self.dp_sampling_amplification:
                raise ConfigError("run-config dp-sampling-amplification applies to dp = 'central' only")
            return
        if self.aggregation not in DP_OPERATORS:
            raise ConfigError(f"run-config dp = {self.dp!r} needs aggregation {' or '.join(DP_OPERATORS)} (a mean "
                              f"of clipped updates has sensitivity C / K); {self.aggregation!r} has no such bound")
        if self.dp_adaptive_clipping and self.dp_count_noise is not None and 2 * self.dp_count_noise <= self.dp_noise_multiplier:
            raise ConfigError(f"run-config dp-count-noise = {self.dp_count_noise:g} would use up the whole budget of "
                              f"dp-noise-multiplier {self.dp_noise_multiplier:g}; it must exceed dp-noise-multiplier / 2")
        if self.dp_adaptive_clipping and (self.dp != "central" or self.secure_aggregation):
            raise ConfigError("run-config dp-adaptive-clipping needs dp = 'central' without secure aggregation (the "
                              "server must count the clients whose update norm is below C)")
        if self.dp_sampling_amplification and (self.dp != "central" or self.secure_aggregation):
            raise ConfigError("run-config dp-sampling-amplification needs dp = 'central' without secure aggregation: "
                              "amplification assumes a sampling nobody who sees the output can predict, and only the "
                              "trusted central server draws it (under secure aggregation the server it hides from "
                              "would choose the clients)")
        if self.dp_sampling_amplification and self.dp_adaptive_clipping:
            raise ConfigError("run-config dp-sampling-amplification does not combine with dp-adaptive-clipping (the "
                              "count of unclipped clients would be divided by the secret sample's size); set one false")
        if self.dp_sampling_amplification and self.fraction_train >= 1:
            raise ConfigError("run-config dp-sampling-amplification needs fraction-train < 1 (the sampling probability)")

    def dp_bounds_updates(self) -> bool:
        """Whether DP or secure aggregation already bounds each update (clip norm C, SecAgg+'s
        clipping range), so `max-update-norm = 'auto'` has nothing to add (and must not: a bound
        from the round's median would make one client's clipping depend on the others')."""
        return self.dp != "none" or self.secure_aggregation

    def client_side_dp(self) -> bool:
        """Whether clients clip and add noise themselves (local DP, or DP under secure aggregation)."""
        return self.dp == "local" or (self.dp == "central" and self.secure_aggregation)
