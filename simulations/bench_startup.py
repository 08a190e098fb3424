"""Where a study run's time goes before and after it trains, and what one shared Ray cluster saves.

    python simulations/bench_startup.py [--runs 3] [--clients 6] [--run-config "..."]

Runs the same short study (`--runs` seeds of a one-round run) twice through `fedllm study`'s own
runner, in the same session so the machine's noise hits both: first every run joining one Ray head
(`fedllm.launch.shared_ray_cluster`, what `fedllm study` does), then each run starting and stopping
its own Ray (as every `flwr run` does alone). The shared pass goes first so that one-time costs
(cold file caches) count against it, not for it. Each pass starts one local SuperLink for its runs.
For each it prints seconds per run, split into

- outside the ServerApp: `flwr run` building and submitting the app, the SuperLink starting the
  simulation process, Ray's start and stop, and ending the run (total − the summary's wall time);
- before round 0 inside the ServerApp: building the model and waiting for the clients to join
  (Ray actors start and import the ClientApp, whose first message imports torch);
- rounds: training, merging and evaluation, what a study is for.

Its last line, for comparison: `seconds per run outside training: <own> -> <shared> (<ratio>x)`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.launch import reused_superlink, run_simulation, shared_ray_cluster  # noqa: E402
from fedllm.study import execute, load_study  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


def timed_study(study_file: Path, out: Path, shared_ray: bool) -> list[dict[str, float]]:
    """Run every run of the study; per run its total seconds and the split of them."""
    timings = []

    def run(run_config: str, clients: int, folder: Path) -> None:
        started = time.perf_counter()
        run_simulation(PROJECT, run_config, clients, folder)
        total = time.perf_counter() - started
        wall = json.loads((folder / "summary.json").read_text())["wall_seconds"]
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        # a round's seconds include its evaluation; round 0 is the base model's evaluation alone
        rounds = rows[0].get("evaluate_seconds", 0.0) + sum(r["round_seconds"] for r in rows[1:])
        timings.append({"total": total, "outside": total - wall, "before_round_0": wall - rounds, "rounds": rounds})

    with ExitStack() as stack:
        if shared_ray:
            stack.enter_context(shared_ray_cluster())
        stack.enter_context(reused_superlink())
        rows = execute(load_study(study_file), out, run)
    failed = [r["status"] for r in rows if str(r["status"]).startswith("failed")]
    if failed:
        raise SystemExit(f"bench_startup: a run failed: {failed[0]}")
    return timings


def mean(timings: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(t[key] for t in timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per pass (seeds of the same setting)")
    parser.add_argument("--clients", type=int, default=6, help="simulated clients per run")
    parser.add_argument("--run-config", default="num-server-rounds=1 local-steps=2 test-per-task=4",
                        help="the runs' settings: short, so that start-up is what is measured")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)  # both passes on this machine's own Ray
    seeds = ", ".join(str(s) for s in range(args.runs))
    settings = "\n".join(f"{k} = {v}" for k, v in (item.split("=", 1) for item in args.run_config.split()))
    passes = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        study_file = Path(tmp) / "startup.toml"
        study_file.write_text(f"clients = {args.clients}\n[base]\n{settings}\n[grid]\nseed = [{seeds}]\n")
        for label, shared in (("one shared Ray", True), ("own Ray per run", False)):
            passes[label] = timed_study(study_file, Path(tmp) / label.replace(" ", "-"), shared)
    print(f"{args.runs} runs per pass, {args.clients} clients, {args.run_config}; seconds per run (mean):")
    for label, timings in passes.items():
        print(f"  {label:>16}: total {mean(timings, 'total'):5.1f} = outside the ServerApp "
              f"{mean(timings, 'outside'):5.1f} + before round 0 {mean(timings, 'before_round_0'):5.1f} "
              f"+ rounds {mean(timings, 'rounds'):4.1f}")
    own, shared = (mean(passes[label], "total") - mean(passes[label], "rounds")
                   for label in ("own Ray per run", "one shared Ray"))
    print(f"seconds per run outside training: {own:.1f} -> {shared:.1f} ({own / shared:.2f}x)")


if __name__ == "__main__":
    main()
