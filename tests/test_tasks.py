"""The built-in task suite: deterministic, disjoint splits, answers that copying cannot score."""

from __future__ import annotations

from fedllm.data.tasks import SUITE_TASKS, WARMUP_TASKS, builtin_suite, generate


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
