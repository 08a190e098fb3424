"""Partitioning examples across federated clients by their task label.

Schemes (strings as they appear in the run config):

- ``"iid"``: every partition gets a random share whose task mix matches the global mix (each
  partition holds floor or ceil of ``count(task) / num_partitions`` of every task) and partition
  sizes differ by at most 1.
- ``"dirichlet:<alpha>"``: for every task, the proportions of its examples going to each
  partition are drawn from ``Dir(alpha, ..., alpha)``; small alpha => each task concentrated on
  few partitions, large alpha => close to iid.
- ``"pathological:<k>"``: every partition holds examples of at most ``k`` distinct tasks; every
  task is held by at least one partition, and a task's examples are split evenly among the
  partitions that hold it. When ``k`` >= the number of distinct tasks, every partition may hold
  every task, so ``k`` is clamped to the number of tasks and the scheme is exactly ``iid``
  (stratified by task).

Every scheme guarantees: the partitions are pairwise disjoint, cover every index exactly once,
none is empty, and the result is a pure function of ``(tasks, num_partitions, scheme, seed)``.
A ``ValueError`` explains when that is impossible: more partitions than examples, or
``pathological:<k>`` with ``num_partitions * k`` < the number of tasks (some task would have no
holder, and its examples would be lost).

flwr-datasets partitioners are used where they fit (``IidPartitioner``, ``DirichletPartitioner``
with empty partitions repaired); ``pathological`` is implemented here because flwr's
``PathologicalPartitioner`` can drop tasks or fail on small tasks. The comments in ``_iid``,
``_dirichlet`` and ``_pathological`` say what the flwr code guarantees and what is added. ``datasets``/``flwr_datasets`` are imported lazily so
that importing this module stays cheap.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PartitionScheme", "describe_partitions", "parse_partition", "partition_indices"]

_ACCEPTED = (
    "expected 'iid', 'dirichlet:<alpha>' with alpha > 0 (e.g. 'dirichlet:0.5') "
    "or 'pathological:<k>' with k >= 1 tasks per client"
)


@dataclass(frozen=True)
class PartitionScheme:
    """A parsed partition scheme: ``kind`` is "iid", "dirichlet" (uses ``alpha``) or
    "pathological" (uses ``k``)."""

    kind: str
    alpha: float | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        valid = (
            (self.kind == "iid" and self.alpha is None and self.k is None)
            or (
                self.kind == "dirichlet"
                and isinstance(self.alpha, (int, float))
                and not isinstance(self.alpha, bool)
                and math.isfinite(self.alpha)
                and self.alpha > 0
                and self.k is None
            )
            or (
                self.kind == "pathological"
                and isinstance(self.k, int)
                and not isinstance(self.k, bool)
                and self.k >= 1
                and self.alpha is None
            )
        )
        if not valid:
            raise ValueError(f"partition {self!r}: {_ACCEPTED}")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{float(self.alpha)!r}"
        if self.kind == "pathological":
            return f"pathological:{self.k}"
        return self.kind


def parse_partition(scheme: str) -> PartitionScheme:
    """Parse ``"iid"``, ``"dirichlet:<alpha>"`` or ``"pathological:<k>"`` (case-insensitive)."""
    if not isinstance(scheme, str):
        raise ValueError(f"partition {scheme!r}: {_ACCEPTED}")
    text = scheme.strip().lower()
    kind, sep, arg = text.partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind == "iid" and not sep:
        return PartitionScheme("iid")
    if kind == "dirichlet" and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return PartitionScheme("dirichlet", alpha=alpha)
    if kind == "pathological" and arg.isdigit() and int(arg) >= 1:
        return PartitionScheme("pathological", k=int(arg))
    raise ValueError(f"partition {scheme!r}: {_ACCEPTED}")


def partition_indices(
    tasks: Sequence[str],
    num_partitions: int,
    scheme: str | PartitionScheme,
    seed: int,
) -> list[list[int]]:
    """Split example indices ``0..len(tasks)-1`` into ``num_partitions`` non-empty, disjoint,
    covering partitions according to ``scheme``; each partition's indices are sorted.

    ``tasks[i]`` is the task label of example ``i``. Deterministic from ``seed`` (any int;
    negative seeds are mapped into numpy's non-negative range).
    """
    if isinstance(scheme, str):
        scheme = parse_partition(scheme)
    elif not isinstance(scheme, PartitionScheme):
        raise ValueError(f"partition {scheme!r}: {_ACCEPTED}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        raise ValueError(f"num_partitions must be an int, got {num_partitions!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    tasks = [str(t) for t in tasks]
    n = len(tasks)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if n < num_partitions:
        raise ValueError(
            f"cannot split {n} examples into {num_partitions} non-empty partitions: "
            f"use at most {n} partitions or more data"
        )
    seed = seed % 2**63  # numpy generators reject negative seeds

    num_tasks = len(set(tasks))
    if scheme.kind == "iid" or (scheme.kind == "pathological" and scheme.k >= num_tasks):
        parts = _iid(tasks, num_partitions, seed)
    elif scheme.kind == "dirichlet":
        parts = _dirichlet(tasks, num_partitions, scheme.alpha, seed)
    elif scheme.kind == "pathological":
        parts = _pathological(tasks, num_partitions, scheme.k, seed)
    else:
        raise ValueError(f"partition {str(scheme)!r}: {_ACCEPTED}")

    parts = [sorted(int(i) for i in p) for p in parts]
    # Cheap O(n) check of the guarantees, so a regression in a partitioner cannot pass silently.
    if sorted(i for p in parts for i in p) != list(range(n)) or not all(parts):
        raise RuntimeError(f"internal error: partition {str(scheme)!r} broke disjoint/cover/non-empty")
    return parts


def describe_partitions(tasks: Sequence[str], parts: Sequence[Sequence[int]]) -> list[dict[str, int]]:
    """Per partition, the number of examples of each task (tasks in sorted order)."""
    out = []
    for part in parts:
        counts = Counter(str(tasks[i]) for i in part)
        out.append({task: counts[task] for task in sorted(counts)})
    return out


# --------------------------------------------------------------------------------------------
# Schemes


def _indices_by_task(tasks: list[str]) -> dict[str, list[int]]:
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        by_task[task].append(i)
    return {task: by_task[task] for task in sorted(by_task)}


def _run(partitioner, tasks: list[str], rows: list[int], num_partitions: int) -> list[list[int]]:
    """Apply a flwr-datasets partitioner to rows ``rows`` (in that order); return original indices."""
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict({"task": [tasks[i] for i in rows], "idx": rows})
    return [partitioner.load_partition(p).to_dict()["idx"] for p in range(num_partitions)]


def _iid(tasks: list[str], num_partitions: int, seed: int) -> list[list[int]]:
    # flwr's IidPartitioner is unseeded: it returns contiguous `Dataset.shard`s of the rows in
    # the order given (shard sizes differ by at most 1). So the randomness and the stratification
    # come from the row order we hand it: examples grouped by task (tasks in a seeded order,
    # examples shuffled within each task) and dealt round-robin, reordered so that contiguous
    # shard p is exactly the p-th deal. Each partition then holds floor or ceil of
    # count(task)/num_partitions of every task.
    from flwr_datasets.partitioner import IidPartitioner

    rng = random.Random(seed)
    groups = list(_indices_by_task(tasks).values())
    rng.shuffle(groups)
    dealt: list[int] = []
    for group in groups:
        group = list(group)
        rng.shuffle(group)
        dealt.extend(group)
    rows = [i for p in range(num_partitions) for i in dealt[p::num_partitions]]
    return _run(IidPartitioner(num_partitions=num_partitions), tasks, rows, num_partitions)


def _dirichlet(tasks: list[str], num_partitions: int, alpha: float, seed: int) -> list[list[int]]:
    # flwr's DirichletPartitioner draws, per task (in sorted label order), proportions from
    # Dir(alpha) with its own numpy generator seeded by `seed`, and splits that task's indices
    # with np.split at floor(cumsum * count): disjoint and covering, deterministic.
    # What it does not guarantee: non-empty partitions. Its `min_partition_size` makes it
    # redraw everything up to 10 times and then raise, which with small alpha and more
    # partitions than tasks (each task lands on ~1-2 partitions) fails nearly always. So we
    # use min_partition_size=0 and repair empty partitions below. self_balancing=False keeps
    # the per-task proportions a plain Dir(alpha) draw (balancing zeroes the share of already
    # large partitions, and can divide by zero when all remaining shares underflow to 0).
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="task",
        alpha=float(alpha),
        min_partition_size=0,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    parts = _run(partitioner, tasks, list(range(len(tasks))), num_partitions)
    return _fill_empty(parts, tasks, random.Random(seed))


def _fill_empty(parts: list[list[int]], tasks: list[str], rng: random.Random) -> list[list[int]]:
    """Give every empty partition one example taken from the currently largest partition
    (its most frequent task, so the donor's task mix barely moves). Needs n >= num_partitions."""
    for p, part in enumerate(parts):
        if part:
            continue
        donor = max(range(len(parts)), key=lambda q: (len(parts[q]), -q))
        counts = Counter(tasks[i] for i in parts[donor])
        task = min(counts, key=lambda t: (-counts[t], t))
        candidates = sorted(i for i in parts[donor] if tasks[i] == task)
        moved = rng.choice(candidates)
        parts[donor].remove(moved)
        part.append(moved)
    return parts


def _pathological(tasks: list[str], num_partitions: int, k: int, seed: int) -> list[list[int]]:
    # Here 1 <= k < number of tasks T. Written here rather than with flwr's
    # PathologicalPartitioner (flwr-datasets 0.6.1), which cannot give the guarantees above:
    #   - "first-deterministic" (partition p's first task is p % T, the other k-1 drawn
    #     uniformly): with fewer partitions than tasks the tasks nobody drew are silently
    #     DROPPED (only a warning); and since the extra tasks ignore task sizes, a small task can
    #     be drawn by more partitions than it has examples, which makes it raise (seen in tests:
    #     a 5-example task drawn by 8 of 10 partitions with k=3);
    #   - "deterministic" (partition p holds tasks p..p+k-1 mod T) ignores the seed and covers
    #     only num_partitions + k - 1 tasks; "random" guarantees no coverage at all.
    # Here: every task gets one holder, the remaining num_partitions*k - T holder slots go to the
    # tasks with the most examples per holder (D'Hondt apportionment, capped at the task's size
    # and at num_partitions), so each holder's share is about n / (num_partitions*k) examples.
    # The tasks, grouped and in a seeded order, are dealt round-robin to the partitions: a
    # task's copies are consecutive and at most num_partitions, so they land on distinct
    # partitions, and each partition gets at most k tasks (at least 1, as there are at least
    # num_partitions slots). Each task's examples (seeded shuffle) are split evenly among its
    # holders, all shares non-empty as holders <= examples.
    groups = _indices_by_task(tasks)
    num_tasks = len(groups)
    if num_partitions * k < num_tasks:
        raise ValueError(
            f"partition 'pathological:{k}': {num_partitions} partitions holding at most {k} "
            f"tasks each can hold {num_partitions * k} of the {num_tasks} tasks; "
            f"use k >= {math.ceil(num_tasks / num_partitions)} or more partitions"
        )
    rng = random.Random(seed)
    order = list(groups)
    rng.shuffle(order)  # also breaks apportionment ties
    rank = {task: r for r, task in enumerate(order)}
    cap = {task: min(len(groups[task]), num_partitions) for task in order}
    holders = dict.fromkeys(order, 1)
    heap = [(-len(groups[t]), rank[t], t) for t in order if cap[t] > 1]  # -(examples per holder)
    heapq.heapify(heap)
    for _ in range(min(num_partitions * k, sum(cap.values())) - num_tasks):
        _, r, task = heapq.heappop(heap)
        holders[task] += 1
        if holders[task] < cap[task]:
            heapq.heappush(heap, (-len(groups[task]) / holders[task], r, task))
    slots = [task for task in order for _ in range(holders[task])]
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    owners: dict[str, list[int]] = {task: [] for task in order}
    for j, task in enumerate(slots):
        owners[task].append(j % num_partitions)
    for task, idx in groups.items():
        idx = list(idx)
        rng.shuffle(idx)
        for j, p in enumerate(owners[task]):  # even split, like np.array_split
            lo, hi = j * len(idx) // len(owners[task]), (j + 1) * len(idx) // len(owners[task])
            parts[p].extend(idx[lo:hi])
    return parts
