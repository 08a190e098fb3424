"""Sorting a chunk along the client axis, for the coordinate-wise median and trimmed mean.

For up to 32 clients a Batcher merge-exchange network sorts the rows of a ``[K, C]`` chunk with
``torch.minimum``/``torch.maximum`` on whole rows (about K log^2 K / 4 compare-exchanges, each two
vectorised passes over C values), several times faster than ``torch.sort(dim=0)`` on CPU. More
clients fall back to ``torch.sort``.
"""

from __future__ import annotations

import functools

import torch

_NETWORK_MAX_ROWS = 32


@functools.lru_cache(maxsize=None)
def batcher_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs ``(i, j)``, ``i < j``, of Batcher's merge-exchange sort for ``n`` keys.

    Knuth, TAOCP vol. 3, 5.2.2 Algorithm M; valid for any ``n`` (not only powers of two).
    """
    pairs: list[tuple[int, int]] = []
    if n < 2:
        return ()
    t = (n - 1).bit_length()
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            pairs.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(pairs)


def sorted_rows(chunk: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``chunk`` ([K, C]) sorted coordinate-wise, smallest first, as K tensors [C]."""
    k = chunk.shape[0]
    if k > _NETWORK_MAX_ROWS:
        return list(torch.sort(chunk, dim=0).values.unbind(0))
    rows = [r.clone() for r in chunk.unbind(0)]
    spare = torch.empty_like(rows[0]) if k > 1 else None
    for i, j in batcher_pairs(k):
        lo = torch.minimum(rows[i], rows[j], out=spare)
        torch.maximum(rows[i], rows[j], out=rows[j])
        spare, rows[i] = rows[i], lo
    return rows
