"""The built-in task suite: short instruction tasks with exact answers, generated from a seed.

Two disjoint families share one prompt format:
- WARMUP_TASKS teach the base model the format (read an instruction and an input, answer, stop)
  and to copy letters; fedllm pre-trains the embedded model on them.
- SUITE_TASKS rearrange the input's letters in ways the base model has never seen; federated
  fine-tuning must teach them. Every suite answer differs from the input, so copying scores 0.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from fedllm.data.example import Example

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Task:
    """A named generator of (input, output) pairs under one instruction."""

    name: str
    instruction: str
    make: Callable[[random.Random], tuple[str, str]]

    def example(self, rng: random.Random) -> Example:
        source, target = self.make(rng)
        return Example(self.instruction, source, target, self.name)


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _rearranged(transform: Callable[[str], str]) -> Callable[[random.Random], tuple[str, str]]:
    """A generator of random words whose transformed form differs from the word itself."""

    def make(rng: random.Random) -> tuple[str, str]:
        while True:
            word = _word(rng, 3, 5)
            if (answer := transform(word)) != word:
                return word, answer

    return make


SUITE_TASKS: tuple[Task, ...] = (
    Task("reverse", "reverse", _rearranged(lambda w: w[::-1])),
    Task("swap", "swap ends", _rearranged(lambda w: w[-1] + w[1:-1] + w[0])),
    Task("ends", "ends", _rearranged(lambda w: w[0] + w[-1])),
    Task("twice", "twice", _rearranged(lambda w: w + w)),
    Task("skip", "every other", _rearranged(lambda w: w[::2])),
    Task("rotate", "rotate", _rearranged(lambda w: w[1:] + w[0])),
)

WARMUP_TASKS: tuple[Task, ...] = (
    Task("copy", "copy", lambda r: (w := _word(r, 1, 8), w)),
    Task("first", "first", lambda r: (w := _word(r), w[0])),
    Task("last", "last", lambda r: (w := _word(r), w[-1])),
    Task("drop", "drop", lambda r: (w := _word(r), w[1:])),
    Task("chop", "drop last", lambda r: (w := _word(r), w[:-1])),
    Task("head", "first two", lambda r: (w := _word(r), w[:2])),
    Task("tail", "last two", lambda r: (w := _word(r), w[-2:])),
    Task("number", "number", lambda r: (n := str(r.randint(0, 9999)), n)),
    Task("count", "count", lambda r: (w := _word(r, 1, 9), str(len(w)))),
)


def generate(tasks: tuple[Task, ...], per_task: int, seed: int) -> list[Example]:
    """`per_task` distinct examples of each task, deterministic from `seed`."""
    examples: list[Example] = []
    for index, task in enumerate(tasks):
        rng = random.Random(f"{seed}:{index}:{task.name}")
        seen: set[str] = set()
        for _ in range(per_task * 50):
            if len(seen) == per_task:
                break
            example = task.example(rng)
            if example.input not in seen:
                seen.add(example.input)
                examples.append(example)
        if len(seen) < per_task:
            raise ValueError(f"task {task.name!r} cannot produce {per_task} distinct examples")
    return examples


def builtin_suite(train_per_task: int, test_per_task: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint train and test splits of the suite (no test input appears in training)."""
    pool = generate(SUITE_TASKS, train_per_task + test_per_task, seed)
    train: list[Example] = []
    test: list[Example] = []
    for task in SUITE_TASKS:
        rows = [e for e in pool if e.task == task.name]
        test.extend(rows[:test_per_task])
        train.extend(rows[test_per_task:])
    return train, test
