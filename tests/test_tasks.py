"""The built-in task suite: deterministic, disjoint splits, answers that copying cannot score."""

from __future__ import annotations

import re

from fedllm.data import load_splits
from fedllm.data.tasks import STRUCTURED_TASKS, SUITE_TASKS, WARMUP_TASKS, builtin_suite, generate


def test_generation_is_deterministic_from_the_seed():
    assert generate(SUITE_TASKS, 20, seed=3) == generate(SUITE_TASKS, 20, seed=3)
    assert generate(SUITE_TASKS, 20, seed=3) != generate(SUITE_TASKS, 20, seed=4)


def test_suite_has_six_tasks_disjoint_from_warmup():
    assert len(SUITE_TASKS) >= 6
    assert not {t.name for t in SUITE_TASKS} & {t.name for t in WARMUP_TASKS}
    assert not {t.instruction for t in SUITE_TASKS} & {t.instruction for t in WARMUP_TASKS}


def test_train_and_test_splits_are_disjoint_per_task():
    train, test = builtin_suite(train_per_task=50, test_per_task=10, seed=0)
    for task in SUITE_TASKS:
        train_inputs = {e.input for e in train if e.task == task.name}
        test_inputs = {e.input for e in test if e.task == task.name}
        assert len(train_inputs) == 50 and len(test_inputs) == 10
        assert not train_inputs & test_inputs


def test_suite_answers_are_exact_and_never_the_input():
    train, _ = builtin_suite(train_per_task=100, test_per_task=10, seed=1)
    checks = {
        "reverse": lambda w: w[::-1], "swap": lambda w: w[-1] + w[1:-1] + w[0], "ends": lambda w: w[0] + w[-1],
        "twice": lambda w: w + w, "skip": lambda w: w[::2], "rotate": lambda w: w[1:] + w[0],
    }
    for example in train:
        assert example.output == checks[example.task](example.input)
        assert example.output != example.input


def test_the_structured_suite_answers_follow_from_their_inputs_and_its_description_varies_in_wording():
    train, test = load_splits("builtin:structured", seed=1, train_per_task=30, test_per_task=5, test_fraction=0.1)
    assert not {e.input for e in test} & {e.input for e in train}
    rules = {
        "date": lambda x: "/".join(reversed(x.split("-"))),
        "sort": lambda x: ", ".join(map(str, sorted(int(n) for n in x.split(", ")))),
        "domain": lambda x: x.split("@")[1],
        "field": lambda x: re.search(r'"city": "(\w+)"', x).group(1),
        "initials": lambda x: "".join(part[0] + "." for part in x.split()),
    }
    for example in train + test:
        if example.task in rules:
            assert example.output == rules[example.task](example.input), example
        else:  # describe: every field of the record in the sentence, worded one of several ways
            fields = dict(part.split("=") for part in example.input.split("; "))
            assert all(value in example.output for value in fields.values()), example
    assert len({e.output.split()[0] for e in train if e.task == "describe"}) > 1
    assert {t.name for t in STRUCTURED_TASKS} == {e.task for e in test}
