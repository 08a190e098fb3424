"""Benchmark fedllm.merge against peft.utils.merge_utils on identical inputs.

    python simulations/bench_merge.py [--numel 4194304] [--clients 10] [--repeats 3] [--ops ties,...]

For the operators peft also has (task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties)
both implementations run on the same float32 ``[clients, numel]`` input (peft gets the rows as a
list, weights normalised to sum to 1; densities are the fedllm defaults: 0.2 for trimming, 0.5 for
DARE). Times are the best of ``--repeats`` runs after one warm-up. peft and the copy use torch's
thread setting (``--threads``); fedllm.merge uses its own (1 by default, ``--merge-threads``). The physical reference is
``updates.clone()`` of the same input: "copy bw" is (input bytes / our time) / (input bytes /
clone time) = clone time / our time.

Peak extra memory is measured in a fresh subprocess per (operator, implementation): the Linux
peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the call) minus
the resident size just before the call, after a warm-up call on a small input so that one-time
library set-up is not counted. It counts every page the call touches, output included
(numel * 4 bytes), exact up to the page size. Where the peak cannot be reset, the getrusage
maximum RSS is used instead (marked "~"; a lower bound if an earlier peak was higher).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedllm.merge as M  # noqa: E402

PEFT_OPS = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
TARGET_TIES_SPEEDUP = 10.0
TARGET_TIES_COPY_FRACTION = 0.25


# --------------------------------------------------------------------------- inputs and calls


def make_inputs(numel: int, clients: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded float32 updates (scale 0.01, like LoRA deltas) and positive weights, built in place."""
    g = torch.Generator().manual_seed(seed)
    updates = torch.empty(clients, numel).normal_(generator=g).mul_(0.01)
    weights = torch.rand(clients, generator=g).add_(0.5)
    return updates, weights


def ours_call(op: str, updates: torch.Tensor, weights: torch.Tensor):
    fn = M.get_operator(op)
    return lambda: fn(updates, weights)


def peft_call(op: str, updates: torch.Tensor, weights: torch.Tensor):
    from peft.utils import merge_utils as mu

    tasks = list(updates.unbind(0))  # views, no copy
    p = weights / weights.sum()
    density = M.OPERATOR_PARAMS[op].get("density")
    fn = getattr(mu, op)
    if density is None:
        return lambda: fn(tasks, p)
    return lambda: fn(tasks, p, density=density)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------- memory (subprocess)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_memory_here(op: str, impl: str, numel: int, clients: int) -> dict:
    """Run one call in this (fresh) process and return its peak extra resident memory."""
    call = ours_call if impl == "ours" else peft_call
    small_u, small_w = make_inputs(70_000, 2, seed=1)
    call(op, small_u, small_w)()  # lazy library set-up (BLAS buffers, thread pool) is not counted
    del small_u, small_w
    updates, weights = make_inputs(numel, clients)
    fn = call(op, updates, weights)
    before = _status_kib("VmRSS")
    exact = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        exact = _status_kib("VmHWM") is not None and before is not None
    except OSError:
        pass
    if not exact:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return {"extra_bytes": max(0, peak - before) * 1024, "exact": exact}


