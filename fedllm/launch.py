"""Launch a simulated federated run through `flwr run`, and tell truthfully whether it worked.

`flwr run` exits 0 even when the run failed and leaves its local SuperLink running, so this
module checks the run's own outputs and stops the SuperLink it started, by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedllm.config import ConfigError, RunConfig
from fedllm.outputs import check_output_folder

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else the SuperLink tries to install deps
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a Ray warning on CPU-only machines
}


class RunFailed(RuntimeError):
    """The federated run did not produce its summary."""


_REUSING_SUPERLINK = False  # inside `reused_superlink()`: runs leave the local SuperLink running


@contextmanager
def reused_superlink() -> Iterator[None]:
    """Let the runs inside share one local SuperLink (each `flwr run` otherwise starts and stops
    its own, about 4 s per run), and stop it at the end if it was started inside."""
    global _REUSING_SUPERLINK
    before, previous = superlink_pids(), _REUSING_SUPERLINK
    _REUSING_SUPERLINK = True
    try:
        yield
    finally:
        _REUSING_SUPERLINK = previous
        if not previous:
            for pid in superlink_pids() - before:
                stop_tree(pid)


@dataclass(frozen=True)
class RayHead:
    """A running single-machine Ray head: where runs join it, and its session folder."""

    address: str
    folder: Path


@contextmanager
def ray_head(cpus: int | None = None) -> Iterator[RayHead]:
    """Start a Ray head in a fresh folder under /tmp (Ray's socket paths must stay short), wait for
    it, and stop it and everything it started at the end."""
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        raise RunFailed(f"no `ray` command next to {sys.executable}: install fedllm into this environment "
                        "(pip install -e .), or set RAY_ADDRESS to a running Ray cluster")
    folder, port = Path(tempfile.mkdtemp(prefix="fedllm-ray-", dir="/tmp")), _free_port()
    command = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--temp-dir={folder}", "--include-dashboard=false", "--disable-usage-stats",
               *([f"--num-cpus={cpus}"] if cpus else [])]
    head = None
    try:
        with open(folder / "head.log", "wb") as log:
            head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_head(head, folder, command)
        yield RayHead(f"127.0.0.1:{port}", folder)
    finally:
        if head is not None:
            stop_tree(head.pid)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_head(head: subprocess.Popen, folder: Path, command: list[str], timeout: float = 90) -> None:
    """Wait until the head has written its cluster address; say why it did not, with its last words."""
    deadline = time.monotonic() + timeout
    while not (folder / "ray_current_cluster").exists():
        if head.poll() is not None or time.monotonic() > deadline:
            why = f"exited with code {head.returncode}" if head.returncode is not None else f"not up after {timeout:g} s"
            tail = (folder / "head.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RunFailed(f"the Ray head {why} ({' '.join(command)}); its last output:\n" + "\n".join(tail))
        time.sleep(0.2)


@contextmanager
def shared_ray_cluster() -> Iterator[RayHead | None]:
    """Let the runs inside join one Ray head (RAY_ADDRESS) instead of each starting and stopping its
    own Ray, about 3 s a run here (simulations/bench_startup.py). Enter it before the local SuperLink starts: the simulation runs in
    the SuperLink's process tree and reads RAY_ADDRESS there. A RAY_ADDRESS already set is kept, and
    a local SuperLink already running would never see the head: in both cases no head starts (None)."""
    if os.environ.get("RAY_ADDRESS"):
        yield None
        return
    if superlink_pids():
        print(f"fedllm: a local SuperLink is already running on port {local_superlink_port()}: its runs each start "
              "their own Ray (stop it first to let them share one)", file=sys.stderr)
        yield None
        return
    with ray_head() as head:
        os.environ["RAY_ADDRESS"] = head.address
        try:
            yield head
        finally:
            os.environ.pop("RAY_ADDRESS", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_superlink_port() -> int:
    """Where `flwr run` starts its managed simulation SuperLink (Flower's variable, else 39091)."""
    return int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))


def superlink_pids() -> set[int]:
    """PIDs of processes listening on the local SuperLink's port."""
    port = local_superlink_port()
    return {
        c.pid for c in psutil.net_connections(kind="inet")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    }


