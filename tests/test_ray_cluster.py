"""Flower's simulation engine on an existing Ray cluster, as docs/simulation.md describes it.

A real single-node cluster is started with `ray start --head` (`fedllm.launch.ray_head`); the run
is pointed at it with RAY_ADDRESS, and every client process the run reports must be a worker of
that cluster.
"""

from __future__ import annotations

import json

from fedllm.launch import ray_head, run_simulation, stop_tree, superlink_pids
from tests.conftest import PROJECT, client_processes_are_workers_of


def stop_local_superlink() -> None:
    for pid in superlink_pids():
        stop_tree(pid)


def test_a_simulation_runs_on_an_existing_ray_cluster(flower_env, tmp_path, monkeypatch):
    with ray_head(cpus=2) as head:
        monkeypatch.setenv("RAY_ADDRESS", head.address)
        stop_local_superlink()  # the simulation runs in the SuperLink's process tree: it must see RAY_ADDRESS
        try:
            out = run_simulation(PROJECT, "model='builtin:micro' num-server-rounds=1 local-steps=2 train-per-task=8 "
                                 "test-per-task=2", 2, tmp_path / "run")
            assert client_processes_are_workers_of(out, head)
            assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["clients"] == 2
        finally:
            stop_local_superlink()  # later runs must not reach this cluster through it
