"""Per-client sparsification: exact magnitude thresholds and keep masks.

All masks are float tensors of 0.0/1.0 (float compares and multiplies are several times faster
than bool masks on CPU). Trimming is per tensor: each client's whole tensor is ranked on its own.

Ties: a trim keeps every entry with ``|x| >= t`` where ``t`` is the exact k-th largest magnitude,
so entries tied with the k-th largest are all kept (at least k entries survive; exactly k when
magnitudes are distinct). Trimmed entries are exact zeros and never count as agreeing in TIES.
"""

from __future__ import annotations

import torch

from . import _checks

_SMALL = 1 << 16  # up to this many entries per client, torch.kthvalue is cheaper than radix select
_PIECE = 1 << 20  # entries of one row processed at once by the radix select
_HI_BINS = 1 << 15  # magnitude bit patterns: 15 high bits (sign cleared) ...
_LO_BINS = 1 << 16  # ... then 16 low bits


# --------------------------------------------------------------------------- exact selection


def kth_largest_magnitude(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest ``|x|`` of every row of ``flat`` ([K, n]); float32 ``[K]``."""
    return kth_largest_magnitudes(flat, (k,))[:, 0]


def kth_largest_magnitudes(flat: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Exact ``ks[j]``-th largest ``|x|`` of every row of ``flat`` ([K, n]); float32 ``[K, len(ks)]``.

    For ``n > 65536`` this is a two-pass radix select on the float32 bit pattern of ``|x|``
    (monotone in ``|x|`` for non-negative floats): a histogram of the 15 high bits finds the bin
    holding each requested rank, a histogram of the 16 low bits of the entries in that bin gives
    the exact value. No sort and no copy of the row: memory is one 4 MiB piece buffer and
    histograms of 256 KiB + 512 KiB per rank. Rows of at most 65536 entries use
    ``torch.kthvalue`` on groups of rows.
    """
    rows, n = flat.shape
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"rank k must be in [1, {n}], got {k}")
    out = torch.empty(rows, len(ks), dtype=torch.float32, device=flat.device)
    if n <= _SMALL:
        group = max(1, _PIECE // n)
        for r0 in range(0, rows, group):
            block = flat[r0 : r0 + group].to(torch.float32).abs()
            for j, k in enumerate(ks):
                out[r0 : r0 + block.shape[0], j] = torch.kthvalue(block, n - k + 1, dim=1).values
        return out
    key = torch.empty(min(n, _PIECE), dtype=torch.int32, device=flat.device)
    for r in range(rows):
        out[r] = _kth_radix(flat[r], ks, key)
    return out


def _row_pieces(row: torch.Tensor):
    """Consecutive pieces of one client's row as int32 bit patterns of float32 values."""
    for start in range(0, row.numel(), _PIECE):
        piece = row[start : start + _PIECE]
        if piece.dtype != torch.float32:
            piece = piece.to(torch.float32)
        yield piece.view(torch.int32)


def _kth_radix(row: torch.Tensor, ks: tuple[int, ...], key: torch.Tensor) -> torch.Tensor:
    dev = row.device
    hist_hi = torch.zeros(_HI_BINS, dtype=torch.int64, device=dev)
    for bits in _row_pieces(row):
        kk = key[: bits.numel()]
        _high_key(bits, kk)
        hist_hi += torch.bincount(kk, minlength=_HI_BINS)
    hi_bins, k_left = zip(*(_bin_of_kth(hist_hi, k) for k in ks))

    hist_lo = {b: torch.zeros(_LO_BINS, dtype=torch.int64, device=dev) for b in hi_bins}
    for bits in _row_pieces(row):
        kk = key[: bits.numel()]
        _high_key(bits, kk)
        for b, hist in hist_lo.items():
            hist += torch.bincount(bits[kk == b].bitwise_and_(_LO_BINS - 1), minlength=_LO_BINS)

    value_bits = [(b << 16) | _bin_of_kth(hist_lo[b], kl)[0] for b, kl in zip(hi_bins, k_left)]
    return torch.tensor(value_bits, dtype=torch.int32, device=dev).view(torch.float32)


def _high_key(bits: torch.Tensor, out: torch.Tensor) -> None:
    """``out = (bits >> 16) & 0x7FFF``: the 15 high bits of ``|x|``'s bit pattern."""
    torch.bitwise_right_shift(bits, 16, out=out)
    out.bitwise_and_(_HI_BINS - 1)


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element of a histogram, and that element's rank in it."""
    from_top = hist.flip(0).cumsum(0)  # from_top[j] = number of elements in bins >= len-1-j
    j = int((from_top < k).sum())
    b = hist.numel() - 1 - j
    above = int(from_top[j]) - int(hist[b])
    return b, k - above


# --------------------------------------------------------------------------- thresholds


def trim_thresholds(flat: torch.Tensor, density: float) -> torch.Tensor:
    """``[K, 1]`` thresholds: client k keeps ``|x| >= t_k``, its top-``density`` fraction."""
    n = flat.shape[1]
    k = _checks.keep_count(density, n)
    if k >= n:
        return torch.zeros(flat.shape[0], 1, device=flat.device)
    return kth_largest_magnitude(flat, k).view(-1, 1)


def band_thresholds(flat: torch.Tensor, density: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Breadcrumbs band ``[lower, upper]`` per client, as two ``[K, 1]`` tensors.

    Entries are ranked by magnitude, largest first; the ``floor(gamma*n)`` largest are dropped and
    the next ``keep_count(density, n)`` are kept: ``upper`` is the (n_top+1)-th largest magnitude,
    ``lower`` the (n_top+n_keep)-th (one shared selection pass). Ties are resolved towards keeping
    (``lower <= |x| <= upper``), so at least ``n_keep`` entries survive.
    """
    n = flat.shape[1]
    n_keep = _checks.keep_count(density, n)
    n_top = min(_checks.fraction_count(gamma, n), n - n_keep)
    if n == 0:
        empty = torch.zeros(flat.shape[0], 1, device=flat.device)
        return empty, empty
    # With n_top = 0, upper is the largest magnitude (nothing dropped at the top); with
    # n_top + n_keep = n, lower is the smallest (nothing dropped at the bottom).
    bounds = kth_largest_magnitudes(flat, (n_top + n_keep, n_top + 1))
    return bounds[:, 0:1], bounds[:, 1:2]


# --------------------------------------------------------------------------- masks (per chunk)


def magnitude_keep(chunk: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = (|chunk| >= threshold)`` as 0/1 floats (``threshold`` is ``[K, 1]``)."""
    torch.abs(chunk, out=out)
    return torch.ge(out, threshold, out=out)


def band_keep(
    chunk: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """``out = (lower <= |chunk| <= upper)`` as 0/1 floats."""
    torch.abs(chunk, out=scratch)
    torch.ge(scratch, lower, out=out)
    torch.le(scratch, upper, out=scratch)
    return out.mul_(scratch)


def dare_keep(uniforms: torch.Tensor, density: float, out: torch.Tensor) -> torch.Tensor:
    """DARE keep mask: entry kept when its uniform draw is ``< density`` (probability density)."""
    return torch.lt(uniforms, density, out=out)


def della_keep_probabilities(row: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probability of every entry of one client's tensor (1-D, float32).

    ``p_i = density - epsilon + 2*epsilon * r_i / (n - 1)`` where ``r_i`` is the number of
    entries with strictly smaller magnitude (equal magnitudes share the lowest rank), so the
    smallest entry gets ``density - epsilon`` and the largest ``density + epsilon``.
    Costs one sort of the int32 magnitude bit patterns (several times faster than sorting floats
    on CPU) and O(n) scratch memory.
    """
    n = row.numel()
    if n <= 1 or epsilon == 0.0:
        return torch.full((n,), density, dtype=torch.float32, device=row.device)
    key = row.to(torch.float32).contiguous().view(torch.int32).bitwise_and(0x7FFFFFFF)
    sorted_key, order = torch.sort(key)
    del key
    run_start = torch.ones(n, dtype=torch.bool, device=row.device)
    torch.ne(sorted_key[1:], sorted_key[:-1], out=run_start[1:])
    del sorted_key
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    rank = torch.arange(n, dtype=index_dtype, device=row.device)
    if not bool(run_start.all()):  # equal magnitudes share the rank of the first of their run
        rank = torch.cummax(rank.masked_fill_(~run_start, 0), 0).values
    del run_start
    probs_sorted = rank.to(torch.float64).mul_(2.0 * epsilon / (n - 1)).add_(density - epsilon)
    del rank
    probs = torch.empty(n, dtype=torch.float32, device=row.device)
    return probs.index_copy_(0, order, probs_sorted.to(torch.float32))
