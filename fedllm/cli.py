"""The `fedllm` command: `fedllm run` launches the default federated simulation; `fedllm certs`
makes the TLS certificates and SuperNode keys for a deployment across institutions; `fedllm node`
runs a node's resident worker beside its SuperNode."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from fedllm.config import ConfigError
from fedllm.launch import RunFailed, reused_superlink, run_simulation, shared_ray_cluster
from fedllm.outputs import EarlierRunError

DEFAULT_CLIENTS = 6


def project_dir() -> Path:
    """The Flower app folder: this checkout's root (where pyproject.toml declares the app)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("outputs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        folder = run_simulation(
            Path(args.app) if args.app else project_dir(), args.run_config, args.clients, out,
            cpus_per_client=args.cpus_per_client, keep_superlink=args.keep_superlink,
        )
    except (RunFailed, ConfigError, EarlierRunError) as error:
        print(f"fedllm run: FAILED: {error}", file=sys.stderr)
        return 1
    summary = json.loads((folder / "summary.json").read_text())
    print(f"\nfedllm run: {summary['metric']} {summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
          f"in {summary['rounds']} rounds; outputs in {folder}")
    for task, acc in summary["per_task_accuracy"].items():
        print(f"  {task:<10} {summary['base_per_task_accuracy'].get(task, float('nan')):.3f} -> {acc:.3f}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedllm.deploy import CertsError, create_certs, next_steps

    out = Path(args.out)
    try:
        written = create_certs(out, args.hosts, args.nodes, force=args.force)
    except (CertsError, OSError) as error:
        print(f"fedllm certs: {error}", file=sys.stderr)
        return 1
    print(f"fedllm certs: wrote {len(written)} files under {out.resolve()}")
    for path in written:
        print(f"  {path.stat().st_mode & 0o777:04o}  {path}")
    print(next_steps(out, args.hosts, args.nodes))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    import signal
    import threading

    from client.handlers import HANDLERS
    from client.node_worker import NODE_CONFIG_KEY, NodeWorkerError, serve

    folder = Path(args.dir).expanduser().resolve()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"fedllm node: start the SuperNode with --node-config \"{NODE_CONFIG_KEY}='{folder}' ...\"", flush=True)
    try:
        serve(folder, HANDLERS, stop=stop)
    except (NodeWorkerError, OSError) as error:
        print(f"fedllm node: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fedllm.study import execute, load_study, machine, pending_runs, write_report, write_results

    study_file = Path(args.study)
    out = Path(args.out or Path("outputs") / f"study-{study_file.stem}").resolve()
    try:
        study = load_study(study_file)
        pending = pending_runs(study, out)
    except ConfigError as error:
        print(f"fedllm study: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if pending:  # what the results about to be written were made on
        (out / "machine.json").write_text(json.dumps(machine(), indent=2))
    app = Path(args.app) if args.app else project_dir()
    try:
        # one Ray and one SuperLink for all the study's runs (none at all when every run is done)
        with shared_ray_cluster() if pending else nullcontext(), reused_superlink():
            rows = execute(study, out, lambda run_config, clients, folder: run_simulation(
                app, run_config, clients, folder, cpus_per_client=args.cpus_per_client))
    except RunFailed as error:  # the shared Ray head did not start; a failed run is a row instead
        print(f"fedllm study: {error}", file=sys.stderr)
        return 1
    write_results(rows, out)
    report = write_report(study_file, study, rows, out)
    print(report.read_text())
    failed = [r["run"] for r in rows if str(r["status"]).startswith("failed")]
    if failed:
        print(f"fedllm study: {len(failed)} of {len(rows)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def add_cpus_per_client(command: argparse.ArgumentParser) -> None:
    command.add_argument("--cpus-per-client", type=positive_int, default=1,
                         help="CPUs per simulated client: clients train in parallel on CPUs / this (default %(default)s)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedllm", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a federated simulation (the embedded default unless overridden)")
    run.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="simulated SuperNodes (default %(default)s)")
    run.add_argument("--run-config", default="", help="overrides, e.g. \"num-server-rounds=3 partition='iid'\"")
    run.add_argument("--out", default="", help="output folder (default outputs/<timestamp>)")
    run.add_argument("--app", default="", help="Flower app folder (default: this checkout)")
    add_cpus_per_client(run)
    run.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running afterwards")
    run.set_defaults(handler=cmd_run)
    study = commands.add_parser("study", help="run every setting of a study file; write results.csv, report.md, plots")
    study.add_argument("study", help="a study TOML file: clients, [base], [grid], [[runs]]")
    study.add_argument("--out", default="", help="study folder (default outputs/study-<name>); reruns skip finished runs")
    study.add_argument("--app", default="", help="Flower app folder (default: this checkout)")
    add_cpus_per_client(study)
    study.set_defaults(handler=cmd_study)
    certs = commands.add_parser("certs", help="create a CA, the SuperLink's TLS certificate and SuperNode auth keys")
    certs.add_argument("--out", required=True, help="folder to write into (ca.crt, server.pem, nodes/node<i>, ...)")
    certs.add_argument("--hosts", required=True,
                       help="the SuperLink's DNS names and IP addresses, comma-separated (loopback is always added)")
    certs.add_argument("--nodes", type=int, required=True, help="number of SuperNode key pairs")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(handler=cmd_certs)
    node = commands.add_parser("node", help="run a node's resident worker: the SuperNode's messages reuse one loaded model")
    node.add_argument("--dir", required=True, help="the worker's private folder (its socket and secret); name it in "
                                                   "the SuperNode's --node-config as node-worker='<dir>'")
    node.set_defaults(handler=cmd_node)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="fedllm: %(message)s")
    args = parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
