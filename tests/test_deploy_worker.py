"""One model load per node per run: a deployment on localhost with the real SmolLM2-135M-Instruct,
a TLS SuperLink and two authenticated SuperNodes, one with a resident `fedllm node` worker and one
without, through a round of training and the evaluations before and after it on the nodes.

Flower 1.42 starts a fresh ClientApp process for every message. The node without a worker pays
that (imports, model load) on each of its messages; the node with one loads the model once. Both
report where a training message's time went besides training, printed at the end (docs/deploy.md
quotes the figures of a run with ROUNDS = 2).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.deploy_support import command, environment, online_nodes, read_metrics, start_tls_link
from tests.deploy_support import tls_supernode, wait_for

CONNECTION = "deploy-worker"
ROUNDS = 1  # each round costs two messages per node, each a fresh process of ~20-40 s here
RUN_CONFIG = ("model='smollm2-135m-instruct' local-steps=2 batch-size=4 train-per-task=6 test-per-task=2 "
              f"partition='iid' evaluation='clients' min-clients=2 round-timeout=600 num-server-rounds={ROUNDS}")
BUILT = "built base model smollm2-135m-instruct"  # what a process logs when it loads the model


@pytest.fixture
def worker_dir():
    with tempfile.TemporaryDirectory(prefix="fw", dir="/tmp") as folder:  # short: a Unix socket's path is limited
        yield Path(folder) / "node0"


def test_a_node_with_a_resident_worker_loads_its_model_once_per_run(procs, tmp_path, worker_dir, smollm2_path):
    link = start_tls_link(tmp_path, procs, CONNECTION, nodes=2, keys=2, hosts="localhost,127.0.0.1")
    worker = procs.start("worker0", [command("fedllm"), "node", "--dir", str(worker_dir)],
                         environment(tmp_path / "worker0-home"))
    wait_for("the worker's socket", lambda: (worker_dir / "worker.sock").exists() and (worker_dir / "secret").exists(),
             60, procs)
    tls_supernode(link, "node0", 0, node_config=f"partition-id=0 num-partitions=2 node-worker='{worker_dir}'")
    tls_supernode(link, "node1", 1, node_config="partition-id=1 num-partitions=2")
    wait_for("both SuperNodes online", lambda: online_nodes(link, CONNECTION) >= 2, 90, procs, interval=1)

    out = tmp_path / "out"
    run = subprocess.run(
        [command("flwr"), "run", str(PROJECT), CONNECTION, "--stream", "--run-config", f"{RUN_CONFIG} output-dir='{out}'"],
        env=link.cli_env, capture_output=True, text=True, cwd=PROJECT, timeout=900,
    )
    assert (out / "summary.json").exists(), f"the run failed:\n{run.stdout[-4000:]}\n{procs.log('worker0')[-3000:]}"
    rows = read_metrics(out)[1:]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)) and all(r["clients"] == 2 and r["rejected"] == 0 for r in rows), rows
    assert all(sorted(r["client_examples"]) == ["0", "1"] for r in rows), "both nodes scored every round"

    # node 0: every message (query, the round-0 evaluation, each round's training and evaluation)
    # went to one process, which loaded SmolLM2 once and trained in it
    assert procs.log("worker0").count(BUILT) == 1, procs.log("worker0")[-3000:]
    assert worker.poll() is None, "the worker serves on after the run"
    processes = [{pid: builds for pid, builds in r["client_processes"]} for r in rows]
    assert all(p.get(worker.pid) == 1 for p in processes), processes
    # node 1: each of those messages but the query ran in a fresh process that loaded SmolLM2 again
    assert procs.log("node1").count(BUILT) == 1 + 2 * ROUNDS, procs.log("node1")[-3000:]
    fresh = [pid for p in processes for pid in p if pid != worker.pid]
    assert len(set(fresh)) == ROUNDS and all(p[pid] == 1 for p in processes for pid in p), processes

    seconds = {what: {part: [round(r[f"client_{what}_seconds"][part], 2) for r in rows] for part in ("0", "1")}
               for what in ("startup", "overhead", "train")}
    print("\nseconds of a training message, SmolLM2-135M-Instruct, rounds 1 and 2 (node 0 with a worker, node 1 "
          "without):", json.dumps(seconds))
