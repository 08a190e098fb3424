"""Hostile nodes in real `flwr run` simulations, under the shipped defaults: nodes whose start-up
answer is bad are left out with their reason and the run goes on; a node scaling its upload a
millionfold moves the server model no more than a few honest nodes; a node that answers after its
round closed counts for nothing; a finished run is never overwritten."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedllm.launch import run_simulation
from fedllm.models import resolve_model
from fedllm.robust import AUTO_NORM_RATIO
from tests.conftest import ONE_ACTOR_CPUS, PROJECT, simulate
from tests.deploy_support import read_metrics

# Partitions 0-2 answer the start-up query badly; 3-5 train. iid: the honest updates agree, so the
# distance each round adds is about one honest update. In the attacked run partition 3 scales its
# upload ×1e6 and a seventh node (partition 6) answers every round after it closed (`hang`), which
# needs one CPU per client: two Ray actors, so the hanging one holds up no other client.
QUERY_FAULTS = "0:query-rank,1:query-missing,2:query-examples"
SETTINGS = ("model='builtin:micro' num-server-rounds=2 local-steps=6 batch-size=8 train-per-task=30 test-per-task=4 "
            "partition='iid' seed=4 round-timeout=25")
REFUSALS = [r"lora-rank is int 0, expected an integer in \[1, ", r"its start-up answer has no num-examples",
            r"num-examples is int 1000000000, expected an integer in \[1, 10000000\]"]


@pytest.fixture(scope="module")
def runs(flower_env, tmp_path_factory):
    """The same run without and with partition 3 scaling its upload ×1e6 (and partition 6 late)."""
    clean, attacked = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("attacked")
    simulate(f"{SETTINGS} fault-injection='{QUERY_FAULTS}'", clients=6, output_dir=clean)
    run_simulation(PROJECT, f"{SETTINGS} fault-injection='{QUERY_FAULTS},3:norm,6:hang'", clients=7,
                   output_dir=attacked, cpus_per_client=1)
    return clean, attacked


def distance_from_base(run) -> float:
    """‖W − W0‖ over every weight of the exported server model."""
    base = load_file(f"{resolve_model('builtin:micro')}/model.safetensors")
    final = load_file(run / "model" / "model.safetensors")
    return math.sqrt(sum(float((final[k].double() - base[k].double()).pow(2).sum()) for k in base))


def test_nodes_with_a_bad_start_up_answer_are_left_out_with_their_reason_and_the_run_goes_on(runs):
    clean, _ = runs
    summary = json.loads((clean / "summary.json").read_text())
    assert summary["rounds"] == 2 and [n["partition_id"] for n in summary["nodes"]] == [3, 4, 5]
    reasons = list(summary["refused_nodes"].values())
    assert len(reasons) == 3
    for pattern in REFUSALS:
        assert sum(bool(re.search(pattern, r)) for r in reasons) == 1, (pattern, reasons)
    assert all(row["clients"] == 3 and row["rejected"] == 0 for row in read_metrics(clean)[1:])


def test_a_millionfold_upload_under_the_defaults_moves_the_model_within_three_times_the_honest_distance(runs):
    clean, attacked = runs
    honest, poisoned = distance_from_base(clean), distance_from_base(attacked)
    assert 0 < poisoned <= 3 * honest, (honest, poisoned)
    for row in read_metrics(attacked)[1:]:
        (note,) = row["bounded"]
        assert re.fullmatch(rf"node \d+: update scaled down to {AUTO_NORM_RATIO:g}x the round's median norm", note), row
        assert math.isfinite(row["train_loss"])


def test_a_node_that_answers_after_its_round_closed_counts_for_nothing(runs):
    """Partition 6's reply to round 1 lands during round 2, which neither takes it nor waits for it."""
    _, attacked = runs
    for row in read_metrics(attacked)[1:]:
        assert row["clients"] == 3 and row["timed_out"] == 1 and row["rejected"] == 0, row
        assert sorted(row["client_upload_bytes"]) == ["3", "4", "5"], row


def file_digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerunning_into_a_finished_run_without_resume_fails_and_leaves_every_file_identical(runs):
    clean, _ = runs
    before = file_digests(clean)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("fedllm")), "run", "--out", str(clean), "--clients", "6",
         "--cpus-per-client", str(ONE_ACTOR_CPUS), "--run-config", SETTINGS],
        capture_output=True, text=True, cwd=PROJECT, timeout=300,
    )
    assert done.returncode != 0
    assert "already holds a run" in done.stderr and "Set resume=true" in done.stderr, done.stderr
    assert file_digests(clean) == before

