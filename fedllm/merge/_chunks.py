"""Column chunking and per-client random streams shared by the merge operators.

Operators work on ``flat = updates.reshape(K, n)`` one block of columns at a time, so the extra
memory is a few ``[K, width]`` scratch buffers (about 2 MiB each) whatever ``n`` is, and every
elementwise pass runs on cache-resident data.
"""

from __future__ import annotations

from typing import Iterator

import torch

#: Target number of elements (all clients together) in one column chunk.
CHUNK_ELEMENTS = 1 << 19
_MIN_WIDTH = 1 << 12
_MASK64 = (1 << 64) - 1


def chunk_width(rows: int, n: int) -> int:
    """Columns per chunk for ``rows`` clients and ``n`` entries per client."""
    return max(1, min(n, max(_MIN_WIDTH, CHUNK_ELEMENTS // max(rows, 1))))


def column_ranges(n: int, width: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, width):
        yield start, min(n, start + width)


def float32_columns(flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``flat[:, start:stop]`` as float32: a view for float32 input, a chunk-sized copy otherwise."""
    chunk = flat[:, start:stop]
    return chunk if chunk.dtype == torch.float32 else chunk.to(torch.float32)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def client_seed(seed: int, client: int) -> int:
    """32-bit seed of client ``client``'s random stream (torch's CPU generator keeps 32 bits)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ client) & 0xFFFFFFFF


def client_generators(seed: int, num_clients: int, device: torch.device) -> list[torch.Generator]:
    """One generator per client: client ``k`` draws ``torch.rand(n, generator=gens[k])``.

    The stream of client ``k`` depends only on ``(seed, k)``, and drawing it in consecutive
    pieces gives the same numbers as one draw of length ``n``, so results do not depend on the
    chunk width. The global RNG is never touched.
    """
    gens = []
    for k in range(num_clients):
        g = torch.Generator(device=device)
        g.manual_seed(client_seed(seed, k))
        gens.append(g)
    return gens


def draw_uniforms(gens: list[torch.Generator], out: torch.Tensor) -> torch.Tensor:
    """Fill row ``k`` of ``out`` ([K, width]) with the next ``width`` draws of client ``k``."""
    for k, g in enumerate(gens):
        torch.rand(out.shape[1], generator=g, out=out[k])
    return out
