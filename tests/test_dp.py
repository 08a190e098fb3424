"""Client-level DP primitives: clipping, noise scale, secret streams, sensitivities, adaptive
clipping, and ε checked against independent computations (dp_accounting called directly from
the mechanism's own sensitivities, and opacus' RDP accountant)."""

from __future__ import annotations

import logging
import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from opacus.accountants import RDPAccountant

from fedllm.config import RunConfig
from fedllm.privacy import (
    Accountant,
    central_noise_std,
    clip,
    clipped_fraction_bits,
    distributed_multiplier,
    distributed_noise_std,
    gaussian_noise,
    local_noise_std,
    next_clip_norm,
    noisy_fraction,
    update_noise_multiplier,
    update_norm,
)
from fedllm.privacy.central import ServerDp
from fedllm.privacy.secure import min_survivors
from fedllm.seeds import secret_generator

SHAPES = {"a": torch.Size([400, 250]), "b": torch.Size([100_000])}  # 200k entries


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in update.values()])


def test_clip_bounds_norm_and_reports_pre_clip_norm():
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 100.0):
        update = {"a": torch.randn(7, 5, generator=g) * scale, "b": torch.randn(11, generator=g) * scale}
        expected = math.sqrt(float(flat(update).pow(2).sum()))
        clipped, norm = clip(update, 1.0)
        assert norm == pytest.approx(expected, rel=1e-12)
        assert update_norm(clipped) <= 1.0 + 1e-6
        if expected > 1.0:
            assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
            assert torch.allclose(clipped["a"], update["a"] / expected)  # direction kept, one global scale


def test_small_and_zero_updates_are_unchanged_and_bad_clip_raises():
    small = {"a": torch.tensor([0.3, -0.4])}  # norm 0.5
    clipped, norm = clip(small, 1.0)
    assert torch.equal(clipped["a"], small["a"]) and norm == pytest.approx(0.5)
    zero, norm = clip({"a": torch.zeros(3)}, 1.0)
    assert torch.equal(zero["a"], torch.zeros(3)) and norm == 0.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip_norm"):
            clip(small, bad)


def assert_gaussian(sample: torch.Tensor, std: float) -> None:
    assert abs(float(sample.std()) / std - 1) < 0.01  # sample std of 200k draws: relative sd ≈ 0.16%
    assert abs(float(sample.mean())) < 5 * std / math.sqrt(sample.numel())


@pytest.mark.parametrize("z,c", [(1.0, 0.5), (0.3, 2.0)])
def test_central_noise_is_z_c_and_local_noise_z_times_twice_c(z, c):
    """Local DP protects any two inputs of a client: their clipped updates differ by up to 2C."""
    assert central_noise_std(c, z) == z * c and local_noise_std(c, z) == 2 * z * c
    noise = gaussian_noise(SHAPES, central_noise_std(c, z), secret_generator(1))
    assert {k: v.shape for k, v in noise.items()} == SHAPES and noise["a"].dtype == torch.float32
    assert_gaussian(flat(noise), z * c)
    assert_gaussian(flat(gaussian_noise(SHAPES, local_noise_std(c, z), secret_generator(2))), 2 * z * c)
    one, other = clip({"w": torch.full((10,), 5.0)}, c)[0], clip({"w": torch.full((10,), -5.0)}, c)[0]
    assert float((one["w"] - other["w"]).norm()) == pytest.approx(2 * c)  # the local sensitivity


@pytest.mark.parametrize("survivors", [6, 8, 10])
def test_distributed_noise_of_any_completed_sum_is_at_least_central(survivors):
    """Each of 10 clients adds z·C/√T, T = 6 the fewest SecAgg+ completes with (threshold 0.6):
    S survivors carry z·C·√(S/T), the multiplier the round is accounted at."""
    z, c = 0.8, 1.5
    fewest = min_survivors(10, 1.0, 0.6)
    assert fewest == 6
    std = distributed_noise_std(c, z, fewest)
    total = sum(flat(gaussian_noise(SHAPES, std, secret_generator(10, i))) for i in range(survivors))
    assert_gaussian(total, z * c * math.sqrt(survivors / fewest))
    assert distributed_multiplier(z, survivors, fewest) == pytest.approx(z * math.sqrt(survivors / fewest))
    assert distributed_multiplier(z, survivors, fewest) >= z


