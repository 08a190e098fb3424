"""Train/test split stratified by task."""

from __future__ import annotations

import math
import random
from collections import defaultdict

from fedllm.data.example import Example

__all__ = ["train_test_split"]


def train_test_split(
    examples: list[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into ``(train, test)``, stratified by ``task``.

    Each task contributes ``round(count * test_fraction)`` examples to the test set, clamped so
    that a task with at least 2 examples has at least one test and one train example (a task
    with a single example goes to train). Which examples are picked is drawn from
    ``random.Random(seed)``; both lists keep the input order. Deterministic from ``seed``.
    """
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0 < test_fraction < 1
    ):
        raise ValueError(f"test_fraction must be a number with 0 < test_fraction < 1, got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not examples:
        raise ValueError("cannot split an empty list of examples")

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_task[example.task].append(i)
    rng = random.Random(seed)
    test_idx: set[int] = set()
    for task in sorted(by_task):  # sorted: the draw does not depend on dict/input task order
        idx = by_task[task]
        if len(idx) < 2:
            continue
        n_test = min(max(math.floor(len(idx) * test_fraction + 0.5), 1), len(idx) - 1)
        test_idx.update(rng.sample(idx, n_test))
    train = [e for i, e in enumerate(examples) if i not in test_idx]
    test = [e for i, e in enumerate(examples) if i in test_idx]
    return train, test
