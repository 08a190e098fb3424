"""fedllm.merge: hand-computed examples, slow reference implementations, invariances, peft
equalities, bad input and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedllm.merge as M
from fedllm.merge import _chunks, sparsify
from fedllm.merge._chunks import client_seed

ALL = sorted(M.OPERATORS)
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
DETERMINISTIC = sorted(set(ALL) - RANDOM)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def close(a, b, tol=1e-6):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def rand_updates(k, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *shape, generator=g), torch.rand(k, generator=g) + 0.1


# ============================================================================ slow references
# Float64 numpy, loops over clients and coordinates, straight from the definitions in the brief.


def ref_p(w):
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


def ref_keep_count(density, n):
    return min(n, max(1, math.floor(round(density * n, 9))))


def ref_trim(row, density):
    """Keep entries whose magnitude is >= the k-th largest magnitude (ties kept)."""
    k = ref_keep_count(density, row.size)
    kth = sorted(np.abs(row), reverse=True)[k - 1]
    return np.where(np.abs(row) >= kth, row, 0.0)


def ref_ties_merge(rows, p, election="mass"):
    """Elect gamma = sign(sum p_k v_k) (or of sum p_k sign(v_k) by count); mean of agreeing non-zero
    entries weighted by p; 0 if none."""
    rows = np.asarray(rows, dtype=np.float64)
    out = np.zeros(rows.shape[1])
    for j in range(rows.shape[1]):
        votes = rows[:, j] if election == "mass" else np.sign(rows[:, j])
        s = sum(p[k] * votes[k] for k in range(len(p)))
        gamma = np.sign(s)
        num = den = 0.0
        for k in range(len(p)):
            v = rows[k, j]
            if v != 0 and np.sign(v) == gamma:
                num += p[k] * v
                den += p[k]
        out[j] = num / den if den > 0 else 0.0
    return out


def ref_weighted(rows, p):
    rows = np.asarray(rows, dtype=np.float64)
    return sum(p[k] * rows[k] for k in range(len(p)))


def ref_breadcrumbs_row(row, density, gamma):
    """Drop the n_top largest magnitudes, keep the next n_keep; ties resolved towards keeping:
    keep |x| between the (n_top+n_keep)-th and the (n_top+1)-th largest magnitude, inclusive."""
    n = row.size
    n_keep = ref_keep_count(density, n)
    n_top = min(math.floor(round(gamma * n, 9)), n - n_keep)
    mags = sorted(np.abs(row), reverse=True)
    upper, lower = mags[n_top], mags[n_top + n_keep - 1]
    return np.array([x if lower <= abs(x) <= upper else 0.0 for x in row])


def ref_uniforms(seed, k, n):
    """The documented stream: client k draws torch.rand(n) from a generator seeded client_seed(seed, k)."""
    g = torch.Generator().manual_seed(client_seed(seed, k))
    return torch.rand(n, generator=g).numpy()


def ref_della_probs(row, density, epsilon):
    a = np.abs(row.astype(np.float32))
    n = a.size
    ranks = np.array([sum(1 for y in a if y < x) for x in a], dtype=np.float64)
    return (density - epsilon + 2 * epsilon * ranks / (n - 1)).astype(np.float32)


def ref_median(rows, w):
    rows = np.asarray(rows, dtype=np.float64)[np.asarray(w) > 0]
    return np.array([np.median(rows[:, j]) for j in range(rows.shape[1])])


def ref_trimmed_mean(rows, w, beta):
    rows = np.asarray(rows, dtype=np.float64)[np.asarray(w) > 0]
    m = rows.shape[0]
    cut = min(math.ceil(round(beta * m, 9)), (m - 1) // 2)
    out = []
    for j in range(rows.shape[1]):
        col = sorted(rows[:, j])
        out.append(np.mean(col[cut : m - cut]))
    return np.array(out)


def reference(name, x, w, **params):
    """Slow reference result of operator ``name`` on [K, n] input ``x``."""
    rows = x.reshape(x.shape[0], -1).double().numpy()
    p = ref_p(w)
    d = {**M.OPERATOR_PARAMS[name], **params}
    if name == "weighted_average":
        return ref_weighted(rows, p)
    if name == "task_arithmetic":
        return d["scale"] * ref_weighted(rows, p)
    if name == "magnitude_prune":
        return d["scale"] * ref_weighted([ref_trim(r, d["density"]) for r in rows], p)
    if name == "ties":
        return d["scale"] * ref_ties_merge([ref_trim(r, d["density"]) for r in rows], p, d["election"])
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        trimmed = [ref_breadcrumbs_row(r, d["density"], d["gamma"]) for r in rows]
        if name == "breadcrumbs_ties":
            return d["scale"] * ref_ties_merge(trimmed, p, d["election"])
        return d["scale"] * ref_weighted(trimmed, p)
    if name in ("dare_linear", "dare_ties"):
        dropped = [
            np.where(ref_uniforms(d["seed"], k, r.size) < d["density"], r / d["density"], 0.0)
            for k, r in enumerate(rows)
        ]
        if name == "dare_ties":
            return d["scale"] * ref_ties_merge(dropped, p, d["election"])
        return d["scale"] * ref_weighted(dropped, p)
    if name in ("della", "della_linear"):
        dropped = []
        for k, r in enumerate(rows):
            probs = ref_della_probs(r, d["density"], d["epsilon"])
            u = ref_uniforms(d["seed"], k, r.size)
            dropped.append(np.where(u < probs, r.astype(np.float32) / probs, 0.0).astype(np.float64))
        if name == "della_linear":
            return d["scale"] * ref_weighted(dropped, p)
        return d["scale"] * ref_ties_merge(dropped, p, d["election"])
    if name == "median":
        return ref_median(rows, w)
    if name == "trimmed_mean":
        return ref_trimmed_mean(rows, w, d["beta"])
    raise AssertionError(name)


# ============================================================================ hand-computed examples


def test_weighted_average_by_hand():
    # p = [1, 3] / 4 = [0.25, 0.75]; [0.25*1 + 0.75*3, 0.25*2 + 0.75*6] = [2.5, 5.0]
    out = M.weighted_average(t([[1, 2], [3, 6]]), t([1, 3]))
    close(out, [2.5, 5.0])
    assert out.dtype == torch.float32


def test_task_arithmetic_by_hand():
    # 2 * [2.5, 5.0] from the example above
    close(M.task_arithmetic(t([[1, 2], [3, 6]]), t([1, 3]), scale=2.0), [5.0, 10.0])


def test_magnitude_prune_by_hand():
    # n = 5, density 0.4 -> k = 2 kept per client.
    # c0 = [5, -1, 2, 0.5, -4] keeps 5, -4  -> [5, 0, 0, 0, -4]
    # c1 = [1, 1, -3, 2, 0.1]  keeps -3, 2  -> [0, 0, -3, 2, 0]
    # p = [0.5, 0.5] -> [2.5, 0, -1.5, 1, -2]
    x = t([[5, -1, 2, 0.5, -4], [1, 1, -3, 2, 0.1]])
    close(M.magnitude_prune(x, t([2, 2]), density=0.4), [2.5, 0, -1.5, 1, -2])


def test_ties_by_hand():
    # density 0.5 on n = 4 -> k = 2 per client:
    # c0 = [ 4, -1,  3, -2] -> [ 4,  0, 3, 0]
    # c1 = [-6,  2, -1,  5] -> [-6,  0, 0, 5]
    # c2 = [ 1, -3,  2,  1] -> [ 0, -3, 2, 0]
    # p = [.25, .25, .5]
    # col0: .25*4 - .25*6 = -0.5 -> gamma -1, only c1 agrees -> -6
    # col1: -1.5 -> gamma -1, c2 -> -3
    # col2: .75 + 1 = 1.75 -> gamma +1, c0 and c2 agree -> (.25*3 + .5*2) / (.25 + .5) = 7/3
    # col3: 1.25 -> c1 -> 5
    x = t([[4, -1, 3, -2], [-6, 2, -1, 5], [1, -3, 2, 1]])
    close(M.ties(x, t([1, 1, 2]), density=0.5), [-6, -3, 7 / 3, 5])
    close(M.ties(x, t([1, 1, 2]), density=0.5, scale=0.5), [-3, -1.5, 7 / 6, 2.5])


def test_ties_zero_sum_gives_zero():
    # Weighted trimmed sum exactly 0 (gamma = 0): no client agrees -> 0 (peft would pick +1 -> 2).
    # A zero entry never agrees: col1 has c0 = 0 and c1 = 3 -> only c1 counts -> 3, not 1.5.
    x = t([[2, 0], [-2, 3]])
    close(M.ties(x, t([1, 1]), density=1.0), [0, 3])


def test_dare_linear_by_hand():
    # density 1 keeps everything: 3 * (0.25*[1, 2] + 0.75*[3, 6]) = [7.5, 15]
    close(M.dare_linear(t([[1, 2], [3, 6]]), t([1, 3]), density=1.0, scale=3.0), [7.5, 15.0])


def test_dare_ties_by_hand():
    # density 1, p uniform; col0: 1 + 3 - 1 = 3 > 0 -> mean(1, 3) = 2;
    # col1: -2 + 1 - 1 = -2 < 0 -> mean(-2, -1) = -1.5
    x = t([[1, -2], [3, 1], [-1, -1]])
    close(M.dare_ties(x, t([1, 1, 1]), density=1.0), [2, -1.5])


def test_breadcrumbs_by_hand():
    # n = 10, gamma 0.1 -> drop the 1 largest; density 0.3 -> keep the next 3.
    # c0 = [10..1]   -> [0, 9, 8, 7, 0, 0, 0, 0, 0, 0]
    # c1 = [-1..-10] -> [0, 0, 0, 0, 0, 0, -7, -8, -9, 0]
    # p = [.75, .25]
    x = t([[10, 9, 8, 7, 6, 5, 4, 3, 2, 1], [-1, -2, -3, -4, -5, -6, -7, -8, -9, -10]])
    out = M.breadcrumbs(x, t([3, 1]), density=0.3, gamma=0.1)
    close(out, [0, 6.75, 6, 5.25, 0, 0, -1.75, -2, -2.25, 0])


def test_della_keep_probabilities_by_hand():
    # magnitudes 0.1, 3, 2, 2 -> strictly-smaller counts 0, 3, 1, 1; n - 1 = 3
    # p = (0.5 - 0.3) + 0.6 * r / 3 = 0.2 + 0.2 r -> [0.2, 0.8, 0.4, 0.4]
    close(sparsify.della_keep_probabilities(t([0.1, -3, 2, 2]), 0.5, 0.3), [0.2, 0.8, 0.4, 0.4])


def test_della_by_hand_without_spread():
    # epsilon 0, density 1: nothing dropped, plain TIES with density 1 (see test_dare_ties_by_hand)
    x = t([[1, -2], [3, 1], [-1, -1]])
    close(M.della(x, t([1, 1, 1]), density=1.0, epsilon=0.0), [2, -1.5])


def test_median_by_hand():
    x = t([[1, 5], [3, -2], [2, 10], [100, 0]])
    # all four: col0 sorted 1, 2, 3, 100 -> (2 + 3)/2; col1 -2, 0, 5, 10 -> (0 + 5)/2
    close(M.median(x, t([1, 1, 1, 1])), [2.5, 2.5])
    # weights only select participants: client 3 (weight 0) left out, others equal despite weights
    close(M.median(x, t([1, 5, 1, 0])), [2, 5])


def test_trimmed_mean_by_hand():
    # K = 5, beta 0.2 -> drop 1 at each end: [1,2,3,4,100] -> mean(2,3,4) = 3;
    # [-50, 0, 1, 2, 3] -> mean(0, 1, 2) = 1
    x = t([[1, -50], [2, 0], [3, 1], [4, 2], [100, 3]])
    close(M.trimmed_mean(x, t([1, 1, 1, 1, 1]), beta=0.2), [3, 1])
    # beta 0.1 -> ceil(0.5) = 1 dropped at each end as well
    close(M.trimmed_mean(x, t([1, 1, 1, 1, 1]), beta=0.1), [3, 1])
    # beta 0 -> nothing dropped: plain mean
    close(M.trimmed_mean(x, t([1, 1, 1, 1, 1]), beta=0.0), [22, -8.8])


def test_trimmed_mean_at_default_beta_ignores_one_huge_client_among_three():
    x = t([[1.0, -2.0], [2.0, -1.0], [3.0, 0.0]])
    x[1] *= 1e6  # one client's update blown up a million times: [2e6, -1e6]
    merged = M.trimmed_mean(x, t([1, 1, 1]))
    # per coordinate the outlier and the opposite extreme are cut: an honest client's value is kept
    close(merged, [3.0, -2.0])
    assert M.OPERATORS["weighted_average"](x, t([1, 1, 1])).abs().max() > 1e5  # what the mean would give


def test_trimmed_mean_of_two_clients_trims_nothing():
    x = t([[1.0, 10.0], [5.0, -4.0]])
    close(M.trimmed_mean(x, t([1, 1])), [3.0, 3.0])


@pytest.mark.parametrize(
    ("k", "beta", "cut"),
    [(1, 0.1, 0), (2, 0.1, 0), (3, 0.1, 1), (10, 0.1, 1), (11, 0.1, 2), (20, 0.1, 2), (21, 0.1, 3),
     (3, 0.45, 1), (4, 0.45, 1), (7, 0.0, 0), (100, 0.07, 7)],
)
def test_trimmed_mean_cuts_ceil_beta_k_at_each_end_keeping_at_least_one(k, beta, cut):
    # clients hold the squares 0, 1, 4, ... in shuffled order: each cut gives a different mean
    squares = torch.arange(k, dtype=torch.float64) ** 2
    x = squares[torch.randperm(k, generator=torch.Generator().manual_seed(k))][:, None].repeat(1, 3).float()
    expected = squares[cut : k - cut].mean().item()
    close(M.trimmed_mean(x, torch.ones(k), beta=beta), [expected] * 3)


# ============================================================================ against references

PARAMS = {
    "weighted_average": {},
    "task_arithmetic": {"scale": 0.7},
    "magnitude_prune": {"density": 0.3, "scale": 1.3},
    "ties": {"density": 0.3, "scale": 1.1},
    "dare_linear": {"density": 0.4, "seed": 7},
    "dare_ties": {"density": 0.6, "seed": 3, "scale": 0.9, "election": "count"},
    "breadcrumbs": {"density": 0.25, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.25, "gamma": 0.05, "election": "count"},
    "della": {"density": 0.4, "epsilon": 0.2, "seed": 5},
    "della_linear": {"density": 0.4, "epsilon": 0.2, "seed": 5, "scale": 1.2},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k,shape", [(1, (13,)), (4, (6, 7)), (7, (3, 5, 4))])
def test_matches_reference(name, k, shape):
    x, w = rand_updates(k, *shape, seed=k)
    out = M.OPERATORS[name](x, w, **PARAMS[name])
    assert out.shape == shape and out.dtype == torch.float32
    close(out.reshape(-1), reference(name, x, w, **PARAMS[name]))


@pytest.mark.parametrize("name", ALL)
def test_matches_reference_with_ties_and_zeros(name):
    # Integer-valued updates: many equal magnitudes and exact zeros exercise tie handling.
    # Weights summing to 8 make every weighted sum exact, so coordinates whose weighted sum is
    # exactly 0 (gamma = 0) are decided exactly, not by rounding.
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 4, (5, 40), generator=g).float()
    w = t([1, 2, 0, 4, 1])
    out = M.OPERATORS[name](x, w, **PARAMS[name])
    close(out, reference(name, x, w, **PARAMS[name]))


@pytest.mark.parametrize("name", ALL)
def test_multi_chunk_and_radix_paths_match_reference(name, monkeypatch):
    # Force tiny column chunks, tiny radix pieces and the radix select on a small tensor so every
    # chunked code path runs several times; the result must not depend on the chunking.
    x, w = rand_updates(3, 300, seed=4)
    whole = M.OPERATORS[name](x, w, **PARAMS[name])
    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 16)
    monkeypatch.setattr(_chunks, "_MIN_WIDTH", 7)
    monkeypatch.setattr(sparsify, "_SMALL", 0)
    monkeypatch.setattr(sparsify, "_PIECE", 64)
    import fedllm.merge.operators as ops

    monkeypatch.setattr(ops, "_DELLA_PIECE", 50)
    chunked = M.OPERATORS[name](x, w, **PARAMS[name])
    close(chunked, whole)
    close(chunked, reference(name, x, w, **PARAMS[name]))


@pytest.mark.parametrize("n", [70_001, 150_000])
def test_radix_select_is_exact(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g)
    x[1, : n // 2] = 0.0  # more zeros than the rank asked for
    x[2] = torch.round(x[2] * 4) / 4  # heavy ties
    x[0, :10] = -0.0
    for k in (1, n // 5, n // 2 + 3, n - 1, n):
        got = sparsify.kth_largest_magnitude(x, k)
        want = torch.kthvalue(x.abs(), n - k + 1, dim=1).values
        assert torch.equal(got, want), (k, got, want)


def test_ties_large_tensor_matches_vectorised_reference():
    # Radix path on a realistic size, against a sort-based float64 reference.
    x, w = rand_updates(4, 70_000, seed=2)
    out = M.ties(x, w, density=0.2)
    xs = x.double()
    k = ref_keep_count(0.2, 70_000)
    kth = xs.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
    tr = torch.where(xs.abs() >= kth, xs, 0.0)
    p = torch.as_tensor(ref_p(w)).view(-1, 1)
    gamma = torch.sign((p * tr).sum(0))
    agree = (torch.sign(tr) == gamma) & (tr != 0)
    den = (p * agree).sum(0)
    want = torch.where(den > 0, (p * tr * agree).sum(0) / den.clamp(min=1e-300), 0.0)
    close(out, want)


def test_client_sorting_network_sorts_everything():
    # 0-1 principle: a compare-exchange network sorts all inputs iff it sorts all 0/1 inputs.
    import itertools

    from fedllm.merge._sorting import sorted_rows

    for k in range(1, 13):
        x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k))).t().contiguous()
        assert torch.equal(torch.stack(sorted_rows(x)), torch.sort(x, dim=0).values), k
    for k in (20, 32, 33):  # 33 uses the torch.sort fallback
        x = torch.randn(k, 300)
        assert torch.equal(torch.stack(sorted_rows(x)), torch.sort(x, dim=0).values), k


# ============================================================================ randomized operators


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_same_seed_same_output_and_global_rng_untouched(name):
    x, w = rand_updates(3, 500)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = M.OPERATORS[name](x, w, seed=9)
    assert torch.equal(torch.get_rng_state(), before)
    b = M.OPERATORS[name](x, w, seed=9)
    c = M.OPERATORS[name](x, w, seed=10)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_kept_fraction_is_density():
    x = torch.ones(1, 200_000)
    out = M.dare_linear(x, t([1.0]), density=0.3, seed=1)
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005  # sd = sqrt(.3*.7/2e5) ~ 0.001
    close(out[out != 0].unique(), [1 / 0.3])  # survivors rescaled by 1/density


@pytest.mark.parametrize("name", ["dare_linear", "della"])
def test_unbiased_over_seeds(name):
    # dare_linear: E[out] = sum p_k tau_k. della on one client: E[out] = tau (1/keep_prob rescale).
    k = 3 if name == "dare_linear" else 1
    x, w = rand_updates(k, 64, seed=5)
    params = {"density": 0.5} if name == "dare_linear" else {"density": 0.5, "epsilon": 0.3}
    runs = torch.stack([M.OPERATORS[name](x, w, seed=s, **params) for s in range(2000)])
    target = torch.as_tensor(ref_weighted(x.double().numpy(), ref_p(w)), dtype=torch.float32)
    sem = runs.std(0) / math.sqrt(runs.shape[0])
    assert ((runs.mean(0) - target).abs() < 5 * sem + 1e-6).all()


def test_della_keep_frequency_follows_rank():
    # One client, magnitudes 1..n: entry i is kept with probability 0.2 + 0.6 * i/(n-1).
    n = 11
    x = torch.arange(1, n + 1, dtype=torch.float32).view(1, n)
    kept = torch.stack([M.della(x, t([1.0]), density=0.5, epsilon=0.3, seed=s) != 0 for s in range(3000)])
    freq = kept.double().mean(0)
    want = 0.2 + 0.6 * torch.arange(n, dtype=torch.float64) / (n - 1)
    assert ((freq - want).abs() < 0.04).all(), freq


def test_della_linear_without_spread_equals_dare_linear():
    x, w = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)), t([1.0, 2.0, 3.0])
    close(M.della_linear(x, w, density=0.6, epsilon=0.0, seed=4), M.dare_linear(x, w, density=0.6, seed=4))


def test_a_large_client_decides_the_sign_by_mass_but_not_by_count():
    # one client's +10 against two clients' -1: the weighted sum is +, the count of signs is -
    x, w = t([[10.0], [-1.0], [-1.0]]), t([1.0, 1.0, 1.0])
    close(M.ties(x, w, density=1.0), [10.0])
    close(M.ties(x, w, density=1.0, election="count"), [-1.0])


def test_della_without_spread_equals_dare_ties():
    x, w = rand_updates(4, 200, seed=8)
    close(M.della(x, w, density=0.6, epsilon=0.0, seed=4), M.dare_ties(x, w, density=0.6, seed=4))


def test_random_stream_is_per_client_and_independent_of_k():
    # Client k's mask depends on (seed, k) only: adding a client later leaves the others' masks.
    x, w = rand_updates(3, 100, seed=6)
    a = M.dare_linear(x[:2], t([1.0, 0.0]), seed=2)
    b = M.dare_linear(x, t([1.0, 0.0, 0.0]), seed=2)
    assert torch.equal(a, b)


# ============================================================================ invariances


def _permuted_streams(monkeypatch, perm):
    """Make client k draw the stream that client perm[k] would have drawn (masks follow clients)."""
    original = _chunks.client_seed
    monkeypatch.setattr(_chunks, "client_seed", lambda seed, k: original(seed, int(perm[k])))


@pytest.mark.parametrize("name", ALL)
def test_client_permutation_changes_nothing(name, monkeypatch):
    x, w = rand_updates(5, 6, 9, seed=3)
    base = M.OPERATORS[name](x, w, **PARAMS[name])
    perm = torch.tensor([3, 0, 4, 1, 2])
    if name in RANDOM:
        # For a fixed seed, client k's mask comes from stream k, so a bare permutation changes
        # the draws (invariance holds only in distribution). With the streams permuted along
        # with the clients, the result must be identical.
        _permuted_streams(monkeypatch, perm)
    close(M.OPERATORS[name](x[perm], w[perm], **PARAMS[name]), base)


@pytest.mark.parametrize("name", ALL)
def test_scaling_weights_changes_nothing(name):
    x, w = rand_updates(4, 50, seed=1)
    close(M.OPERATORS[name](x, w * 37.5, **PARAMS[name]), M.OPERATORS[name](x, w, **PARAMS[name]))


@pytest.mark.parametrize(
    "name,params",
    [
        ("weighted_average", {}),
        ("task_arithmetic", {"scale": 1.0}),
        ("median", {}),
        ("trimmed_mean", {}),
        ("ties", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
        ("della", {"density": 1.0, "epsilon": 0.0}),
    ],
)
def test_single_client_returns_its_update(name, params):
    x, _ = rand_updates(1, 4, 5, seed=9)
    x[0, 0, 0] = 0.0
    close(M.OPERATORS[name](x, t([2.5]), **params), x[0])


def test_zero_weight_client_is_ignored():
    x, w = rand_updates(3, 40, seed=12)
    w0 = w.clone()
    w0[1] = 0.0
    x2 = x.clone()
    x2[1] = 1e6
    for name in DETERMINISTIC:
        close(M.OPERATORS[name](x2, w0, **PARAMS[name]), M.OPERATORS[name](x[[0, 2]], w[[0, 2]], **PARAMS[name]))


def test_other_dtypes_give_float32():
    x, w = rand_updates(3, 30, seed=1)
    for name in ALL:
        got = M.OPERATORS[name](x.double(), w.double(), **PARAMS[name])
        assert got.dtype == torch.float32
        close(got, M.OPERATORS[name](x, w, **PARAMS[name]))
        half = M.OPERATORS[name](x.bfloat16(), w, **PARAMS[name])
        close(half, M.OPERATORS[name](x.bfloat16().float(), w, **PARAMS[name]))


def test_inputs_requiring_grad_are_accepted():
    x, w = rand_updates(3, 20, seed=2)
    for name in ALL:
        out = M.OPERATORS[name](x.clone().requires_grad_(), w, **PARAMS[name])
        assert not out.requires_grad
        close(out, M.OPERATORS[name](x, w, **PARAMS[name]))


def test_thread_setting_is_restored_and_result_unchanged():
    x, w = rand_updates(3, 70_001, seed=2)
    before = torch.get_num_threads()
    one = M.ties(x, w)
    assert torch.get_num_threads() == before
    try:
        M.set_threads(None)
        close(M.ties(x, w), one)
    finally:
        M.set_threads(1)
    with pytest.raises(ValueError, match="threads"):
        M.set_threads(0)


def test_inputs_are_not_modified():
    x, w = rand_updates(4, 70_001, seed=13)
    x_copy, w_copy = x.clone(), w.clone()
    for name in ALL:
        M.OPERATORS[name](x, w, **PARAMS[name])
        assert torch.equal(x, x_copy) and torch.equal(w, w_copy), name


def test_non_contiguous_input():
    x, w = rand_updates(3, 6, 8, seed=14)
    xt = x.transpose(1, 2)  # per-client shape (8, 6), not contiguous
    for name in ALL:
        close(M.OPERATORS[name](xt, w, **PARAMS[name]), M.OPERATORS[name](xt.contiguous(), w, **PARAMS[name]))


def test_weights_may_be_a_list():
    x, w = rand_updates(3, 10)
    close(M.ties(x, w.tolist()), M.ties(x, w))


def test_one_dimensional_updates():
    # K scalar updates -> a scalar result
    out = M.weighted_average(t([1.0, 3.0]), t([1.0, 1.0]))
    assert out.shape == () and out.item() == 2.0


# ============================================================================ peft


def _peft():
    return pytest.importorskip("peft.utils.merge_utils")


def test_peft_task_arithmetic_equal():
    mu = _peft()
    x, w = rand_updates(5, 33, 17, seed=21)
    p = w / w.sum()
    close(M.task_arithmetic(x, w), mu.task_arithmetic(list(x.unbind(0)), p))


def test_peft_magnitude_prune_equal():
    # Same per-tensor top-k (k = int(density*n); equal here as 0.3*561 is not near an integer)
    # and same sum with normalised weights. Differs from peft only on exact magnitude ties at the
    # threshold (we keep all tied entries, torch.topk picks some) and when int(density*n)
    # rounds down wrongly (0.57*100 -> 56 in peft, 57 here) or is 0 (we keep at least 1).
    mu = _peft()
    x, w = rand_updates(4, 33, 17, seed=22)
    p = w / w.sum()
    close(M.magnitude_prune(x, w, density=0.3), mu.magnitude_prune(list(x.unbind(0)), p, 0.3))


def test_peft_ties_equal_for_uniform_weights_only():
    # peft elects the sign on the *unweighted* trimmed sum and divides by the *count* of agreeing
    # clients; ours elects on the p-weighted sum and divides by the agreeing weight. With equal
    # weights both give sum(agreeing)/count, so ours(any uniform w) == peft(weights=1).
    # (peft also picks +1 where the sum is exactly 0, which random inputs never hit.)
    mu = _peft()
    x, w = rand_updates(5, 40, 11, seed=23)
    tasks = list(x.unbind(0))
    close(M.ties(x, torch.full((5,), 0.2), density=0.3), mu.ties(tasks, torch.ones(5), 0.3))
    # With unequal weights the definitions differ (shown, not asserted equal).
    p = w / w.sum()
    assert not torch.allclose(M.ties(x, w, density=0.3), mu.ties(tasks, p, 0.3), atol=1e-4)


# ============================================================================ bad input


@pytest.mark.parametrize(
    "updates,weights,match",
    [
        (torch.tensor(1.0), t([1.0]), "at least 1-D"),
        (torch.zeros(0, 3), torch.zeros(0), "at least 1-D"),
        ([[1.0, 2.0]], t([1.0]), "torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.int64), t([1, 1]), "floating-point"),
        (torch.ones(2, 3), t([1.0, 1.0, 1.0]), r"shape \(2,\)"),
        (torch.ones(2, 3), t([[1.0, 1.0]]), r"shape \(2,\)"),
        (torch.ones(2, 3), t([1.0, -1.0]), "non-negative.*\\[1\\]"),
        (torch.ones(2, 3), t([0.0, 0.0]), "all zero"),
        (torch.ones(2, 3), t([1.0, float("nan")]), "NaN or Inf"),
        (torch.ones(2, 3), t([1.0, float("inf")]), "NaN or Inf"),
        (torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]), t([1.0, 1.0]), r"NaN or Inf for client index\(es\) \[1\]"),
        (torch.tensor([[float("inf"), 2.0], [1.0, 1.0]]), t([1.0, 1.0]), r"NaN or Inf .*\[0\]"),
    ],
)
@pytest.mark.parametrize("name", ALL)
def test_bad_inputs(name, updates, weights, match):
    with pytest.raises(ValueError, match=match):
        M.OPERATORS[name](updates, weights)


def test_nan_in_zero_weight_client_is_still_rejected():
    x = torch.ones(2, 4)
    x[1, 2] = float("nan")
    for name in ALL:
        with pytest.raises(ValueError, match="NaN or Inf"):
            M.OPERATORS[name](x, t([1.0, 0.0]))


def test_huge_finite_values_are_not_mistaken_for_inf():
    x = torch.full((3, 4), 3e38)  # the sum overflows; the entries are finite
    assert torch.isfinite(M.median(x, t([1, 1, 1]))).all()


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("ties", {"density": 1.5}, r"density must be in \(0, 1\]"),
        ("magnitude_prune", {"density": -0.1}, "density"),
        ("dare_linear", {"density": 0.0}, "density"),
        ("dare_ties", {"density": float("nan")}, "density must be finite"),
        ("ties", {"density": "0.2"}, "density must be a real number"),
        ("ties", {"scale": float("inf")}, "scale must be finite"),
        ("breadcrumbs", {"gamma": 1.0}, r"gamma must be in \[0, 1\)"),
        ("breadcrumbs", {"gamma": -0.1}, "gamma"),
        ("breadcrumbs", {"density": 0.995, "gamma": 0.01}, "density \\+ gamma must be <= 1"),
        ("della", {"epsilon": 0.5}, r"density \+/- epsilon"),
        ("della", {"density": 0.9, "epsilon": 0.2}, r"density \+/- epsilon"),
        ("della", {"epsilon": -0.1}, "epsilon must be >= 0"),
        ("trimmed_mean", {"beta": 0.5}, r"beta must be in \[0, 0.5\)"),
        ("trimmed_mean", {"beta": -0.01}, "beta"),
        ("dare_linear", {"seed": 1.5}, "seed must be an integer"),
        ("dare_ties", {"seed": True}, "seed must be an integer"),
    ],
)
def test_bad_parameters(name, params, match):
    x, w = rand_updates(3, 10)
    with pytest.raises(ValueError, match=match):
        M.OPERATORS[name](x, w, **params)


@pytest.mark.parametrize("name", ALL)
def test_unknown_parameter_lists_accepted(name):
    x, w = rand_updates(2, 5)
    with pytest.raises(TypeError, match="unknown parameter") as info:
        M.OPERATORS[name](x, w, densty=0.3)
    assert isinstance(info.value, ValueError)  # catchable either way
    for param in M.OPERATOR_PARAMS[name]:
        assert param in str(info.value)
    with pytest.raises(TypeError):
        M.OPERATORS[name](x, w, 0.3)  # parameters are keyword-only


def test_empty_tensor_per_client():
    for name in ALL:
        out = M.OPERATORS[name](torch.zeros(3, 0, 4), t([1, 1, 1]))
        assert out.shape == (0, 4)


# ============================================================================ registry


def test_registry_has_all_twelve():
    assert set(M.OPERATORS) == {
        "weighted_average",
        "task_arithmetic",
        "magnitude_prune",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "median",
        "trimmed_mean",
    }
    assert set(M.OPERATOR_PARAMS) == set(M.OPERATORS)
    for name in M.OPERATORS:
        assert M.get_operator(name) is M.OPERATORS[name]


def test_operator_params_and_defaults():
    assert M.OPERATOR_PARAMS == {
        "weighted_average": {},
        "task_arithmetic": {"scale": 1.0},
        "magnitude_prune": {"density": 0.2, "scale": 1.0},
        "ties": {"density": 0.2, "scale": 1.0, "election": "mass"},
        "dare_linear": {"density": 0.5, "scale": 1.0, "seed": 0},
        "dare_ties": {"density": 0.5, "scale": 1.0, "seed": 0, "election": "mass"},
        "breadcrumbs": {"density": 0.2, "gamma": 0.01, "scale": 1.0},
        "breadcrumbs_ties": {"density": 0.2, "gamma": 0.01, "scale": 1.0, "election": "mass"},
        "della": {"density": 0.5, "epsilon": 0.15, "scale": 1.0, "seed": 0, "election": "mass"},
        "della_linear": {"density": 0.5, "epsilon": 0.15, "scale": 1.0, "seed": 0},
        "median": {},
        "trimmed_mean": {"beta": 0.1},
    }
    assert M.RANDOMIZED == RANDOM


def test_get_operator_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="unknown merge operator 'tie'") as info:
        M.get_operator("tie")
    for name in M.OPERATORS:
        assert name in str(info.value)
