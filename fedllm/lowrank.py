"""A model-space update kept as factors, `ΔW = Σ c_i·L_i·R_iᵀ`, so that the server's memory and time
grow with the rank of what clients sent, not with a layer's d_out·d_in.

A LoRA client's update `s·B'A' − s·BA` has rank at most 2r, a weighted mean of K of them at most
(K + 1)·r (the sent `BA` is the same for all), and the exact global update ΔW_g stays low-rank for as
many rounds as its rank is well below the layer's. Factors are kept side by side as parts, never
copied by a sum or a scaling, and a part shared by several updates (the sent state) counts once.
`compacted` re-factors exactly (QR of both stacked factors and an SVD of the small core, as in
incremental SVD, Brand 2006) and returns a dense tensor once that is the smaller of the two.
`dense`, `squared_norm` and `largest_entry` accept either form, so code that needs entries
densifies one module at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

# Singular values below this fraction of the largest stacked term are float32 round-off (of terms
# that cancel, such as the sent state every client's update subtracts), not update.
NEGLIGIBLE = 1e-5
ROWS_PER_CHUNK = 1024  # rows of the matrix materialised at once when an entry bound must be checked exactly

Part = tuple[float, torch.Tensor, torch.Tensor]  # c, L (rows × q), R (cols × q): the matrix c·L·Rᵀ


def _storage(tensor: torch.Tensor) -> tuple:
    """Which factor a tensor is: views of the same memory in the same layout are the same factor."""
    return tensor.data_ptr(), tensor.shape, tensor.stride()


def _sharing(parts: list[Part]) -> list[Part]:
    """Parts that share a factor summed into one part, the most widely shared factor first (the sent
    `A` all K clients' updates hold before their own `ΔB`s, each of which only two parts hold)."""
    while True:
        groups: dict[tuple, list[int]] = {}
        for index, part in enumerate(parts):
            for side in (1, 2):
                groups.setdefault((side, _storage(part[side])), []).append(index)
        (side, _), members = max(groups.items(), key=lambda group: len(group[1]))
        if len(members) < 2:
            return parts
        same = [parts[i] for i in members]
        total = sum(part[0] * part[3 - side] for part in same)  # the factors on the other side, weighted
        shared = (1.0, same[0][1], total) if side == 1 else (1.0, total, same[0][2])
        parts = [part for i, part in enumerate(parts) if i not in members] + [shared]


def _column_norms(factor: torch.Tensor) -> torch.Tensor:
    """Column norms in float64 (computed in float32 unless that overflows)."""
    norms = factor.norm(dim=0)
    return (norms if torch.isfinite(norms).all() else factor.double().norm(dim=0)).double()


def _r(qr: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The triangular factor R (min(rows, q) × q)."""
    compact = qr[0]
    return compact[: min(compact.shape)].triu()


def _q_times(qr: tuple[torch.Tensor, torch.Tensor], small: torch.Tensor) -> torch.Tensor:
    """Q·`small` (rows × k) for `small` of min(rows, q) rows, Q applied as its reflectors."""
    compact, tau = qr
    padded = torch.zeros(compact.shape[0], small.shape[1], dtype=compact.dtype, device=compact.device)
    padded[: small.shape[0]] = small.to(compact.device)
    return torch.ormqr(compact, tau, padded)


@dataclass(frozen=True)
class LowRank:
    """`Σ c_i·L_i·R_iᵀ` in the layer's own layout. `orthogonal`: a single part whose `L` has
    orthogonal columns of descending norm (the singular values) and whose `R` is orthonormal."""

    parts: tuple[Part, ...]
    orthogonal: bool = False

    @classmethod
    def of(cls, left: torch.Tensor, right: torch.Tensor, orthogonal: bool = False, scale: float = 1.0) -> LowRank:
        return cls(((scale, left, right),), orthogonal and scale == 1.0)

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> LowRank:
        return cls.of(torch.zeros(shape[0], 0), torch.zeros(shape[1], 0), orthogonal=True)

    @classmethod
    def combination(cls, terms: list[LowRank], coefficients: list[float]) -> LowRank:
        """`Σ a_k · term_k` as parts side by side. Parts that share a factor are summed into one
        (`c·L·R₁ᵀ + c'·L·R₂ᵀ = L·(c·R₁ + c'·R₂)ᵀ`): the sent state every client's update holds
        counts once, and nothing else is copied."""
        parts = [(a * c, left, right) for term, a in zip(terms, coefficients) for c, left, right in term.parts]
        return cls(tuple(_sharing(parts)))

    @property
    def shape(self) -> torch.Size:
        _, left, right = self.parts[0]
        return torch.Size((left.shape[0], right.shape[0]))

    @property
    def rank(self) -> int:
        """Columns of the factors (the rank once compacted)."""
        return sum(left.shape[1] for _, left, _ in self.parts)

    @property
    def T(self) -> LowRank:  # noqa: N802 - as torch names it
        return LowRank(tuple((c, right, left) for c, left, right in self.parts))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(L, R)` with the matrix `L·Rᵀ`: the parts side by side (a copy unless there is one part of coefficient 1)."""
        return self._side(1), self._side(2)

    def _side(self, side: int) -> torch.Tensor:
        """The parts' left (1) or right (2) factors side by side, the coefficients folded into the left."""
        if len(self.parts) == 1 and self.parts[0][0] == 1.0:
            return self.parts[0][side]
        factors = torch.cat([part[side] for part in self.parts], dim=1)
        if side == 1:
            factors.mul_(torch.cat([torch.full((left.shape[1],), c, device=factors.device) for c, left, _ in self.parts]))
        return factors

    def dense(self) -> torch.Tensor:
        _, left, _ = self.parts[0]
        total = torch.zeros(self.shape, dtype=left.dtype, device=left.device)
        for c, left, right in self.parts:
            total.addmm_(left, right.T, alpha=c)
        return total

    def __mul__(self, factor: float) -> LowRank:
        return LowRank(tuple((factor * c, left, right) for c, left, right in self.parts))

    __rmul__ = __mul__

    def __neg__(self) -> LowRank:
        return self * -1.0

    def __truediv__(self, divisor: float) -> LowRank:
        return self * (1 / divisor)

    def __add__(self, other: object) -> Update:
        if isinstance(other, LowRank):
            return LowRank.combination([self, other], [1.0, 1.0]).compacted()
        if isinstance(other, (int, float)) and other == 0:  # sum() and `state.get(m, 0) + d` start from 0
            return self
        if isinstance(other, torch.Tensor):
            return self.dense() + other
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other: object) -> Update:
        return self + (-other)

    def __rsub__(self, other: object) -> Update:
        return -self + other

    def finite(self) -> bool:
        return all(math.isfinite(c) and bool(torch.isfinite(left).all() and torch.isfinite(right).all())
                   for c, left, right in self.parts)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(U, σ, V)` with the matrix `U·diag(σ)·Vᵀ`, σ descending and above round-off."""
        if self.orthogonal:
            _, left, right = self.parts[0]
            sigma = left.norm(dim=0)
            return left / sigma.clamp_min(1e-30), sigma, right
        if self.rank == 0:
            _, left, right = self.parts[0]
            return left[:, :0], torch.zeros(0), right[:, :0]
        # Round-off scales with the largest stacked term, which may dwarf the result when terms cancel.
        largest_term = max((abs(c) * float((_column_norms(left) * _column_norms(right)).max())
                            for c, left, right in self.parts if left.shape[1]), default=0.0)
        # QR in LAPACK's compact form (reflectors, no Q of the factors' size), one side's stacked copy
        # at a time, freed once factored.
        left_qr = torch.geqrf(self._side(1))
        right_qr = torch.geqrf(self._side(2))
        u, sigma, vh = torch.linalg.svd(_r(left_qr).double() @ _r(right_qr).double().T)  # small: float64 is cheap, cannot overflow
        kept = int((sigma > max(float(sigma[0]), largest_term) * NEGLIGIBLE).sum()) if sigma[0] > 0 else 0
        u, sigma, v = u[:, :kept].float(), sigma[:kept].float(), vh[:kept].T.float()
        return _q_times(left_qr, u), sigma, _q_times(right_qr, v)

    def compacted(self) -> Update:
        """The same matrix as one part with as many columns as its rank (exact), or dense where that is smaller."""
        rows, cols = self.shape
        if self.orthogonal:
            return self
        if self.rank * (rows + cols) >= 2 * rows * cols:  # the parts outgrew the matrix: QR would cost more than it saves
            return self.dense()
        if not self.finite():
            return self  # left as it is, for the finiteness checks to refuse
        u, sigma, v = self.svd()
        if not torch.isfinite(sigma).all():
            return self
        if len(sigma) * (rows + cols) >= rows * cols:
            return self.dense()
        return LowRank.of(u.mul_(sigma), v, orthogonal=True)

    def squared_norm(self) -> float:
        """‖Σ c_i·L_i·R_iᵀ‖_F² = Σ_ij c_i·c_j·tr((L_iᵀL_j)(R_jᵀR_i)), in float64, without forming the matrix."""
        parts = [(c, left.double(), right.double()) for c, left, right in self.parts]
        return float(sum(ci * cj * ((li.T @ lj) * (ri.T @ rj)).sum()
                         for ci, li, ri in parts for cj, lj, rj in parts))

    def largest_entry(self, exact_above: float = 0.0) -> float:
        """max |entry| (nan where a factor is not finite); its Cauchy–Schwarz bound instead while that
        bound is at most `exact_above` (all a sanity limit needs), else computed in row chunks."""
        if not self.finite():
            return math.nan
        if self.rank == 0:
            return 0.0
        row_norms = [(abs(c) * left.norm(dim=1), right.norm(dim=1)) for c, left, right in self.parts]
        bound = float(sum(rows.max() * cols.max() for rows, cols in row_norms))
        if bound <= exact_above:
            return bound
        left, right = self.stacked()
        return max(float((left[i:i + ROWS_PER_CHUNK] @ right.T).abs().max())
                   for i in range(0, self.shape[0], ROWS_PER_CHUNK))


Update = Union[torch.Tensor, LowRank]  # one module's model-space update, dense or factored


def dense(update: Update) -> torch.Tensor:
    """The update as a tensor."""
    return update.dense() if isinstance(update, LowRank) else update


def compacted(update: Update) -> Update:
    """A factored update with no more columns than its rank (or dense); a dense one as it is."""
    return update.compacted() if isinstance(update, LowRank) else update


def squared_norm(update: Update) -> float:
    """‖update‖_F² in float64."""
    if isinstance(update, LowRank):
        return update.squared_norm()
    return float(torch.linalg.vector_norm(update, dtype=torch.float64)) ** 2 if update.numel() else 0.0


def largest_entry(update: Update, exact_above: float = 0.0) -> float:
    """max |entry| (nan or inf where not finite); for factors an upper bound while it is at most `exact_above`."""
    if isinstance(update, LowRank):
        return update.largest_entry(exact_above)
    return float(update.abs().max()) if update.numel() else 0.0


# Stored form (checkpoints): a factored module `m` is two tensors, `m@left` and `m@right`, or
# `m@svd-left` and `m@svd-right` when they are an exact SVD (kept so a resumed run re-factors
# bit-identically). Module names never hold an `@`.
_PARTS = {False: ("left", "right"), True: ("svd-left", "svd-right")}


def flatten(updates: dict[str, Update]) -> dict[str, torch.Tensor]:
    """Dense modules as they are, factored ones as their (stacked) factors under suffixed names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, update in updates.items():
        if isinstance(update, LowRank):
            left, right = _PARTS[update.orthogonal]
            tensors[f"{name}@{left}"], tensors[f"{name}@{right}"] = update.stacked()
        else:
            tensors[name] = update
    return tensors


def unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, Update]:
    """`flatten`'s inverse; `ValueError` for factors that do not pair up."""
    updates: dict[str, Update] = {name: t for name, t in tensors.items() if "@" not in name}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name in tensors.keys() - updates.keys():
        module, _, part = name.rpartition("@")
        factors.setdefault(module, {})[part] = tensors[name]
    for module, parts in factors.items():
        orthogonal = next((o for o, names in _PARTS.items() if set(parts) == set(names)), None)
        left, right = (parts.get(n) for n in _PARTS[bool(orthogonal)])
        if orthogonal is None or left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[1]:
            raise ValueError(f"the factors of {module!r} do not pair up ({sorted(parts)})")
        updates[module] = LowRank.of(left, right, orthogonal)
    return updates