@pytest.mark.parametrize("sampled, shares, threshold, fewest", [
    (10, 1.0, 0.6, 6), (3, 1.0, 0.6, 2), (20, 0.5, 0.6, 7), (100, 0.1, 0.6, 7), (4, 1.0, 1.0, 4),
])
def test_fewest_survivors_follow_flower_s_secaggplus_threshold(sampled, shares, threshold, fewest):
    assert min_survivors(sampled, shares, threshold) == fewest


def test_noise_per_tensor_does_not_depend_on_the_order_the_tensors_are_listed_in():
    """A resumed server reads its state back from a checkpoint in another order than it built it."""
    ordered = gaussian_noise({"q": torch.Size([3]), "k": torch.Size([4])}, 1.0, secret_generator(5))
    reordered = gaussian_noise({"k": torch.Size([4]), "q": torch.Size([3])}, 1.0, secret_generator(5))
    assert all(torch.equal(ordered[name], reordered[name]) for name in ordered)


def test_secret_streams_are_reproducible_per_label_and_unpredictable_without_a_seed():
    def draw(seed: int | None, *labels) -> torch.Tensor:
        return gaussian_noise({"x": torch.Size([64])}, 1.0, secret_generator(seed, *labels))["x"]

    assert torch.equal(draw(7, "central-noise", 3), draw(7, "central-noise", 3))  # a resumed round 3
    assert not torch.equal(draw(7, "central-noise", 3), draw(7, "central-noise", 1))
    assert not torch.equal(draw(7, "central-noise", 3), draw(7, "count-noise", 3))
    assert not torch.equal(draw(None), draw(None))



def test_runs_sharing_a_secret_seed_draw_fresh_central_noise_per_public_seed():
    """A study's seeds share one `secret-seed`: its spread must include the DP noise's, so each run
    seed draws its own noise (reproducibly: the same run seed draws the same)."""
    def noise(seed: int) -> torch.Tensor:
        cfg = RunConfig.from_flower({"dp": "central", "dp-noise-multiplier": 1.0, "secret-seed": 3, "seed": seed})
        return ServerDp(cfg).central_mean([], {"x": torch.Size([64])}, server_round=1, population=4)["x"]

    assert torch.equal(noise(0), noise(0))
    assert not torch.equal(noise(0), noise(1))

def reference_epsilon(accountant, z: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (0.7, 20), (2.5, 300)])
def test_accountant_matches_dp_accounting(z, rounds):
    rdp = Accountant("rdp", 1e-5).epsilon([z] * rounds)
    pld = Accountant("pld", 1e-5).epsilon([z] * rounds)
    assert rdp == pytest.approx(reference_epsilon(rdp_privacy_accountant.RdpAccountant(), z, rounds, 1e-5), rel=1e-12)
    assert pld == pytest.approx(reference_epsilon(pld_privacy_accountant.PLDAccountant(), z, rounds, 1e-5), rel=1e-6)
    assert pld <= rdp * 1.01  # PLD is (nearly) tight; RDP's conversion to (ε, δ) is an upper bound


def test_accountant_monotone_and_known_value():
    acc = Accountant("rdp", 1e-5)
    assert 3.0 < acc.epsilon([1.0]) < 6.0  # Flower's docs: 4.73 for one release at z=1, δ=1e-5
    assert acc.epsilon([1.0] * 2) < acc.epsilon([1.0] * 5) < acc.epsilon([1.0] * 50)
    assert acc.epsilon([2.0] * 5) < acc.epsilon([1.0] * 5) < acc.epsilon([0.5] * 5)
    assert acc.epsilon([]) == 0.0 and acc.epsilon([1.0, 0.0]) == math.inf
    # Mixed multipliers compose; order does not matter.
    assert acc.epsilon([1.0, 2.0, 1.0]) == pytest.approx(acc.epsilon([2.0, 1.0, 1.0]))
    assert acc.epsilon([1.0] * 2) < acc.epsilon([1.0, 2.0, 1.0]) < acc.epsilon([1.0] * 3)
    with pytest.raises(ValueError):
        Accountant("moments", 1e-5)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_budget_stops_at_first_round_over_target(kind):
    acc, z = Accountant(kind, 1e-5), 1.2
    target = (acc.epsilon([z] * 5) + acc.epsilon([z] * 6)) / 2
    dp = ServerDp(RunConfig.from_flower({"dp": "central", "dp-noise-multiplier": z, "dp-target-epsilon": target,
                                         "dp-accountant": kind}))
    while dp.allows_another_round():
        dp.complete_round(survivors=4, min_survivors=None)
    assert len(dp.releases) == 5 and dp.epsilon() <= target


