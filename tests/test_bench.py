"""The simulation benchmark's arithmetic: a round's wall time split into training, server math
and the rest (framework overhead), from metrics.jsonl rows."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import PROJECT

sys.path.insert(0, str(PROJECT / "simulations"))
from bench_simulation import round_splits  # noqa: E402


def test_overhead_is_what_training_and_merging_do_not_explain():
    rows = [
        {"time": 100.0},
        {"time": 110.0, "client_train_seconds": {"0": 4.0, "1": 4.0, "2": 6.0, "3": 2.0},
         "aggregate_seconds": 0.5, "refactor_seconds": 0.5, "evaluate_seconds": 1.0},
        {"time": 116.0, "client_train_seconds": {"0": 5.0}, "aggregate_seconds": 0.25, "evaluate_seconds": 0.5},
    ]
    first, second = round_splits(rows, parallel=2)
    assert (first.wall, first.training, first.aggregation, first.evaluation) == (10.0, 8.0, 1.0, 1.0)
    assert first.overhead == pytest.approx(0.1)
    assert second.training == 5.0  # one client trains alone, whatever the parallelism
    assert second.overhead == pytest.approx(1 - 5.25 / 6.0)


def test_the_server_benchmark_sees_a_short_lived_allocation_in_its_peak():
    """A fresh anonymous mapping, so the pages cannot be memory the allocator kept from earlier tests."""
    import mmap
    import time

    from bench_server import MIB, PAGE, PeakResident, resident

    with PeakResident() as peak:
        before = resident()
        block = mmap.mmap(-1, 100 * MIB)
        for offset in range(0, 100 * MIB, PAGE):  # touch every page: 100 MiB resident
            block[offset] = 1
        time.sleep(0.05)
        block.close()
    assert peak.peak - before >= 90 * MIB
