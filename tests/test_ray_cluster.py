"""Flower's simulation engine on an existing Ray cluster, as docs/simulation.md describes it.

A real single-node cluster is started with `ray start --head` (`fedllm.launch.ray_head`); the run
is pointed at it with RAY_ADDRESS, and every client process the run reports must be a worker of
that cluster.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fedllm import launch
from fedllm.launch import RunFailed, ray_head, run_simulation, shared_ray_cluster, stop_tree, superlink_pids
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


def ray_folders() -> set[Path]:
    return set(Path("/tmp").glob("fedllm-ray-*"))


def test_a_ray_head_that_cannot_start_says_why_and_leaves_no_folder_behind(tmp_path, monkeypatch):
    ray = tmp_path / "ray"
    ray.write_text("#!/bin/sh\necho 'port 6379 is taken' >&2\nexit 3\n")
    ray.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    before = ray_folders()
    with pytest.raises(RunFailed, match=r"exited with code 3(.|\n)*port 6379 is taken"):
        with ray_head():
            pass
    assert ray_folders() == before


def test_a_missing_ray_command_is_named_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RunFailed, match="no `ray` command next to .*pip install -e .*RAY_ADDRESS"):
        with ray_head():
            pass


def test_no_shared_head_starts_beside_a_running_local_superlink_whose_runs_could_not_join_it(monkeypatch, capsys):
    def no_head(cpus=None):
        raise AssertionError("a Ray head was started")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch, "superlink_pids", lambda: {os.getpid()})
    monkeypatch.setattr(launch, "ray_head", no_head)
    with shared_ray_cluster() as head:
        assert head is None and "RAY_ADDRESS" not in os.environ
    assert "already running" in capsys.readouterr().err
