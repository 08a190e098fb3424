"""The built-in task suite: short instruction tasks with exact answers, generated from a seed.

Two disjoint families share one prompt format:
- WARMUP_TASKS teach the base model the format (read an instruction and an input, answer, stop)
  and to copy letters; fedllm pre-trains the embedded model on them.
- SUITE_TASKS rearrange the input's letters in ways the base model has never seen; federated
  fine-tuning must teach them. Every suite answer differs from the input, so copying scores 0.

A third, STRUCTURED_TASKS (`dataset = 'builtin:structured'`), is for real pretrained models: records
to read and rewrite in an exact format, which a chat model answers in words of its own unless
fine-tuned, and a free-form description whose wording varies (scored fairly only by ROUGE-L).
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


def _date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}"


def _sorted_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


NAMES = ("ann", "bo", "chen", "dara", "eli", "fatima", "goran", "hana", "ivo", "jun", "kofi", "lena", "mateo",
         "nia", "omar", "priya", "quinn", "rosa", "sven", "tariq", "uma", "vera", "wen", "yusuf", "zoe")
SURNAMES = ("lee", "okafor", "novak", "silva", "tanaka", "moreau", "haddad", "kowal", "berg", "ruiz", "singh", "ito")
PLACES = ("oslo", "lima", "accra", "hanoi", "quito", "porto", "turku", "cusco", "dakar", "kyoto", "perth", "split")
ITEMS = ("lamp", "chair", "kettle", "backpack", "clock", "mug", "scarf", "desk", "bicycle", "blanket")
COLORS = ("red", "blue", "green", "black", "white", "yellow", "grey", "brown")


def _domain(rng: random.Random) -> tuple[str, str]:
    domain = f"{rng.choice(PLACES)}{rng.choice(('-labs', 'mail', '-health', 'works'))}.{rng.choice(('org', 'com', 'net'))}"
    return f"{rng.choice(NAMES)}.{rng.choice(SURNAMES)}@{domain}", domain


def _field(rng: random.Random) -> tuple[str, str]:
    name, city = rng.choice(NAMES).title(), rng.choice(PLACES).title()
    return f'{{"name": "{name}", "city": "{city}", "age": {rng.randint(18, 90)}}}', city


def _initials(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(NAMES).title(), rng.choice(SURNAMES).title()
    return f"{first} {last}", f"{first[0]}.{last[0]}."


def _description(rng: random.Random) -> tuple[str, str]:
    item, color, price = rng.choice(ITEMS), rng.choice(COLORS), rng.randint(5, 250)
    sentence = rng.choice(("A {c} {i} that costs {p} dollars.", "This {c} {i} sells for {p} dollars.",
                           "The {i} is {c} and costs {p} dollars."))
    return f"item={item}; color={color}; price={price}", sentence.format(i=item, c=color, p=price)


STRUCTURED_TASKS: tuple[Task, ...] = (
    Task("date", "Rewrite the date as DD/MM/YYYY. Answer with the date only.", _date),
    Task("sort", "Sort the numbers from smallest to largest, separated by commas. Answer with the numbers only.",
         _sorted_numbers),
    Task("domain", "Give the domain of the email address. Answer with the domain only.", _domain),
    Task("field", "Give the value of the field city in the record. Answer with the value only.", _field),
    Task("initials", "Give the initials of the name, each followed by a dot. Answer with the initials only.", _initials),
    Task("describe", "Describe the product in one sentence.", _description),
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


def builtin_suite(train_per_task: int, test_per_task: int, seed: int,
                  tasks: tuple[Task, ...] = SUITE_TASKS) -> tuple[list[Example], list[Example]]:
    """Disjoint train and test splits of a generated suite (no test input appears in training)."""
    pool = generate(tasks, train_per_task + test_per_task, seed)
    train: list[Example] = []
    test: list[Example] = []
    for task in tasks:
        rows = [e for e in pool if e.task == task.name]
        test.extend(rows[:test_per_task])
        train.extend(rows[test_per_task:])
    return train, test
