"""Simulation at scale: peak memory, seconds per round, and where a round's time goes.

    python simulations/bench_simulation.py [--clients 100] [--per-round 10] [--rounds 6]
                                           [--cpus-per-client 1 [2 ...]] [--run-config "..."]

Runs `fedllm run` with `--clients` simulated SuperNodes, `fraction-train = per-round / clients`,
once per `--cpus-per-client` value (1: two clients train at once on a 2-core machine, one torch
thread each; 2: one client at a time with two threads), and prints for each:

- peak memory: the largest sum of the resident set sizes (RSS) of every process the run started
  (SuperLink, ServerApp, simulation engine, Ray workers), sampled every 0.25 s;
- seconds per round: the wall time between consecutive rounds' records in metrics.jsonl;
- the split of each round's wall time W into local training (the clients' own timing of their
  training, summed and divided by the clients that can train at once), aggregation (the merge,
  and re-factoring ΔW_g into what each rank is sent) and evaluation (timed by the server), and
  the rest: framework overhead = 1 − (training + aggregation) / W,
  whose parts are evaluation and "other" (scheduling, serialization, messaging, checkpoint, logging).

The first round loads the base model in every worker, so steady state is rounds 2..R.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.launch import run_simulation  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD = 0.15


class PeakMemory:
    """Samples, in a thread, the summed RSS of every process created since `start()`."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self.peak_processes = interval, 0, 0
        self._stop = threading.Event()
        self._since = time.time()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._since = time.time() - 1
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval):
            total, count = psutil.Process(me).memory_info().rss, 1
            for proc in psutil.process_iter(["create_time", "memory_info"]):
                info = proc.info
                if proc.pid != me and info["create_time"] and info["create_time"] >= self._since and info["memory_info"]:
                    total += info["memory_info"].rss
                    count += 1
            if total > self.peak:
                self.peak, self.peak_processes = total, count


@dataclass
class RoundSplit:
    """One round's wall time and what it was spent on (seconds)."""

    wall: float
    training: float
    aggregation: float
    evaluation: float

    @property
    def overhead(self) -> float:
        return 1 - (self.training + self.aggregation) / self.wall


def round_splits(rows: list[dict], parallel: int) -> list[RoundSplit]:
    """Rounds 1..R of a metrics.jsonl; a round's wall time runs from the previous record to its own."""
    splits = []
    for before, row in zip(rows, rows[1:]):
        train = row["client_train_seconds"].values()
        at_once = max(1, min(parallel, len(train)))
        server_math = row["aggregate_seconds"] + row.get("refactor_seconds", 0.0)  # merge, and re-factoring ΔW_g
        splits.append(RoundSplit(row["time"] - before["time"], sum(train) / at_once, server_math,
                                 row.get("evaluate_seconds", 0.0)))
    return splits


def bench(clients: int, per_round: int, rounds: int, cpus_per_client: int, extra: str, out: Path) -> dict:
    fraction = per_round / clients
    run_config = f"num-server-rounds={rounds} fraction-train={fraction} min-clients={min(per_round, 2)} {extra}".strip()
    started = time.perf_counter()
    with PeakMemory() as memory:
        run_simulation(PROJECT, run_config, clients, out, cpus_per_client=cpus_per_client)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    splits = round_splits(rows, parallel=max(1, (os.cpu_count() or 1) // cpus_per_client))
    steady = splits[1:] or splits
    mean = lambda values: statistics.fmean(values)  # noqa: E731
    return {
        "clients": clients, "per_round": per_round, "rounds": rounds, "cpus_per_client": cpus_per_client,
        "run_config": run_config, "total_seconds": wall, "first_round_seconds": splits[0].wall,
        "seconds_per_round": mean(s.wall for s in steady),
        "training_seconds": mean(s.training for s in steady), "aggregation_seconds": mean(s.aggregation for s in steady),
        "evaluation_seconds": mean(s.evaluation for s in steady),
        "overhead": mean(s.overhead for s in steady),
        "evaluation_share": mean(s.evaluation / s.wall for s in steady),
        "peak_rss_bytes": memory.peak, "peak_processes": memory.peak_processes,
        "final_accuracy": summary["final_accuracy"], "output": str(out),
    }


def report(result: dict) -> str:
    gib = result["peak_rss_bytes"] / 2**30
    other = result["overhead"] - result["evaluation_share"]
    return "\n".join([
        f"{result['clients']} clients, {result['per_round']} per round, {result['rounds']} rounds, "
        f"{result['cpus_per_client']} CPU(s) per client:",
        f"  peak memory       {gib:.2f} GiB RSS over {result['peak_processes']} processes",
        f"  seconds per round {result['seconds_per_round']:.1f} s at steady state (round 1: {result['first_round_seconds']:.1f} s; "
        f"whole run with start-up {result['total_seconds']:.0f} s)",
        f"  training          {result['training_seconds']:.1f} s per round (client time / clients at once)",
        f"  aggregation       {result['aggregation_seconds']:.2f} s",
        f"  evaluation        {result['evaluation_seconds']:.2f} s ({result['evaluation_share']:.1%} of the round)",
        f"  overhead          {result['overhead']:.1%} of the round (evaluation {result['evaluation_share']:.1%}, "
        f"other {other:.1%}); target < {TARGET_OVERHEAD:.0%}: {'met' if result['overhead'] < TARGET_OVERHEAD else 'NOT met'}",
        f"  final accuracy    {result['final_accuracy']:.3f}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cpus-per-client", type=int, nargs="+", default=[1])
    parser.add_argument("--run-config", default="", help="more run-config overrides")
    parser.add_argument("--out", default="", help="folder for the runs' outputs (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not 1 <= args.per_round <= args.clients:
        parser.error("--per-round must be between 1 and --clients")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedllm-bench-"))
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; outputs in {out}")
    results = []
    for cpus in args.cpus_per_client:
        result = bench(args.clients, args.per_round, args.rounds, cpus, args.run_config, out / f"cpus{cpus}")
        results.append(result)
        print(report(result), flush=True)
    if len(results) > 1:
        fastest = min(results, key=lambda r: r["seconds_per_round"])
        print(f"fastest: {fastest['cpus_per_client']} CPU(s) per client, "
              + ", ".join(f"{r['cpus_per_client']} CPU(s): {r['seconds_per_round'] / fastest['seconds_per_round']:.2f}x"
                          for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
