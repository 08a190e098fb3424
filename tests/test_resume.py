"""A server killed mid-run resumes to exactly the model an uninterrupted run produces: a seeded
central-DP run with adaptive clipping, so the noise, the clip norm and ε must all carry over (the
noise of a resumed round is that round's, never an earlier one's again)."""

from __future__ import annotations

import json
import threading
import time

import psutil
import torch
from safetensors.torch import load_file

from fedllm.checkpoint import saved_rounds
from fedllm.launch import RunFailed, stop_tree, superlink_pids
from tests.conftest import simulate

SETTINGS = ("model='builtin:micro' num-server-rounds=4 local-steps=12 train-per-task=40 test-per-task=6 "
            "lora-dropout=0.1 seed=2 partition='pathological:2' "
            "dp='central' dp-clip-norm=5 dp-noise-multiplier=0.3 dp-adaptive-clipping=true secret-seed=11")


def server_processes() -> list[psutil.Process]:
    """The simulation processes (ServerApp + Ray driver) under our local SuperLink."""
    found = []
    for pid in superlink_pids():
        for child in psutil.Process(pid).children(recursive=True):
            try:
                command = " ".join(child.cmdline())
            except psutil.NoSuchProcess:  # also a zombie: an earlier run's process not yet reaped
                continue
            if "flwr-simulation" in command:
                found.append(child)
    return found


def completed_rounds(folder) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) - 1 if path.exists() else -1


def test_killed_seeded_dp_server_resumes_bit_identically(flower_env, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    simulate(SETTINGS, clients=3, output_dir=straight)

    outcome: list[BaseException] = []

    def interrupted_run() -> None:
        try:
            simulate(SETTINGS, clients=3, output_dir=crashed)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(error)

    runner = threading.Thread(target=interrupted_run)
    runner.start()
    deadline = time.monotonic() + 300
    while completed_rounds(crashed) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    victims = server_processes()
    assert victims, "the simulation process should be running"
    for process in victims:
        process.kill()
    for pid in superlink_pids():  # at once, not after its timeout for the lost run; the resume gets a fresh one
        stop_tree(pid)
    runner.join(timeout=120)
    assert outcome and isinstance(outcome[0], RunFailed), "a killed run must be reported as failed"
    assert not (crashed / "summary.json").exists()
    killed_after = completed_rounds(crashed)
    assert 1 <= killed_after < 4 and saved_rounds(crashed)[-1] == killed_after

    simulate(SETTINGS + " resume=true", clients=3, output_dir=crashed)
    expected = load_file(straight / "model" / "model.safetensors")
    resumed = load_file(crashed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected), "resumed model differs"

    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["per_task_accuracy"] for r in rows] == [r["per_task_accuracy"] for r in reference]
    for key in ("epsilon", "dp_clip_norm", "dp_noise_multiplier"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in reference], key
    assert len({r["dp_clip_norm"] for r in rows}) > 2, "adaptive clipping moved C every round"
