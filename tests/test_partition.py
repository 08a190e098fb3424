"""Partitioning across clients and the stratified train/test split."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from fedllm.data import DatasetError, load_splits
from fedllm.data.example import Example
from fedllm.data.partition import PartitionScheme, describe_partitions, parse_partition, partition_indices
from fedllm.data.split import train_test_split

TASKS = [f"task{t}" for t in range(6) for _ in range(50)]  # 6 tasks x 50 examples
# uneven task sizes, interleaved order
UNEVEN = [t for i in range(80) for t, size in (("a", 80), ("b", 40), ("c", 12), ("d", 5)) if i < size]


def check_valid(parts, n):
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)), "partitions must be disjoint and cover every index"
    assert all(parts), "no partition may be empty"
    assert all(part == sorted(part) for part in parts)


# ---------------------------------------------------------------------------- parsing


def test_parse_valid():
    assert parse_partition("iid") == PartitionScheme("iid")
    assert parse_partition(" Dirichlet:0.5 ") == PartitionScheme("dirichlet", alpha=0.5)
    assert parse_partition("dirichlet:1e-2").alpha == 0.01
    assert parse_partition("pathological:2") == PartitionScheme("pathological", k=2)
    assert str(parse_partition("dirichlet:0.5")) == "dirichlet:0.5"
    assert str(parse_partition("pathological:3")) == "pathological:3"


@pytest.mark.parametrize(
    "bad",
    ["", "iid:2", "dirichlet", "dirichlet:", "dirichlet:x", "dirichlet:0", "dirichlet:-1",
     "dirichlet:nan", "dirichlet:inf", "pathological:0", "pathological:1.5", "pathological:-2",
     "pathological:k", "shards:2", "random"],
)
def test_parse_bad_names_accepted_forms(bad):
    with pytest.raises(ValueError) as info:
        parse_partition(bad)
    message = str(info.value)
    assert f"partition {bad!r}" in message
    for form in ("'iid'", "'dirichlet:<alpha>' with alpha > 0", "'pathological:<k>' with k >= 1"):
        assert form in message


@pytest.mark.parametrize(
    "fields",
    [("dirichlet", None, None), ("dirichlet", 0.0, None), ("pathological", None, 0), ("iid", 1.0, None), ("shards", None, 2)],
)
def test_scheme_object_validated(fields):
    with pytest.raises(ValueError, match="expected 'iid'"):
        PartitionScheme(*fields)


def test_scheme_str_round_trips():
    for text in ("iid", "dirichlet:0.5", "dirichlet:1e-06", "dirichlet:0.123456789", "pathological:4"):
        scheme = parse_partition(text)
        assert parse_partition(str(scheme)) == scheme


def test_partition_indices_rejects_bad_scheme_string():
    with pytest.raises(ValueError, match="expected 'iid'"):
        partition_indices(TASKS, 3, "dirichlet:x", seed=0)


# ---------------------------------------------------------------------------- guarantees

SCHEMES = ["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100", "pathological:1",
           "pathological:2", "pathological:3", "pathological:10"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_cover_nonempty(scheme):
    for tasks in (TASKS, UNEVEN):
        num_tasks = len(set(tasks))
        for num_partitions in (2, 3, 5, 6, 10, 20):
            for seed in (0, 1, 2):
                kind = parse_partition(scheme)
                if kind.kind == "pathological" and kind.k < num_tasks and num_partitions * kind.k < num_tasks:
                    with pytest.raises(ValueError, match="can hold"):
                        partition_indices(tasks, num_partitions, scheme, seed)
                    continue
                parts = partition_indices(tasks, num_partitions, scheme, seed)
                assert len(parts) == num_partitions
                check_valid(parts, len(tasks))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_from_seed(scheme):
    assert partition_indices(TASKS, 7, scheme, seed=3) == partition_indices(TASKS, 7, scheme, seed=3)
    accepts_scheme_object = partition_indices(TASKS, 7, parse_partition(scheme), seed=3)
    assert accepts_scheme_object == partition_indices(TASKS, 7, scheme, seed=3)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "dirichlet:100", "pathological:2"])
def test_different_seed_different_result(scheme):
    assert partition_indices(TASKS, 7, scheme, seed=3) != partition_indices(TASKS, 7, scheme, seed=4)


def test_more_partitions_than_examples():
    with pytest.raises(ValueError, match="cannot split 3 examples into 4 non-empty partitions"):
        partition_indices(["a", "b", "a"], 4, "iid", seed=0)
    for scheme in ("iid", "dirichlet:0.01", "pathological:1"):
        check_valid(partition_indices(["a", "b", "a"], 3, scheme, seed=0), 3)


def test_bad_num_partitions():
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(TASKS, 0, "iid", seed=0)


@pytest.mark.parametrize("tasks", [TASKS, UNEVEN])
@pytest.mark.parametrize("num_partitions", [2, 3, 7, 20])
def test_iid_sizes_and_mix(tasks, num_partitions):
    parts = partition_indices(tasks, num_partitions, "iid", seed=5)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = describe_partitions(tasks, parts)
    for task, total in Counter(tasks).items():
        per_part = [c.get(task, 0) for c in counts]
        assert sum(per_part) == total
        assert max(per_part) - min(per_part) <= 1  # each holds floor/ceil of its share


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("num_partitions", [2, 4, 6, 13])
def test_pathological_at_most_k_tasks_and_coverage(k, num_partitions):
    if num_partitions * k < 6:
        with pytest.raises(ValueError, match=f"use k >= {math.ceil(6 / num_partitions)}"):
            partition_indices(TASKS, num_partitions, f"pathological:{k}", seed=0)
        return
    for seed in range(3):
        parts = partition_indices(TASKS, num_partitions, f"pathological:{k}", seed=seed)
        check_valid(parts, len(TASKS))
        counts = describe_partitions(TASKS, parts)
        assert all(len(c) <= k for c in counts)
        assert set().union(*counts) == set(TASKS)  # every task held by some partition
        for task in set(TASKS):  # a task is split evenly among the partitions holding it
            shares = [c[task] for c in counts if task in c]
            assert max(shares) - min(shares) <= 1


def test_pathological_k_at_least_num_tasks_is_iid():
    for k in (6, 9):
        assert partition_indices(TASKS, 4, f"pathological:{k}", seed=2) == partition_indices(TASKS, 4, "iid", seed=2)


def test_pathological_small_tasks_get_few_holders():
    # flwr's PathologicalPartitioner raises here (a 2-example task drawn by too many partitions)
    tasks = ["a"] * 100 + ["d"] * 2
    parts = partition_indices(tasks, 40, "pathological:1", seed=0)
    check_valid(parts, len(tasks))
    counts = describe_partitions(tasks, parts)
    assert all(len(c) == 1 for c in counts)
    assert sum("d" in c for c in counts) == 1


def test_pathological_balances_sizes():
    parts = partition_indices(UNEVEN, 10, "pathological:2", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 3 * min(sizes)  # holders apportioned to task sizes


def mean_entropy(tasks, parts):
    total = 0.0
    for counts in describe_partitions(tasks, parts):
        n = sum(counts.values())
        total -= sum(c / n * math.log(c / n) for c in counts.values())
    return total / len(parts)


def test_dirichlet_small_alpha_is_more_skewed():
    skewed = [mean_entropy(TASKS, partition_indices(TASKS, 10, "dirichlet:0.1", s)) for s in range(5)]
    flat = [mean_entropy(TASKS, partition_indices(TASKS, 10, "dirichlet:100", s)) for s in range(5)]
    assert sum(flat) / 5 > math.log(6) * 0.9  # close to the uniform mix
    assert sum(skewed) / 5 < sum(flat) / 5 - 0.5


def test_describe_partitions():
    tasks = ["x", "y", "x", "z"]
    assert describe_partitions(tasks, [[0, 2], [1, 3]]) == [{"x": 2}, {"y": 1, "z": 1}]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.1", "pathological:2"])
def test_10k_examples_split_into_100_valid_partitions_reproducibly(scheme):
    tasks = [f"t{i % 17}" for i in range(10_000)]
    parts = partition_indices(tasks, 100, scheme, seed=1)
    check_valid(parts, len(tasks))
    assert parts == partition_indices(tasks, 100, scheme, seed=1)
    assert parts != partition_indices(tasks, 100, scheme, seed=2)


# ---------------------------------------------------------------------------- train/test split


def make_examples():
    sizes = {"a": 40, "b": 10, "c": 2, "d": 1}
    return [Example(f"{t}{i}", "", str(i), t) for t, n in sizes.items() for i in range(n)]


def test_split_stratified_disjoint_covering():
    examples = make_examples()
    train, test = train_test_split(examples, 0.25, seed=0)
    assert sorted(train + test, key=examples.index) == examples
    assert not set(train) & set(test)
    per_task = Counter(e.task for e in test)
    assert per_task == {"a": 10, "b": 3, "c": 1}  # round(10*0.25)=2.5 -> 3; c clamped to 1; d has 1
    assert train == [e for e in examples if e not in set(test)]  # input order kept


def test_split_every_task_with_two_examples_gets_a_test_example():
    examples = make_examples()
    _, test = train_test_split(examples, 0.01, seed=1)
    assert Counter(e.task for e in test) == {"a": 1, "b": 1, "c": 1}
    train, _ = train_test_split(examples, 0.99, seed=1)
    assert Counter(e.task for e in train) == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_split_deterministic():
    examples = make_examples()
    assert train_test_split(examples, 0.3, seed=7) == train_test_split(examples, 0.3, seed=7)
    assert train_test_split(examples, 0.3, seed=7) != train_test_split(examples, 0.3, seed=8)


def write_jsonl(path, tasks):
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a", "task": task}) + "\n"
                            for i, task in enumerate(tasks)))
    return str(path)


def test_load_splits_refuses_a_file_whose_every_task_has_one_example(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [f"task{i}" for i in range(10_000)])
    with pytest.raises(DatasetError) as info:
        load_splits(path, seed=0, train_per_task=1, test_per_task=1, test_fraction=0.2)
    assert str(info.value).startswith(f"{path}: no test examples: every one of its 10000 tasks has a single example")
    assert "group examples under fewer task names" in str(info.value)


def test_load_splits_refuses_a_file_of_one_example(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ["only"])
    with pytest.raises(DatasetError, match="no test examples: its only task has a single example"):
        load_splits(path, seed=0, train_per_task=1, test_per_task=1, test_fraction=0.2)


def test_load_splits_accepts_a_file_with_one_task_of_two_examples(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ["t", "t"] + [f"solo{i}" for i in range(5)])
    train, test = load_splits(path, seed=0, train_per_task=1, test_per_task=1, test_fraction=0.2)
    assert [e.task for e in test] == ["t"] and len(train) == 6


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "0.2", float("nan")])
def test_split_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(make_examples(), fraction, seed=0)