def measure_memory(op: str, impl: str, args) -> dict | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-child",
        f"{op}:{impl}",
        "--numel",
        str(args.numel),
        "--clients",
        str(args.clients),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.merge_threads is not None:
        cmd += ["--merge-threads", str(args.merge_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (memory child for {op}/{impl} failed: {proc.stderr.strip()[-300:]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_mem(m: dict | None, input_bytes: int) -> str:
    if m is None:
        return "n/a"
    mark = "" if m["exact"] else "~"
    return f"{mark}{m['extra_bytes'] / 2**20:7.1f} MiB ({m['extra_bytes'] / input_bytes:4.2f}x in)"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=4_194_304, help="entries per client (default 4194304)")
    ap.add_argument("--clients", type=int, default=10, help="number of clients K (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; best is kept")
    ap.add_argument("--ops", default=None, help="comma-separated subset of operators (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--merge-threads",
        type=int,
        default=None,
        help="threads fedllm.merge uses while an operator runs (default: its own, 1; 0 = torch's)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the per-call memory subprocesses")
    ap.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge_threads is not None:
        M.set_threads(args.merge_threads or None)
    if args._memory_child:
        op, impl = args._memory_child.split(":")
        print(json.dumps(measure_memory_here(op, impl, args.numel, args.clients)))
        return 0

    ops = list(M.OPERATORS) if args.ops is None else [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in ops:
        M.get_operator(op)  # ValueError listing valid names on a typo
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None

    updates, weights = make_inputs(args.numel, args.clients)
    input_bytes = updates.numel() * updates.element_size()
    print(
        f"fedllm.merge benchmark: K={args.clients} clients x {args.numel} float32 entries "
        f"({input_bytes / 2**20:.0f} MiB input), best of {args.repeats}"
    )
    print(
        f"torch {torch.__version__}, peft {peft_version}, torch threads {torch.get_num_threads()} "
        f"(fedllm.merge: {M.operators.THREADS or 'torch setting'}), "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average before {os.getloadavg()[0]:.2f}"
    )
    copy_s = best_time(lambda: updates.clone(), args.repeats)
    print(f"copy reference updates.clone(): {copy_s:.4f} s ({input_bytes / copy_s / 1e9:.2f} GB/s)\n")

    rows = []
    with_peft = [op for op in ops if op in PEFT_OPS and peft_version]
    others = [op for op in ops if op not in with_peft]
    header = f"{'op':<16} {'ours s':>8} {'peft s':>8} {'speed-up':>9} {'copy bw':>8}   {'peak extra mem ours':<24} {'peft':<24}"
    if with_peft:
        print(header)
        print("-" * len(header))
    for op in with_peft:
        ours_s = best_time(ours_call(op, updates, weights), args.repeats)
        peft_s = best_time(peft_call(op, updates, weights), args.repeats)
        mem_o = None if args.no_memory else measure_memory(op, "ours", args)
        mem_p = None if args.no_memory else measure_memory(op, "peft", args)
        rows.append((op, ours_s, peft_s))
        print(
            f"{op:<16} {ours_s:8.4f} {peft_s:8.4f} {peft_s / ours_s:8.1f}x {copy_s / ours_s:7.0%}   "
            f"{fmt_mem(mem_o, input_bytes):<24} {fmt_mem(mem_p, input_bytes):<24}",
            flush=True,
        )
    if others:
        print(f"\n{'op (no peft)':<16} {'ours s':>8} {'copy bw':>8}   {'peak extra mem ours':<24}")
        for op in others:
            ours_s = best_time(ours_call(op, updates, weights), args.repeats)
            mem_o = None if args.no_memory else measure_memory(op, "ours", args)
            print(f"{op:<16} {ours_s:8.4f} {copy_s / ours_s:7.0%}   {fmt_mem(mem_o, input_bytes):<24}", flush=True)

    print(f"\nload average after {os.getloadavg()[0]:.2f}")
    print("speed-up = peft time / our time; copy bw = clone time / our time (1 = copy bandwidth).")
    ok = True
    for op, ours_s, peft_s in rows:
        if op == "ties":
            for label, value, target in (
                ("ties speed-up vs peft", peft_s / ours_s, TARGET_TIES_SPEEDUP),
                ("ties fraction of copy bandwidth", copy_s / ours_s, TARGET_TIES_COPY_FRACTION),
            ):
                hit = value >= target
                ok &= hit
                print(f"target {label} >= {target:g}: {value:.2f} {'MET' if hit else 'MISSED'}")
    slower = [op for op, ours_s, peft_s in rows if ours_s > peft_s]
    if rows:
        print(f"target none slower than peft: {'MET' if not slower else 'MISSED by ' + ', '.join(slower)}")
        ok &= not slower
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