def stop_processes(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """Terminate the processes, wait up to `grace` seconds, then kill what is left."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def stop_tree(pid: int) -> None:
    """Stop a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    stop_processes(procs)


def reap_orphaned_ray(since: float) -> None:
    """Stop Ray helpers that our run started and that lost their parent (a crashed simulation)."""
    for proc in psutil.process_iter(["ppid", "create_time", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["ppid"] == 1 and proc.info["create_time"] >= since and ("ray::" in cmdline or "/ray/" in cmdline):
            stop_tree(proc.pid)


def flwr_executable() -> str:
    """The `flwr` command of this Python environment (else the one on PATH)."""
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise RunFailed("the `flwr` command is not installed; run `pip install -e .` in this environment")
    return found


def bundled_files(app_dir: Path) -> list[Path]:
    """The files of `app_dir` that can go into its FAB, found without entering ignored folders.

    Flower's own build walks every file below the app folder and only then applies .gitignore and
    its exclusions; with the virtual environment inside the project (as the quick start makes it)
    that is some 50,000 files and ~10 s of CPU per `flwr run` here. This walk prunes a folder as
    soon as .gitignore or Flower's exclusions cover it, and keeps the file types Flower bundles.
    """
    from flwr.common.constant import FAB_CONFIG_FILE, FAB_EXCLUDE_PATTERNS, FAB_INCLUDE_PATTERNS
    from pathspec import PathSpec

    gitignore = app_dir / ".gitignore"
    ignored = [".git/", *FAB_EXCLUDE_PATTERNS, *(gitignore.read_text().splitlines() if gitignore.exists() else [])]
    ignore = PathSpec.from_lines("gitwildmatch", [p for p in ignored if p != FAB_CONFIG_FILE])
    include = PathSpec.from_lines("gitwildmatch", [*FAB_INCLUDE_PATTERNS, f"/{FAB_CONFIG_FILE}", "/.gitignore"])

    def ignored_folder(folder: Path) -> bool:  # a pattern for the folder itself, or for all inside it
        return ignore.match_file(f"{folder.as_posix()}/") or ignore.match_file((folder / "x").as_posix())

    def bundled(file: Path) -> bool:
        return (include.match_file(file.as_posix()) and not ignore.match_file(file.as_posix())
                and not (app_dir / file).is_symlink())

    found = []
    for folder, subfolders, names in os.walk(app_dir):
        here = Path(folder).relative_to(app_dir)
        subfolders[:] = [d for d in subfolders if not ignored_folder(here / d)]
        found += [here / n for n in names if bundled(here / n)]
    return sorted(found)


def staged_app(app_dir: Path, into: Path) -> Path:
    """A copy of the app's bundled files in `into/<app folder name>`: the FAB `flwr run` builds
    from it is byte for byte the one it builds from `app_dir` (same files, fixed zip dates)."""
    staged = into / app_dir.name
    for relative in bundled_files(app_dir):
        (staged / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(app_dir / relative, staged / relative)
    return staged


def federation_config(clients: int, cpus_per_client: int) -> str:
    return f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client}"


def resolved_config(app_dir: Path, run_config: str) -> RunConfig:
    """The run's config as the apps will see it: pyproject defaults plus `run_config` overrides."""
    import click
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    try:
        overrides = parse_config_args([run_config])
    except click.ClickException as error:
        raise ConfigError(f"--run-config {run_config!r} cannot be read: {error.message} (a key given twice, e.g. "
                          "output-dir in --run-config beside --out, is refused too)") from None
    RunConfig.check_keys(overrides)  # our message for an unknown key, before Flower's terser one
    return RunConfig.from_flower(get_fused_config_from_dir(app_dir, overrides))


def run_simulation(
    app_dir: Path, run_config: str, clients: int, output_dir: Path, *, cpus_per_client: int = 1,
    keep_superlink: bool = False,
) -> Path:
    """Run `flwr run --stream` on `app_dir` (staged: see `bundled_files`); return the output
    folder or raise `RunFailed`.

    The config is checked and the base model built (a builtin one pre-trained, with progress)
    here first, so a bad setting fails in a second and the apps find the model cached.
    """
    from fedllm.models import resolve_model

    output_dir = output_dir.resolve()
    overrides = f"{run_config} output-dir='{output_dir}'".strip()
    cfg = resolved_config(app_dir, overrides)
    check_output_folder(output_dir, resuming=cfg.resumes(output_dir), overwrite=cfg.overwrite)
    resolve_model(cfg.model)
    summary = output_dir / "summary.json"
    earlier_summary = summary.stat().st_mtime_ns if summary.exists() else None
    env = {**os.environ, **{k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}}
    # flwr starts `flower-superlink` by name: find this environment's even when it is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    already_running = superlink_pids()
    started = time.perf_counter()
    started_at = time.time()
    with tempfile.TemporaryDirectory(prefix="fedllm-app-") as staging:
        command = [
            flwr_executable(), "run", str(staged_app(app_dir.resolve(), Path(staging))), "--stream",
            "--run-config", overrides, "--federation-config", federation_config(clients, cpus_per_client),
        ]
        try:
            subprocess.run(command, env=env, check=False)
        finally:
            if not (keep_superlink or _REUSING_SUPERLINK):
                for pid in superlink_pids() - already_running:
                    stop_tree(pid)
            reap_orphaned_ray(started_at)
    if not summary.exists() or summary.stat().st_mtime_ns == earlier_summary:
        raise RunFailed(
            f"the run wrote no {summary} after {time.perf_counter() - started:.0f} s; "
            "its log above says why (look for ERROR or Traceback)"
        )
    return output_dir
