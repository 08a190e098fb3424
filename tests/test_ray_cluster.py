"""Flower's simulation engine on an existing Ray cluster, as docs/simulation.md describes it.

A real single-node cluster is started with `ray start --head`; the run is pointed at it with
RAY_ADDRESS, and every client process the run reports must be a worker of that cluster (Ray
writes one log file per worker process, named with its pid, into the cluster's own folder).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedllm.launch import run_simulation, stop_tree, superlink_pids
from tests.conftest import PROJECT


def stop_local_superlink() -> None:
    for pid in superlink_pids():
        stop_tree(pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_simulation_runs_on_an_existing_ray_cluster(flower_env, tmp_path, monkeypatch):
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         f"--temp-dir={folder}", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not (folder / "ray_current_cluster").exists():
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        stop_local_superlink()  # the simulation runs in the SuperLink's process tree: it must see RAY_ADDRESS
        out = run_simulation(PROJECT, "model='builtin:micro' num-server-rounds=1 local-steps=2 train-per-task=8 "
                             "test-per-task=2", 2, tmp_path / "run")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        pids = {pid for pid, _ in rows[-1]["client_processes"]}
        worker_logs = {path.name for path in folder.glob("session_*/logs/worker-*.out")}
        assert pids and all(any(name.endswith(f"-{pid}.out") for name in worker_logs) for pid in pids), (
            pids, sorted(worker_logs))
        assert rows[-1]["clients"] == 2
    finally:
        stop_local_superlink()  # later runs must not reach the cluster through it
        stop_tree(head.pid)
        shutil.rmtree(folder, ignore_errors=True)