def test_adaptive_clip_norm_moves_towards_quantile():
    c, lr, gamma = 2.0, 0.2, 0.5
    assert clipped_fraction_bits([0.5, 2.0, 3.0], c) == [1, 1, 0]  # norm == C is not clipped
    below = noisy_fraction(clipped_fraction_bits([0.1, 0.5, 1.0], c), 0.0, secret_generator(0))
    above = noisy_fraction(clipped_fraction_bits([2.5, 4.0, 9.0], c), 0.0, secret_generator(0))
    assert (below, above) == (1.0, 0.0)
    assert next_clip_norm(c, below, gamma, lr) < c < next_clip_norm(c, above, gamma, lr)
    assert next_clip_norm(c, below, gamma, lr) == pytest.approx(2.0 * math.exp(-0.1), rel=1e-15)
    assert next_clip_norm(c, 0.25, gamma, lr) == pytest.approx(2.0 * math.exp(0.05), rel=1e-15)


def test_noisy_fraction_noise_scale():
    bits, count_std, g = [1, 0, 1, 1], 2.0, secret_generator(3)
    draws = torch.tensor([noisy_fraction(bits, count_std, g) for _ in range(20_000)], dtype=torch.float64)
    assert abs(float(draws.mean()) - 0.75) < 5 * (count_std / 4) / math.sqrt(20_000)
    assert abs(float(draws.std()) / (count_std / 4) - 1) < 0.03


def test_the_noised_count_moves_by_at_most_a_half_when_one_client_is_added_or_removed():
    """The sensitivity the budget split assumes (arXiv 1905.03871, Sec. 3.1): centred bits."""
    def noised_sum(bits: list[int]) -> float:  # Σ (b_k − ½), what the count noise is added to
        return (noisy_fraction(bits, 0.0, secret_generator(0)) - 0.5) * len(bits)

    for bits in ([1, 0, 1], [0, 0, 0, 0], [1] * 7):
        for added in (0, 1):
            assert abs(noised_sum([*bits, added]) - noised_sum(bits)) == pytest.approx(0.5)


def test_update_noise_multiplier_formula_and_budget_split():
    z, sigma_b = 1.0, 1.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx((1.0 - 0.25) ** -0.5, rel=1e-15)
    # The update release and the count release together are one Gaussian mechanism with multiplier z.
    acc = Accountant("rdp", 1e-5)
    assert acc.epsilon([z_update, 2 * sigma_b]) == pytest.approx(acc.epsilon([z]), rel=1e-9)
    for too_small in (0.5, 0.3):  # 2σ_b <= z: nothing left for the update
        with pytest.raises(ValueError, match="whole privacy budget"):
            update_noise_multiplier(z, too_small)


# --------------------------------------------------------------------------------------------
# ε of whole runs against independent computations
# --------------------------------------------------------------------------------------------


