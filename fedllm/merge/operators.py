"""The merge operators: one function per operator, all with the same shape

    op(updates: Tensor[K, ...], weights: Tensor[K], **params) -> Tensor[...]

``updates`` stacks K clients' model-space updates of one tensor; ``weights`` are non-negative
(not necessarily normalised) and ``p = weights / weights.sum()``. The result is float32 with the
per-client shape. Inputs are checked (shape, NaN/Inf, weights, parameter ranges) before any work.

Trimming and dropping are per tensor: each client's tensor is ranked on its own. Shared pieces
live in :mod:`.sparsify` (thresholds and masks) and :mod:`.consensus` (TIES sign election and
disjoint mean); see there for tie handling and the sign-zero convention.

Threads: an operator runs thousands of short vector passes (one chunk at a time, to bound
memory) and its heaviest kernels (bincount, rand, integer sort) are single-threaded anyway. With
several intra-op threads on a CPU shared with other work, each short pass waits for a descheduled
worker thread: measured 10-50x slower on a busy 2-core machine. Operators therefore run with
``THREADS`` intra-op threads (default 1, set through :func:`fedllm.merge.set_threads`; ``None``
keeps torch's setting), restoring the caller's setting afterwards (OpenMP keeps the setting per
calling thread).

Randomized operators (``dare_linear``, ``dare_ties``, ``della``) draw client k's uniforms from its
own ``torch.Generator`` seeded from ``(seed, k)`` (see :func:`._chunks.client_generators`): the
global RNG is untouched and the same inputs and seed give the same output.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from types import MappingProxyType
from typing import Callable

import torch

from . import _checks, consensus, sparsify
from ._chunks import chunk_width, client_generators, column_ranges, draw_uniforms, float32_columns
from ._sorting import sorted_rows

# A keep-mask function fills ``out`` ([K, c], float 0/1) for the next column chunk ``chunk``.
# Chunks arrive in column order, which the random masks rely on.
KeepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_DELLA_PIECE = 1 << 20

#: Intra-op threads while an operator runs; None keeps torch's setting (see the module doc).
THREADS: int | None = 1


@contextlib.contextmanager
def _intra_op_threads():
    wanted, current = THREADS, torch.get_num_threads()
    if wanted is None or wanted == current:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(current)


# What kind of merge an operator is: privacy and secure aggregation read this, not name lists.
MEAN = "mean"  # `scale` × the weighted mean and nothing else (DP and secure sums compute it that way)
CLIENT_STEP = "client-step"  # a weighted mean after a step each client takes on its own update (trim, drop)
SIGN_CONSENSUS = "sign-consensus"  # a mean over the clients agreeing with a sign elected across clients
ORDER_STATISTIC = "order-statistic"  # an order statistic across clients, entry by entry


def _operator(kind: str):
    """Register an operator of `kind`: its keyword-only parameters (any others are rejected with a
    clear error) and its kind."""

    def register(func):
        accepted = {
            name: prm.default
            for name, prm in inspect.signature(func).parameters.items()
            if prm.kind is inspect.Parameter.KEYWORD_ONLY
        }

        @functools.wraps(func)
        def wrapper(updates, weights, **params):
            _checks.reject_unknown(func.__name__, params, accepted)
            # Merging is not differentiated (and out= buffers refuse autograd inputs).
            with torch.no_grad(), _intra_op_threads():
                return func(updates, weights, **params)

        wrapper.params = MappingProxyType(accepted)
        wrapper.kind = kind
        return wrapper

    return register


def _prepare(updates, weights) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Validate inputs; return ``flat`` ([K, n]), ``p`` as a ``[1, K]`` row, and the output shape."""
    flat = _checks.updates_matrix(updates)
    p = _checks.normalized_weights(weights, flat.shape[0]).to(flat.device)
    _checks.check_finite(flat)
    return flat, p.view(1, -1), updates.shape[1:]


# --------------------------------------------------------------------------- chunked drivers


