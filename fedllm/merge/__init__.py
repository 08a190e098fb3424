"""Merge operators: pure tensor functions over stacked client updates, registered by name.

Every operator has the signature ``op(updates: Tensor[K, ...], weights: Tensor[K], **params)``
and returns a float32 tensor of the per-client shape; see :mod:`fedllm.merge.operators`.

* ``OPERATORS``: name -> function.
* ``OPERATOR_PARAMS``: name -> {parameter: default}, the only keyword parameters the operator
  accepts (a run-config key ``aggregation-<param>`` maps onto ``<param>``, with ``-`` read as ``_``
  if a name ever needs it).
* ``OPERATOR_KINDS``: name -> what kind of merge it is (``MEAN``, ``CLIENT_STEP``,
  ``SIGN_CONSENSUS``, ``ORDER_STATISTIC``); ``operators_of(*kinds)`` lists those of some kinds.
* ``get_operator(name)``: the function, or ``ValueError`` listing the valid names.
* ``set_threads(n)``: intra-op threads used while an operator runs (default 1; None = torch's).
"""

from __future__ import annotations

from typing import Any, Callable

from . import operators as _operators_module
from ._checks import UnknownParameterError
from .operators import (
    CLIENT_STEP,
    MEAN,
    ORDER_STATISTIC,
    SIGN_CONSENSUS,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    magnitude_prune,
    median,
    task_arithmetic,
    ties,
    trimmed_mean,
    weighted_average,
)

OPERATORS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        weighted_average,
        task_arithmetic,
        magnitude_prune,
        ties,
        dare_linear,
        dare_ties,
        breadcrumbs,
        breadcrumbs_ties,
        della,
        della_linear,
        median,
        trimmed_mean,
    )
}

OPERATOR_PARAMS: dict[str, dict[str, Any]] = {name: dict(f.params) for name, f in OPERATORS.items()}

#: Operators whose result uses random draws (they take ``seed``).
RANDOMIZED = frozenset(name for name, params in OPERATOR_PARAMS.items() if "seed" in params)

OPERATOR_KINDS: dict[str, str] = {name: f.kind for name, f in OPERATORS.items()}


def operators_of(*kinds: str) -> tuple[str, ...]:
    """The operators of the given kinds, in registry order."""
    return tuple(name for name, kind in OPERATOR_KINDS.items() if kind in kinds)


def set_threads(threads: int | None) -> None:
    """Intra-op threads the operators use while they run (default 1); ``None`` keeps torch's.

    One thread is robust on shared CPUs (see :mod:`fedllm.merge.operators`); more threads help
    on an otherwise idle many-core server.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    _operators_module.THREADS = threads


def get_operator(name: str) -> Callable[..., Any]:
    """Return the operator registered as ``name``; ``ValueError`` listing valid names otherwise."""
    try:
        return OPERATORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown merge operator {name!r}; valid names: {', '.join(sorted(OPERATORS))}"
        ) from None


__all__ = [
    "CLIENT_STEP",
    "MEAN",
    "OPERATORS",
    "OPERATOR_KINDS",
    "OPERATOR_PARAMS",
    "ORDER_STATISTIC",
    "RANDOMIZED",
    "SIGN_CONSENSUS",
    "UnknownParameterError",
    "get_operator",
    "operators_of",
    "set_threads",
    *OPERATORS,
]