def direct_epsilon(events: list[dp_accounting.DpEvent]) -> float:
    """dp_accounting called directly on the events the mechanism is made of."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    return accountant.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(1e-5)


def opacus_epsilon(steps: list[tuple[float, float]]) -> float:
    """opacus' RDP accountant, one step (noise multiplier, sampling rate) per round."""
    accountant = RDPAccountant()
    logging.disable(logging.WARNING)  # it warns for every order whose series does not converge
    try:
        for z, q in steps:
            accountant.step(noise_multiplier=z, sample_rate=q)
        return accountant.get_epsilon(1e-5)
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("z, rounds, survivors", [
    (1.0, 30, [10] * 30),  # central (or distributed with no dropout at T = K)
    (1.0, 30, [6] * 30),  # distributed, 6 of 10 survive every round: T = 6, so still z
    (0.7, 20, [10, 6, 8, 7] * 5),  # distributed, varying survivors
    (2.0, 100, [7] * 100),
])
def test_distributed_dp_epsilon_from_actual_survivors_matches_independent_accountants(z, rounds, survivors):
    cfg = RunConfig.from_flower({"dp": "central", "secure-aggregation": True, "dp-noise-multiplier": z})
    dp, fewest = ServerDp(cfg), min_survivors(10, cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold)
    for count in survivors:
        dp.complete_round(count, fewest)
    # Each of the S survivors added N(0, (zC)²/T): the sum's noise has variance S·(zC)²/T, sensitivity C.
    multipliers = [math.sqrt(count * (z / math.sqrt(fewest)) ** 2) for count in survivors]
    assert dp.epsilon() == pytest.approx(direct_epsilon([dp_accounting.GaussianDpEvent(m) for m in multipliers]),
                                         rel=1e-9)
    assert dp.epsilon() == pytest.approx(opacus_epsilon([(m, 1.0) for m in multipliers]), rel=0.02)
    assert dp.epsilon() <= ServerDp(RunConfig.from_flower({"dp": "central", "dp-noise-multiplier": z})).accountant \
        .epsilon([z] * rounds) + 1e-9, "never worse than central DP at z"


@pytest.mark.parametrize("z, count, rounds", [(1.0, 10, 30), (2.0, 20, 30), (1.5, 40, 12)])
def test_adaptive_clipping_epsilon_matches_the_update_and_count_releases_composed(z, count, rounds):
    """The update at z_Δ·C (sensitivity C) and the count at σ_b (sensitivity ½) composed directly."""
    cfg = RunConfig.from_flower({"dp": "central", "dp-adaptive-clipping": True, "dp-noise-multiplier": z})
    dp = ServerDp(cfg)
    sigma_b = dp.count_noise(count)
    for _ in range(rounds):
        dp.complete_round(count, None)
    z_update = update_noise_multiplier(z, sigma_b)
    events = [dp_accounting.GaussianDpEvent(z_update), dp_accounting.GaussianDpEvent(sigma_b / 0.5)] * rounds
    assert dp.epsilon() == pytest.approx(direct_epsilon(events), rel=1e-6)
    assert dp.epsilon() == pytest.approx(opacus_epsilon([(z, 1.0)] * rounds), rel=0.02)


@pytest.mark.parametrize("z, q, rounds", [(1.0, 0.3, 30), (0.8, 0.1, 40), (1.5, 0.5, 20)])
def test_sampling_amplification_epsilon_matches_independent_accountants(z, q, rounds):
    cfg = RunConfig.from_flower({"dp": "central", "dp-noise-multiplier": z, "fraction-train": q,
                                 "dp-sampling-amplification": True})
    dp = ServerDp(cfg)
    for _ in range(rounds):
        dp.complete_round(3, None)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    assert dp.epsilon() == pytest.approx(direct_epsilon([dp_accounting.SelfComposedDpEvent(event, rounds)]), rel=1e-9)
    assert dp.epsilon() == pytest.approx(opacus_epsilon([(z, q)] * rounds), rel=0.02)
    assert dp.epsilon() < Accountant().epsilon([z] * rounds), "amplification lowers ε"


def test_a_resumed_dp_server_continues_the_same_accounting_and_clip_norm():
    cfg = RunConfig.from_flower({"dp": "central", "secure-aggregation": True, "dp-noise-multiplier": 1.1})
    straight = ServerDp(cfg)
    rows = [{"round": 0, "dp_clip_norm": 1.0}]
    for count in (10, 7, 9):
        rows.append({"round": len(rows), "dp_noise_multiplier": straight.complete_round(count, 6), "dp_clip_norm": 0.8})
    resumed = ServerDp(cfg)
    resumed.restore(rows)
    assert resumed.releases == straight.releases and resumed.clip_norm == 0.8
    assert resumed.epsilon() == straight.epsilon()
