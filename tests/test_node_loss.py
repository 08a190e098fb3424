"""A deployment that loses a SuperNode and then its SuperLink mid-run: real SuperLink and SuperNode
processes on localhost, over TLS with SuperNode authentication as in a deployment (docs/deploy.md).

- Round 2: a SuperNode is killed. The round goes on with the other and accounts for it; the
  institution restarts the node with another registered key, so it joins under a new id (its
  partition is free again once the lost node is offline).
- Round 3: the SuperLink is killed, restarted on its `--database` (runs and registered keys are
  kept), the SuperNodes reconnect by themselves, and the run resumed from its last checkpoint
  ends with every round, none lost or repeated, the restarted node training.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from fedllm.checkpoint import saved_rounds
from tests.conftest import PROJECT
from tests.deploy_support import (
    command, online_nodes, read_metrics, start_tls_link, start_tls_superlink, tls_supernode, wait_for,
)

CONNECTION = "deploy-node-loss"
RESTART_KEY = 2  # the registered key the restarted node uses (node0 and node1 use keys 0 and 1)
NODES = 2  # each message starts a ClientApp process per node (~13 s of imports): as few as show it
ROUNDS = 3
# Round 2 waits the whole timeout for the killed node. It must not be shorter than the 2 x 30 s in
# which Flower's SuperLink notices a lost heartbeat, or round 3 samples the dead node again.
DEPLOY_CONFIG = ("model='builtin:micro' local-steps=2 batch-size=8 train-per-task=20 test-per-task=4 partition='iid' "
                 f"min-clients=1 round-timeout=60 num-server-rounds={ROUNDS}")


def flwr_run(link, out, name: str, extra: str = "") -> subprocess.Popen:
    with open(link.root / "logs" / f"{name}.log", "wb") as log:
        run = subprocess.Popen(
            [command("flwr"), "run", str(PROJECT), CONNECTION, "--stream",
             "--run-config", f"{DEPLOY_CONFIG} output-dir='{out}' {extra}".strip()],
            env=link.cli_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT,
        )
    link.procs.popen[name] = run
    return run


def test_a_lost_supernode_and_a_lost_superlink_cost_no_round(procs, tmp_path):
    link = start_tls_link(tmp_path, procs, CONNECTION, nodes=NODES + 1, keys=NODES + 1, hosts="localhost,127.0.0.1")
    node_config = [f"partition-id={i} num-partitions={NODES}" for i in range(NODES)]
    for i in range(NODES):
        tls_supernode(link, f"node{i}", i, node_config=node_config[i])
    wait_for("both SuperNodes online", lambda: online_nodes(link, CONNECTION) >= NODES, 90, procs, interval=1)

    out = tmp_path / "out"
    run = flwr_run(link, out, "run")

    def checkpointed(server_round: int):
        def check() -> bool:
            if run.poll() is not None:
                pytest.fail(f"flwr run ended early:\n{procs.log('run')[-4000:]}")
            return server_round in saved_rounds(out)
        return check

    wait_for("round 1 with both nodes", checkpointed(1), 180, procs)
    assert len(read_metrics(out)) == 2, "round 2 already ended: the kill came too late to be seen mid-run"
    assert procs.kill_tree("node1"), "node1 should have been running"
    # Restarted at once: round 2 was sent to the old node1 and waits for it, and the new one
    # registers meanwhile, in time for round 3.
    tls_supernode(link, "node1-restarted", RESTART_KEY, node_config=node_config[1])

    wait_for("round 2 without node1", checkpointed(2), 240, procs)
    before = read_metrics(out)
    assert [r["round"] for r in before] == [0, 1, 2], "round 3 already ended: the SuperLink kill came too late"
    assert procs.kill_tree("superlink"), "the SuperLink should have been running"
    procs.kill_tree("run")  # the CLI streaming the lost run's log
    assert not (out / "summary.json").exists(), "the run cannot have finished without its SuperLink"

    start_tls_superlink(link, "superlink-restarted")
    wait_for("the SuperNodes back", lambda: online_nodes(link, CONNECTION) >= NODES, 120, procs, interval=1)
    resumed = flwr_run(link, out, "resumed", "resume=true")
    try:
        resumed.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed run did not finish within 300 s:\n{procs.log('resumed')[-4000:]}")

    assert (out / "summary.json").exists(), procs.log("resumed")[-4000:]
    final = read_metrics(out)
    assert [r["round"] for r in final] == list(range(ROUNDS + 1))
    assert final[: len(before)] == before, "the rounds before the SuperLink was lost are kept as they were"
    first, dropped, after_restarts = final[1:]
    assert first["clients"] == NODES, final
    assert dropped["clients"] == NODES - 1 and dropped["train_loss"] is not None, dropped
    assert dropped["timed_out"] + dropped["rejected"] == 1, "the lost node is accounted for"
    assert after_restarts["clients"] == NODES and after_restarts["timed_out"] + after_restarts["rejected"] == 0
    # a SuperLink-written error ('Node Unavailable') names the node it stands for, not the SuperLink (id 1)
    reasons = [reason for r in final for reason in r.get("rejected_reasons", [])]
    assert not any(reason.startswith("node 1 ") for reason in reasons), reasons
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
    assert sorted(n["partition_id"] for n in summary["nodes"]) == [0, 1]
