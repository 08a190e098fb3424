"""Validation shared by all merge operators.

Every check raises ``ValueError`` with a message that names the offending argument and says
what to change. Numeric parameters are returned as plain Python numbers so the operators can use
them without further conversion.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Sequence

import torch


def updates_matrix(updates: torch.Tensor) -> torch.Tensor:
    """Return ``updates`` viewed as ``[K, n]`` (a view when ``updates`` is contiguous)."""
    if not isinstance(updates, torch.Tensor):
        raise ValueError(
            f"updates must be a torch.Tensor of shape [K, ...] (clients first), got {type(updates).__name__}"
        )
    if updates.dim() < 1 or updates.shape[0] < 1:
        raise ValueError(
            f"updates must be at least 1-D with K >= 1 clients along dim 0, got shape {tuple(updates.shape)}"
        )
    if not updates.is_floating_point():
        raise ValueError(f"updates must have a floating-point dtype, got {updates.dtype}; convert with .float()")
    return updates.reshape(updates.shape[0], -1)


def normalized_weights(weights: torch.Tensor | Sequence[float], num_clients: int) -> torch.Tensor:
    """Validate per-client weights and return ``p = weights / weights.sum()`` as float32."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"weights must be a 1-D tensor of {num_clients} numbers: {err}") from None
    if w.shape != (num_clients,):
        raise ValueError(
            f"weights must have shape ({num_clients},), one per client in updates, got {tuple(w.shape)}"
        )
    bad = (~torch.isfinite(w)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"weights contain NaN or Inf at client index(es) {bad}; pass finite weights")
    negative = (w < 0).nonzero().flatten().tolist()
    if negative:
        raise ValueError(f"weights must be non-negative; client index(es) {negative} have negative weights")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights are all zero; give at least one client a positive weight")
    return (w / total).to(torch.float32)


def check_finite(flat: torch.Tensor) -> None:
    """Raise if ``flat`` ([K, n]) holds NaN or Inf, naming the clients.

    Fast path: one reduction (no allocation of the input's size). A NaN/Inf always makes the sum
    non-finite; only then (or on overflow of a huge finite sum) are rows checked one by one.
    """
    if torch.isfinite(flat.sum()):
        return
    bad = [k for k in range(flat.shape[0]) if not bool(torch.isfinite(flat[k]).all())]
    if bad:
        raise ValueError(
            f"updates contain NaN or Inf for client index(es) {bad}; reject those updates before merging"
        )


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_density(density: object) -> float:
    d = _real("density", density)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {d}")
    return d


ELECTIONS = ("mass", "count")


def check_election(election: object) -> str:
    if election not in ELECTIONS:
        raise ValueError(f"election must be 'mass' (sign of the weighted sum) or 'count' (sign of the weighted "
                         f"count of signs), got {election!r}")
    return election


def check_scale(scale: object) -> float:
    return _real("scale", scale)


def check_gamma(gamma: object, density: float) -> float:
    g = _real("gamma", gamma)
    if not 0.0 <= g < 1.0:
        raise ValueError(f"gamma must be in [0, 1) (the fraction of largest entries dropped), got {g}")
    if density + g > 1.0 + 1e-12:
        raise ValueError(
            f"density + gamma must be <= 1 (kept plus dropped-outlier fractions), got {density} + {g}; "
            "lower one of them"
        )
    return g


def check_epsilon(epsilon: object, density: float) -> float:
    e = _real("epsilon", epsilon)
    if e < 0.0:
        raise ValueError(f"epsilon must be >= 0 (spread of keep probabilities), got {e}")
    if not (density - e > 0.0 and density + e <= 1.0):
        raise ValueError(
            f"keep probabilities density +/- epsilon = [{density - e:g}, {density + e:g}] must lie in (0, 1]; "
            f"lower epsilon (got {e}) or move density (got {density})"
        )
    return e


def check_beta(beta: object) -> float:
    b = _real("beta", beta)
    if not 0.0 <= b < 0.5:
        raise ValueError(f"beta must be in [0, 0.5) (fraction trimmed at each end), got {b}")
    return b


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    return int(seed)


def fraction_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` computed on the decimal value of ``fraction``.

    ``int(0.57 * 100)`` is 56 in binary floating point; this returns 57.
    """
    return math.floor(Fraction(repr(float(fraction))) * n)


def fraction_count_ceil(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` computed on the decimal value of ``fraction``.

    ``math.ceil(0.07 * 100)`` is 8 in binary floating point; this returns 7.
    """
    return math.ceil(Fraction(repr(float(fraction))) * n)


def keep_count(density: float, n: int) -> int:
    """Number of entries a client's tensor keeps: ``floor(density * n)``, at least 1."""
    return min(n, max(1, fraction_count(density, n)))


class UnknownParameterError(TypeError, ValueError):
    """An operator was given a parameter it does not accept (catchable as TypeError or ValueError)."""


def reject_unknown(operator: str, given: dict, accepted: dict) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise UnknownParameterError(
            f"merge operator {operator!r} got unknown parameter(s) {unknown}; it accepts: {listing}"
        )
