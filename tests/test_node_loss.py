"""A SuperNode dies mid-run and comes back: real SuperLink and SuperNode processes on localhost.

The round it misses goes on with the others and accounts for it; the restarted node registers
under a new id and trains in the next round. Insecure for localhost only (docs/deploy.md).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PROJECT
from tests.deploy_support import Processes, command, online_nodes, read_metrics, start_insecure_link, wait_for

CONNECTION = "deploy-faults"
NODES = 2  # each message starts a ClientApp process per node (~13 s of imports): as few as show it
ROUNDS = 3  # 1: every node; 2: one killed (and restarting); 3: the restarted node back
# Round 2 waits the whole timeout for the killed node. It must not be shorter than the 2 x 30 s in
# which Flower's SuperLink notices a lost heartbeat, or round 3 samples the dead node again.
DEPLOY_CONFIG = ("model='builtin:micro' local-steps=2 batch-size=8 train-per-task=20 test-per-task=4 partition='iid' "
                 f"min-clients=1 round-timeout=60 num-server-rounds={ROUNDS}")


@pytest.fixture
def procs(tmp_path):
    (tmp_path / "logs").mkdir()
    processes = Processes(tmp_path / "logs")
    try:
        yield processes
    finally:
        processes.stop_all()


def test_a_killed_supernode_is_dropped_and_rejoins_when_restarted(procs, tmp_path):
    link = start_insecure_link(tmp_path, procs, CONNECTION)
    node_config = [f"partition-id={i} num-partitions={NODES}" for i in range(NODES)]
    for i in range(NODES):
        link.supernode(f"node{i}", "--insecure", node_config=node_config[i])
    wait_for("both SuperNodes online", lambda: online_nodes(link, CONNECTION) >= NODES, 90, procs, interval=1)

    out = tmp_path / "out"
    with open(tmp_path / "logs" / "run.log", "wb") as log:
        run = subprocess.Popen(
            [command("flwr"), "run", str(PROJECT), CONNECTION, "--stream",
             "--run-config", f"{DEPLOY_CONFIG} output-dir='{out}'"],
            env=link.cli_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT,
        )
    procs.popen["flwr-run"] = run

    def rows() -> list[dict]:
        return read_metrics(out) if (out / "metrics.jsonl").exists() else []

    def rows_where(condition):
        def check():
            if run.poll() is not None and not any(condition(r) for r in rows()):
                pytest.fail(f"flwr run ended early:\n{procs.log('run')[-4000:]}")
            return [r for r in rows() if condition(r)]
        return check

    wait_for("round 1 with both nodes", rows_where(lambda r: r["round"] >= 1), 180, procs)
    killed_after = rows()[-1]["round"]
    assert killed_after == 1, "round 2 already ended: the kill came too late to be seen mid-run"
    assert procs.kill_tree("node1"), "node1 should have been running"
    # Restarted at once: round 2 was sent to the old node1 and waits for it, and the new one
    # registers meanwhile, in time for round 3.
    link.supernode("node1-restarted", "--insecure", node_config=node_config[1])
    try:
        run.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within 300 s:\n{procs.log('run')[-4000:]}")

    assert (out / "summary.json").exists(), procs.log("run")[-4000:]
    final = read_metrics(out)
    assert [r["round"] for r in final] == list(range(ROUNDS + 1))
    first, dropped, rejoined = final[1:]
    assert first["clients"] == NODES, final
    assert dropped["clients"] == NODES - 1 and dropped["train_loss"] is not None, dropped
    assert dropped["timed_out"] + dropped["rejected"] == 1, "the lost node is accounted for"
    assert rejoined["clients"] == NODES and rejoined["timed_out"] + rejoined["rejected"] == 0, rejoined
    # a SuperLink-written error ('Node Unavailable') names the node it stands for, not the SuperLink (id 1)
    reasons = [reason for r in final for reason in r.get("rejected_reasons", [])]
    assert not any(reason.startswith("node 1 ") for reason in reasons), reasons
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