def _weighted_sum(flat: torch.Tensor, p: torch.Tensor, scale: float, keep: KeepFn | None = None) -> torch.Tensor:
    """``scale * sum_k p_k (keep_k * x_k)`` over column chunks (no mask when ``keep`` is None)."""
    rows, n = flat.shape
    out = torch.empty(1, n, dtype=torch.float32, device=flat.device)
    p = p * scale  # folded into the weights: no extra pass over the output
    if keep is None and flat.dtype == torch.float32:
        torch.mm(p, flat, out=out)
    else:
        width = chunk_width(rows, n)
        mask = torch.empty(rows, width, device=flat.device)
        vals = torch.empty(rows, width, device=flat.device)
        for start, stop in column_ranges(n, width):
            chunk = float32_columns(flat, start, stop)
            c = stop - start
            if keep is not None:
                chunk = torch.mul(chunk, keep(chunk, mask[:, :c]), out=vals[:, :c])
            torch.mm(p, chunk, out=out[:, start:stop])
    return out.view(-1)


def _sign_consensus(flat: torch.Tensor, p: torch.Tensor, scale: float, keep: KeepFn, election: str) -> torch.Tensor:
    """TIES election (by ``election``) and disjoint mean of ``keep_k * x_k`` over column chunks, times ``scale``."""
    rows, n = flat.shape
    out = torch.empty(n, dtype=torch.float32, device=flat.device)
    width = chunk_width(rows, n)
    mask = torch.empty(rows, width, device=flat.device)
    vals = torch.empty(rows, width, device=flat.device)
    sums = consensus.new_sums(width, flat.device)
    for start, stop in column_ranges(n, width):
        chunk = float32_columns(flat, start, stop)
        c = stop - start
        torch.mul(chunk, keep(chunk, mask[:, :c]), out=vals[:, :c])
        s = sums[:, :c].zero_()
        consensus.add_sums(s, vals[:, :c], p, scratch=mask[:, :c])
        consensus.disjoint_mean(s, out[start:stop], scale, election)
    return out


def _magnitude_mask(threshold: torch.Tensor) -> KeepFn:
    return lambda chunk, out: sparsify.magnitude_keep(chunk, threshold, out)


def _dare_mask(gens: list[torch.Generator], density: float) -> KeepFn:
    # Each client's generator yields its stream in column order, one chunk after the other.
    return lambda chunk, out: sparsify.dare_keep(draw_uniforms(gens, out), density, out)


def _band_mask(flat: torch.Tensor, density: float, gamma: float) -> KeepFn:
    """Breadcrumbs' mask: per client, drop the ``gamma`` largest magnitudes, keep the next ``density``."""
    lower, upper = sparsify.band_thresholds(flat, density, gamma)
    scratch = torch.empty(flat.shape[0], chunk_width(*flat.shape), device=flat.device)
    return lambda chunk, out: sparsify.band_keep(chunk, lower, upper, out, scratch[:, : chunk.shape[1]])


def _della_values(flat: torch.Tensor, p: torch.Tensor, density: float, epsilon: float, seed: int):
    """DELLA's MagPrune, one client and column piece at a time (memory O(n), not O(K n)): yields
    ``(k, start, stop, values, scratch)`` with ``values`` ([1, c]) the kept entries over their keep
    probability, for every client with weight > 0; ``scratch`` is a [1, c] buffer free to overwrite."""
    rows, n = flat.shape
    gens = client_generators(seed, rows, flat.device)
    piece = max(1, min(n, _DELLA_PIECE))
    keep = torch.empty(1, piece, device=flat.device)
    vals = torch.empty(1, piece, device=flat.device)
    for k in range(rows):
        if p[0, k] == 0:
            continue
        probs = sparsify.della_keep_probabilities(flat[k], density, epsilon)
        for start, stop in column_ranges(n, piece):
            c = stop - start
            x = float32_columns(flat[k : k + 1], start, stop)
            u = keep[:, :c]
            torch.rand(c, generator=gens[k], out=u[0])
            torch.lt(u, probs[start:stop], out=u)
            torch.div(x, probs[start:stop], out=vals[:, :c]).mul_(u)
            yield k, start, stop, vals[:, :c], u


