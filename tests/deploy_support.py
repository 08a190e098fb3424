"""Real Flower processes for deployment tests: start, track, wait for and stop them by PID.

Shared by tests/test_deploy.py (TLS + SuperNode authentication, refused nodes) and
tests/test_node_loss.py (a lost SuperNode and a lost SuperLink). Every process started through `Processes` is
remembered with every descendant ever seen, and stopped by PID, never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from fedllm.launch import stop_processes
import pytest

from tests.conftest import PROJECT

BIN = Path(sys.executable).parent
OFFLINE = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def command(name: str) -> str:
    """An executable of this environment (else on PATH); skip when Flower's CLIs are absent."""
    found = BIN / name
    if found.exists():
        return str(found)
    other = shutil.which(name)
    if other is None:
        pytest.skip(f"`{name}` is not installed in this environment (pip install -e . installs flwr's CLIs)")
    return other


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(flwr_home: Path) -> dict[str, str]:
    """Offline Flower settings, this environment's bin first (the SuperLink starts
    `flower-superexec` by name), and a Flower home of the process's own."""
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


class Processes:
    """Processes started by this module, with every descendant ever seen, stopped by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.popen: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.logs)
        self.popen[name] = proc
        self.track()
        return proc

    def track(self) -> None:
        """Remember the children of every process we started (they may outlive their parent)."""
        for proc in self.popen.values():
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def kill_tree(self, name: str) -> list[int]:
        """SIGKILL the process started as `name` and all its descendants now; their PIDs."""
        self.track()
        try:
            root = psutil.Process(self.popen[name].pid)
            victims = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            return []
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
        self.popen[name].wait(timeout=10)
        return [p.pid for p in victims]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        """Terminate everything (the psutil handles refuse a PID that was reused), then kill."""
        self.track()
        stop_processes([p for p in self.seen.values() if p.is_running()], grace=10)
        for proc in self.popen.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def wait_until_healthy(superlink: subprocess.Popen, procs: Processes, url: str, context=None) -> None:
    """Poll the SuperLink's /health (https with `context`) until it answers; fail if it exits."""

    def healthy() -> bool:
        if superlink.poll() is not None:
            pytest.fail(f"flower-superlink exited with {superlink.returncode}:\n{procs.log('superlink')[-3000:]}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    wait_for(f"the SuperLink's {url}", healthy, 60, procs)


def wait_for(what: str, check, timeout: float, procs: Processes, interval: float = 0.5):
    """Poll `check()` until it returns a truthy value; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.track()
        result = check()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([command("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=PROJECT)


def flwr_json(env: dict[str, str], *args: str) -> dict:
    done = flwr(env, *args, "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


class Link:
    """A running SuperLink (TLS with node authentication), and the CLI connection to it."""

    def __init__(self, root: Path, procs: Processes) -> None:
        self.root = root
        self.procs = procs
        self.certs = root / "certs"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli_env = environment(root / "cli-home")

    def supernode(self, name: str, *args: str, node_config: str, max_retries: int | None = None) -> subprocess.Popen:
        """Start `flower-supernode` against this link, as an institution would (own Flower home)."""
        argv = [command("flower-supernode"), "--superlink", self.address, "--port", str(free_port()), *args,
                "--node-config", node_config]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        return self.procs.start(name, argv, environment(self.root / f"{name}-home"))


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]



def start_tls_link(root: Path, procs: Processes, connection: str, nodes: int, keys: int, hosts: str) -> Link:
    """A TLS SuperLink with SuperNode authentication, as docs/deploy.md sets one up: `keys` node
    key pairs made by `fedllm certs`, the first `nodes` of them registered, a CLI connection."""
    link = Link(root, procs)
    made = subprocess.run(
        [command("fedllm"), "certs", "--out", str(link.certs), "--hosts", hosts, "--nodes", str(keys)],
        env=link.cli_env, capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    c = link.certs
    start_tls_superlink(link, "superlink")
    (root / "cli-home" / "config.toml").write_text(
        f'[superlink.{connection}]\naddress = "{link.address}"\nroot-certificates = "{c / "ca.crt"}"\n'
    )
    registering = [
        subprocess.Popen([command("flwr"), "supernode", "register", str(c / f"nodes/node{i}.pub"), connection,
                          "--name", f"node{i}"], env=link.cli_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=root)
        for i in range(nodes)
    ]
    for i, proc in enumerate(registering):
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"registering node{i} failed:\n{output}"
    return link


def start_tls_superlink(link: Link, name: str) -> subprocess.Popen:
    """`flower-superlink` with TLS and SuperNode authentication on the link's port, its state in
    `state.db` (a restart with the same database keeps the runs and registered nodes), once healthy."""
    c = link.certs
    superlink = link.procs.start(name, [
        command("flower-superlink"), "--host", "127.0.0.1", "--port", str(link.port),
        "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
        "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
        "--database", str(link.root / "state.db"), "--disable-runtime-dependency-installation",
    ], environment(link.root / "superlink-home"))
    wait_until_healthy(superlink, link.procs, f"https://{link.address}/health",
                       context=ssl.create_default_context(cafile=str(c / "ca.crt")))
    return superlink


def tls_supernode(link: Link, name: str, key: int, node_config: str) -> subprocess.Popen:
    """An authenticated SuperNode that trusts the link's CA, with node key `key`."""
    return link.supernode(name, "--root-certificates", str(link.certs / "ca.crt"),
                          "--auth-supernode-private-key", str(link.certs / f"nodes/node{key}"), node_config=node_config)


def online_nodes(link: Link, connection: str) -> int:
    """How many SuperNodes the SuperLink lists as online."""
    nodes = flwr_json(link.cli_env, "supernode", "ls", connection)["nodes"]
    return sum(n["status"] == "online" for n in nodes)
