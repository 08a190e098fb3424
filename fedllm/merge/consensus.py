"""TIES sign election and disjoint mean, from four linear sums.

For values ``v_k`` (already trimmed/dropped) and normalised weights ``p_k`` the merge of one
coordinate needs only

    pos_mass = sum_k p_k max(v_k, 0)        neg_mass = sum_k p_k min(v_k, 0)
    pos_weight = sum_k p_k [v_k > 0]         neg_weight = sum_k p_k [v_k < 0]

The elected sign is ``gamma = sign(pos_mass + neg_mass)`` (= sign of the weighted sum; election
``"mass"``, the TIES paper's) or ``sign(pos_weight - neg_weight)`` (the weighted count of signs;
election ``"count"``, peft's ``"frequency"``, where a client's size does not scale its vote) and the
disjoint mean is ``pos_mass / pos_weight`` where ``gamma > 0`` and ``neg_mass / neg_weight``
where ``gamma < 0``. Conventions:

* an entry equal to 0 (trimmed, dropped, or zero to begin with) never agrees with any sign;
* where the weighted sum is exactly 0 (``gamma = 0``) no client agrees and the result is 0
  (peft and mergekit pick +1 there, the original TIES code the global majority sign).

The sums are linear in what each client contributes, so they can be accumulated client by client
(or chunk by chunk, or under secure aggregation) before the election.
"""

from __future__ import annotations

import torch

POS_MASS, NEG_MASS, POS_WEIGHT, NEG_WEIGHT = range(4)


def new_sums(width: int, device: torch.device | None = None) -> torch.Tensor:
    """Zeroed ``[4, width]`` accumulator (rows: pos_mass, neg_mass, pos_weight, neg_weight)."""
    return torch.zeros(4, width, dtype=torch.float32, device=device)


def add_sums(sums: torch.Tensor, values: torch.Tensor, p: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Add the statistics of ``values`` ([R, C]; row r has weight ``p[0, r]``) to ``sums`` ([4, C]).

    ``scratch`` is an ``[R, C]`` float32 buffer; ``values`` is left unchanged.
    """
    torch.clamp(values, min=0, out=scratch)
    sums[POS_MASS : POS_MASS + 1].addmm_(p, scratch)
    torch.clamp(values, max=0, out=scratch)
    sums[NEG_MASS : NEG_MASS + 1].addmm_(p, scratch)
    torch.gt(values, 0, out=scratch)
    sums[POS_WEIGHT : POS_WEIGHT + 1].addmm_(p, scratch)
    torch.lt(values, 0, out=scratch)
    sums[NEG_WEIGHT : NEG_WEIGHT + 1].addmm_(p, scratch)
    return sums


def disjoint_mean(sums: torch.Tensor, out: torch.Tensor, scale: float = 1.0, election: str = "mass") -> torch.Tensor:
    """Write ``scale *`` (elected-sign disjoint mean) of the accumulated ``sums`` into ``out``.

    ``sums`` is consumed (overwritten). Branch-free: ``out = mean+ [total > 0] + mean- [total < 0]``,
    ``total`` the signed mass or the signed count (``election``).
    """
    pos_mass, neg_mass, pos_weight, neg_weight = sums.unbind(0)
    if election == "count":
        total = torch.sub(pos_weight, neg_weight, out=out)
    else:
        total = torch.add(pos_mass, neg_mass, out=out)
    tiny = torch.finfo(torch.float32).tiny  # a zero weight comes with a zero mass: 0 / tiny = 0
    pos_mass.div_(pos_weight.clamp_(min=tiny))
    neg_mass.div_(neg_weight.clamp_(min=tiny))
    is_pos = torch.gt(total, 0, out=pos_weight)
    is_neg = torch.lt(total, 0, out=neg_weight)
    torch.mul(pos_mass, is_pos, out=out).addcmul_(neg_mass, is_neg)
    if scale != 1.0:
        out.mul_(scale)
    return out