def _positive_rows(flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    rows = (p.view(-1) > 0).nonzero().view(-1)
    return None if rows.numel() == flat.shape[0] else rows


def _sorted_columns(
    flat: torch.Tensor, p: torch.Tensor, reduce: Callable[[list[torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """Apply ``reduce`` to each chunk's rows sorted along the client axis, smallest first
    (clients with weight 0 left out)."""
    rows_kept = _positive_rows(flat, p)
    rows = flat.shape[0] if rows_kept is None else rows_kept.numel()
    n = flat.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=flat.device)
    for start, stop in column_ranges(n, chunk_width(rows, n)):
        chunk = float32_columns(flat, start, stop)
        if rows_kept is not None:
            chunk = chunk.index_select(0, rows_kept)
        out[start:stop] = reduce(sorted_rows(chunk))
    return out


# --------------------------------------------------------------------------- operators


@_operator(MEAN)
def weighted_average(updates, weights) -> torch.Tensor:
    """Weighted average ``sum_k p_k tau_k`` (FedAvg / model soups, arXiv 2203.05482).

    Variant: weights normalised to sum to 1 (divisor ``sum w``, not the client count).
    """
    flat, p, shape = _prepare(updates, weights)
    return _weighted_sum(flat, p, 1.0).view(shape)


@_operator(MEAN)
def task_arithmetic(updates, weights, *, scale: float = 1.0) -> torch.Tensor:
    """Task arithmetic ``scale * sum_k p_k tau_k`` (Ilharco et al., arXiv 2212.04089).

    Variant: weights normalised to sum to 1, one global ``scale`` (the paper's lambda).
    Equals peft ``task_arithmetic`` called with the normalised weights, times ``scale``, and
    mergekit's with ``normalize: true`` (its default for this operator is false).
    """
    scale = _checks.check_scale(scale)
    flat, p, shape = _prepare(updates, weights)
    return _weighted_sum(flat, p, scale).view(shape)


@_operator(CLIENT_STEP)
def magnitude_prune(updates, weights, *, density: float = 0.2, scale: float = 1.0) -> torch.Tensor:
    """Keep each client's top-``density`` entries by magnitude, then ``scale * sum_k p_k tau_k``.

    The sparsify step of TIES without sign election (peft ``magnitude_prune``; TIES paper
    arXiv 2306.01708). Variant: per-tensor trim, ties at the threshold kept, no rescaling,
    normalised weights.
    """
    density = _checks.check_density(density)
    scale = _checks.check_scale(scale)
    flat, p, shape = _prepare(updates, weights)
    keep = _magnitude_mask(sparsify.trim_thresholds(flat, density))
    return _weighted_sum(flat, p, scale, keep).view(shape)


@_operator(SIGN_CONSENSUS)
def ties(updates, weights, *, density: float = 0.2, scale: float = 1.0, election: str = "mass") -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., arXiv 2306.01708).

    Resolves sign conflicts between clients instead of letting them cancel. Variant: per-tensor
    trim to the top-``density`` magnitudes (ties kept); sign ``gamma = sign(sum_k p_k tau_k)`` on
    the weighted trimmed updates (0 where that sum is exactly 0, giving 0), or with
    ``election="count"`` the sign of ``sum_k p_k sign(tau_k)`` (peft's ``"frequency"``); divisor =
    total weight ``sum_k p_k`` of the clients whose non-zero entry has sign ``gamma``; times
    ``scale``. With example-count weights a client holding more than half the data decides every
    sign it touches under either election; equal weights (``client-weights = 'equal'``) give the
    paper's unweighted merge. peft's ``ties`` elects on the unweighted trimmed sum and divides by the
    count of agreeing clients: equal to this at equal weights (tests/test_merge_equivalence.py).
    """
    density = _checks.check_density(density)
    scale = _checks.check_scale(scale)
    election = _checks.check_election(election)
    flat, p, shape = _prepare(updates, weights)
    keep = _magnitude_mask(sparsify.trim_thresholds(flat, density))
    return _sign_consensus(flat, p, scale, keep, election).view(shape)


@_operator(CLIENT_STEP)
def dare_linear(updates, weights, *, density: float = 0.5, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """DARE drop-and-rescale, then ``scale * sum_k p_k tau_k`` (Yu et al., arXiv 2311.03099).

    Random dropping with ``1/density`` rescaling keeps every update unbiased while sparsifying it.
    Variant: each entry kept independently with probability ``density`` (client k's uniform
    ``u < density``), element-wise rescale ``1/density`` (not mergekit's L1-norm matching).
    """
    density = _checks.check_density(density)
    scale = _checks.check_scale(scale)
    seed = _checks.check_seed(seed)
    flat, p, shape = _prepare(updates, weights)
    keep = _dare_mask(client_generators(seed, flat.shape[0], flat.device), density)
    return _weighted_sum(flat, p, scale / density, keep).view(shape)


@_operator(SIGN_CONSENSUS)
def dare_ties(updates, weights, *, density: float = 0.5, scale: float = 1.0, seed: int = 0,
              election: str = "mass") -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean (arXiv 2311.03099).

    Variant: DARE mask as in :func:`dare_linear` (rescale ``1/density``), then the sign election
    (``election`` as in :func:`ties`) and weight-normalised disjoint mean of :func:`ties` (0 where
    the elected total is exactly 0).
    """
    density = _checks.check_density(density)
    scale = _checks.check_scale(scale)
    seed = _checks.check_seed(seed)
    election = _checks.check_election(election)
    flat, p, shape = _prepare(updates, weights)
    keep = _dare_mask(client_generators(seed, flat.shape[0], flat.device), density)
    # The disjoint mean is homogeneous: rescaling every kept entry by 1/density is a final factor.
    return _sign_consensus(flat, p, scale / density, keep, election).view(shape)


@_operator(CLIENT_STEP)
def breadcrumbs(
    updates, weights, *, density: float = 0.2, gamma: float = 0.01, scale: float = 1.0
) -> torch.Tensor:
    """Model Breadcrumbs: drop outliers and small entries, then ``scale * sum_k p_k tau_k``.

    Removes the few largest-magnitude entries as well as the small ones (Davari & Belilovsky,
    arXiv 2312.06795). Variant: per tensor, the ``floor(gamma*n)`` largest magnitudes are dropped
    and the next ``floor(density*n)`` kept (ties resolved towards keeping); no rescale; normalised
    weights; no sign election (mergekit's ``breadcrumbs``; its default density is 1, here 0.2).
    """
    density = _checks.check_density(density)
    gamma = _checks.check_gamma(gamma, density)
    scale = _checks.check_scale(scale)
    flat, p, shape = _prepare(updates, weights)
    return _weighted_sum(flat, p, scale, _band_mask(flat, density, gamma)).view(shape)


@_operator(SIGN_CONSENSUS)
def breadcrumbs_ties(
    updates, weights, *, density: float = 0.2, gamma: float = 0.01, scale: float = 1.0, election: str = "mass"
) -> torch.Tensor:
    """Model Breadcrumbs' mask, then TIES sign election and disjoint mean (mergekit's ``breadcrumbs_ties``).

    Variant: the mask of :func:`breadcrumbs`, then the election (``election`` as in :func:`ties`)
    and weight-normalised disjoint mean of :func:`ties`; no rescale; times ``scale``.
    """
    density = _checks.check_density(density)
    gamma = _checks.check_gamma(gamma, density)
    scale = _checks.check_scale(scale)
    election = _checks.check_election(election)
    flat, p, shape = _prepare(updates, weights)
    return _sign_consensus(flat, p, scale, _band_mask(flat, density, gamma), election).view(shape)


@_operator(SIGN_CONSENSUS)
def della(
    updates, weights, *, density: float = 0.5, epsilon: float = 0.15, scale: float = 1.0, seed: int = 0,
    election: str = "mass",
) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune), rescale, then TIES (Deep et al., arXiv 2406.11617).

    Larger entries are kept more often. Variant: ranks over each client's whole tensor (mergekit
    ranks within matrix rows); keep probability ``density - epsilon + 2*epsilon*rank/(n-1)``
    (equal magnitudes share the lowest rank); survivors rescaled element-wise by 1/keep_prob (the
    paper's estimator, not mergekit's L1 matching); then the sign election (``election`` as in
    :func:`ties`) and weight-normalised disjoint mean of :func:`ties`; times ``scale``. With
    ``epsilon = 0`` this is exactly :func:`dare_ties` with the same seed. Clients are processed one
    at a time (ranking needs a sort of the client's whole tensor): extra memory is about 70 bytes per
    entry of one client's tensor, independent of K.
    """
    density = _checks.check_density(density)
    epsilon = _checks.check_epsilon(epsilon, density)
    scale = _checks.check_scale(scale)
    seed = _checks.check_seed(seed)
    election = _checks.check_election(election)
    flat, p, shape = _prepare(updates, weights)
    sums = consensus.new_sums(flat.shape[1], flat.device)
    for k, start, stop, values, scratch in _della_values(flat, p, density, epsilon, seed):
        consensus.add_sums(sums[:, start:stop], values, p[:, k : k + 1], scratch=scratch)
    out = torch.empty(flat.shape[1], dtype=torch.float32, device=flat.device)
    return consensus.disjoint_mean(sums, out, scale, election).view(shape)


@_operator(CLIENT_STEP)
def della_linear(
    updates, weights, *, density: float = 0.5, epsilon: float = 0.15, scale: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """DELLA's MagPrune drop and rescale, then ``scale * sum_k p_k tau_k`` (mergekit's ``della_linear``).

    Variant: the drop and per-entry 1/keep_prob rescale of :func:`della` (unbiased per entry), no
    sign election. With ``epsilon = 0`` this is exactly :func:`dare_linear` with the same seed.
    """
    density = _checks.check_density(density)
    epsilon = _checks.check_epsilon(epsilon, density)
    scale = _checks.check_scale(scale)
    seed = _checks.check_seed(seed)
    flat, p, shape = _prepare(updates, weights)
    out = torch.zeros(flat.shape[1], dtype=torch.float32, device=flat.device)
    for k, start, stop, values, _ in _della_values(flat, p, density, epsilon, seed):
        out[start:stop].add_(values[0], alpha=float(p[0, k]))
    return out.mul_(scale).view(shape)


@_operator(ORDER_STATISTIC)
def median(updates, weights) -> torch.Tensor:
    """Coordinate-wise median of the client updates (Yin et al., arXiv 1803.01498).

    Robust to a minority of outlying clients. Unweighted: weights only select the participants
    (clients with weight 0 are left out; the others count equally). For an even count the
    median is the mean of the two middle values.
    """
    flat, p, shape = _prepare(updates, weights)

    def middle(rows: list[torch.Tensor]) -> torch.Tensor:
        m = len(rows)
        return rows[m // 2] if m % 2 else rows[m // 2 - 1].add_(rows[m // 2]).mul_(0.5)

    return _sorted_columns(flat, p, middle).view(shape)


@_operator(ORDER_STATISTIC)
def trimmed_mean(updates, weights, *, beta: float = 0.1) -> torch.Tensor:
    """Coordinate-wise trimmed mean (after Yin et al., arXiv 1803.01498).

    Per coordinate, drop the ``b`` smallest and ``b`` largest values and average the rest, with
    ``b = min(ceil(beta*K), (K-1)//2)`` (``beta*K`` on beta's decimal value), so at least one value
    remains. At the default beta 0.1: ``b`` = 0 for K <= 2, 1 for 3 <= K <= 10, 2 for 11 <= K <= 20;
    beta 0 trims nothing. Yin et al. drop a beta fraction at each end, taking ``beta*K`` to be whole;
    rounding it down (as Flower's FedTrimmedAvg does) trims nobody below 10 clients at beta 0.1, so
    one bad client among a few would move the result as much as in the mean: this rounds up.
    Unweighted like :func:`median` (clients with weight 0 left out, ``K`` counts the others).
    """
    beta = _checks.check_beta(beta)
    flat, p, shape = _prepare(updates, weights)

    def inner_mean(rows: list[torch.Tensor]) -> torch.Tensor:
        cut = min(_checks.fraction_count_ceil(beta, len(rows)), (len(rows) - 1) // 2)
        kept = rows[cut : len(rows) - cut]
        total = kept[0]
        for row in kept[1:]:
            total.add_(row)
        return total.div_(len(kept))

    return _sorted_columns(flat, p, inner_mean).view(shape)
