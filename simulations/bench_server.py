"""The server's cost per round against the clients': time and peak memory of everything the server
does but evaluation (absorbing the uploads, merging, the server step, re-factoring what the next
round sends), on the factored path fedllm takes and on the dense path it took before.

    python simulations/bench_server.py [--quick]

1. SmolLM2-135M-Instruct (the packaged model; LoRA on every linear layer of its 30 blocks), two
   clients at rank 8 training `--local-steps` real steps on their shares of the structured suite:
   the server's seconds per round against one client's training seconds (nodes train in parallel).
2. Llama-3-8B-shaped layers: one decoder block (hidden 4096, MLP 14336, 8 KV heads), 10 clients at
   rank 16 with uploads of a trained adapter's size; each path in a fresh process, its resident
   memory sampled every few milliseconds. Figures for the whole model are the block's times 32
   (Llama-3-8B has 32 blocks), and are stated as scaled. The dense reference block needs about 13 GiB
   of memory: run the benchmark on an otherwise idle machine (it once starved a simulation here).

The exact ΔW_g grows by up to K·r in rank per round (no truncation on the server), so the memory
ratio is taken against all adapters received so far in the run, not only the round's.
3. Where ΔW_g stays dense (central DP, secure aggregation): re-factoring one 8B block for ranks 8
   and 16, fresh per rank against one factorization started from the previous round's subspace.

Last line: `server share of round: X%; peak server memory / received adapters: Yx`, with X the
factored path's worst round on SmolLM2 and Y its worst round at 8B shapes under weighted_average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.adapters import Subspaces, refactor, refactor_ranks  # noqa: E402
from fedllm.config import RunConfig  # noqa: E402
from fedllm.core.aggregator import Aggregator, Contribution  # noqa: E402
from fedllm.lowrank import LowRank  # noqa: E402
from fedllm.methods import build_method  # noqa: E402
from fedllm.methods.lora import Layer, Lora  # noqa: E402

BLOCKS_8B = 32
LLAMA3_8B_BLOCK = {  # (d_out, d_in) of one decoder block's linear layers
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def resident() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakResident:
    """The largest resident memory seen while the block runs (sampled by a thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident())
            time.sleep(self.interval)

    def __enter__(self) -> PeakResident:
        self.peak = resident()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident())


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def server_round(aggregator: Aggregator, server_round: int, uploads: list[dict[str, torch.Tensor]], sent, rank: int):
    """Absorb, merge and step the round's uploads, then re-factor for the next round: (seconds, next sent)."""
    started = time.perf_counter()
    contributions = [Contribution(k, aggregator.absorb(k, upload, sent), 100.0 + k) for k, upload in enumerate(uploads)]
    uploads.clear()  # the server keeps the updates, not the messages
    aggregator.complete(server_round, contributions)
    del contributions
    following = aggregator.method.sent_state(aggregator.global_delta, rank, seed=server_round + 1)
    return time.perf_counter() - started, following


# -- 1. the real model ------------------------------------------------------------------------

def real_model(rounds: int, local_steps: int, clients: int = 2, rank: int = 8) -> dict:
    """Per round on SmolLM2: one client's training seconds, and the factored and dense servers' seconds."""
    from fedllm.core.local import NodeSettings, Worker, train_round
    from fedllm.models import load_model, pick_device

    cfg = RunConfig.from_flower({"model": "smollm2-135m-instruct", "dataset": "builtin:structured", "lora-rank": rank,
                                 "partition": "pathological:3", "batch-size": 8, "train-per-task": 100,
                                 "local-steps": local_steps})
    base, tokenizer = load_model(cfg.model, pick_device())
    servers = {"factored": Aggregator(cfg, build_method(cfg, base)), "dense": Aggregator(cfg, build_method(cfg, base))}
    servers["dense"].method.factored = False
    for aggregator in servers.values():
        aggregator.start()
    worker = Worker(cfg, cfg.model, base, tokenizer)
    sent = {name: a.method.sent_state(a.global_delta, rank, seed=1) for name, a in servers.items()}
    rows = []
    for round_ in range(1, rounds + 1):
        uploads, client_seconds = [], []
        for k in range(clients):
            model, adapter = worker.adapter(rank)
            data = worker.training_data(cfg, NodeSettings(k, clients, rank, ""))
            started = time.perf_counter()
            upload, _ = train_round(cfg, worker.method, model, adapter, sent["factored"].state, data, local_steps,
                                    seed=100 * round_ + k, pad_id=tokenizer.pad_token_id or 0)
            client_seconds.append(time.perf_counter() - started)
            uploads.append(upload)
        row = {"round": round_, "client_seconds": statistics.mean(client_seconds)}
        for name, aggregator in servers.items():
            row[f"{name}_seconds"], sent[name] = server_round(aggregator, round_, [dict(u) for u in uploads], sent[name], rank)
        rows.append(row)
        print(f"  SmolLM2 round {round_}: one client trains {row['client_seconds']:.1f} s; server "
              f"{row['factored_seconds']:.2f} s factored, {row['dense_seconds']:.2f} s dense "
              f"({row['dense_seconds'] / row['factored_seconds']:.0f}x)", flush=True)
    return {"rows": rows}


# -- 2. Llama-3-8B shapes, one path per process ---------------------------------------------------

def block_worker(factored: bool, rounds: int, clients: int, rank: int, operator: str) -> None:
    """Rounds of random uploads into one 8B-shaped block; prints one JSON line per round."""
    cfg = RunConfig.from_flower({"lora-rank": rank, "aggregation": operator})
    method = Lora(cfg, {f"model.layers.0.{m}": Layer(torch.Size(shape), False) for m, shape in LLAMA3_8B_BLOCK.items()})
    method.factored = factored
    aggregator = Aggregator(cfg, method)
    LowRank.of(torch.randn(64, 4), torch.randn(32, 4)).compacted()  # loads LAPACK before the baseline is taken
    baseline = resident()  # the process, torch and the block's shapes: nothing the server holds yet
    received = 0
    with PeakResident():
        aggregator.start()
    sent = method.sent_state(aggregator.global_delta, rank, seed=1)
    generator = torch.Generator().manual_seed(0)
    for round_ in range(1, rounds + 1):
        with PeakResident() as peak:
            uploads = [{k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in sent.state.items()}
                       for _ in range(clients)]
            round_bytes = sum(nbytes(u) for u in uploads)
            seconds, sent = server_round(aggregator, round_, uploads, sent, rank)
        received += round_bytes
        print(json.dumps({"round": round_, "seconds": seconds, "peak_bytes": peak.peak - baseline,
                          "round_bytes": round_bytes, "received_bytes": received}), flush=True)


def block_rounds(factored: bool, rounds: int, clients: int, rank: int, operator: str) -> list[dict]:
    """`block_worker` in a fresh process whose allocator returns freed memory, so resident memory is live memory."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    spec = json.dumps({"factored": factored, "rounds": rounds, "clients": clients, "rank": rank, "operator": operator})
    done = subprocess.run([sys.executable, __file__, "--block-worker", spec], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the 8B-shaped block run failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def report_block(name: str, rows: list[dict]) -> None:
    for row in rows:
        print(f"  {name} round {row['round']}: {row['seconds']:.2f} s per block ({row['seconds'] * BLOCKS_8B:.0f} s "
              f"scaled to 32 blocks); peak {row['peak_bytes'] / MIB:.0f} MiB per block "
              f"({row['peak_bytes'] * BLOCKS_8B / 2**30:.1f} GiB scaled); "
              f"{row['peak_bytes'] / row['round_bytes']:.1f}x the round's uploads, "
              f"{row['peak_bytes'] / row['received_bytes']:.1f}x all received", flush=True)


def dense_refactoring(ranks: tuple[int, ...] = (8, 16)) -> None:
    """Where ΔW_g must stay dense (central DP noise, secure sums): one 8B block's sent states for
    two ranks, as fresh randomized SVDs per rank against one factorization for both, started from
    the previous round's subspace."""
    generator = torch.Generator().manual_seed(0)
    previous: dict[str, torch.Tensor] = {}
    for module, (rows, cols) in LLAMA3_8B_BLOCK.items():
        u = torch.linalg.qr(torch.randn(rows, 64, generator=generator)).Q
        v = torch.linalg.qr(torch.randn(cols, 64, generator=generator)).Q
        previous[module] = (u * torch.arange(1, 65).float() ** -0.5) @ v.T + 1e-3 * torch.randn(rows, cols, generator=generator)
    current = {m: d + 0.02 * torch.randn(d.shape[0], 1, generator=generator) @ torch.randn(1, d.shape[1], generator=generator)
               for m, d in previous.items()}
    layouts = dict.fromkeys(current, False)
    subspaces = Subspaces()
    refactor_ranks(previous, dict.fromkeys(ranks, 1.0), layouts, 0, subspaces)  # last round's, kept
    started = time.perf_counter()
    fresh = {r: refactor(current, r, 1.0, layouts, seed=1) for r in ranks}
    fresh_seconds = time.perf_counter() - started
    started = time.perf_counter()
    warm = refactor_ranks(current, dict.fromkeys(ranks, 1.0), layouts, 1, subspaces)
    warm_seconds = time.perf_counter() - started
    errors = ", ".join(f"rank {r} {fresh[r].relative_error:.4f} / {warm[r].relative_error:.4f}" for r in ranks)
    print(f"  fresh randomized SVD per rank {fresh_seconds:.1f} s; one warm-started factorization for both ranks "
          f"{warm_seconds:.1f} s ({fresh_seconds / warm_seconds:.1f}x less); truncation error fresh / warm: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 local steps; the dense 8B block for 1 round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--block-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.block_worker:
        block_worker(**json.loads(args.block_worker))
        return
    rounds, steps = (2, 5) if args.quick else (args.rounds, args.local_steps)
    torch.manual_seed(0)

    print(f"1. SmolLM2-135M-Instruct, 2 clients at rank 8, {steps} local steps of 8 examples, {rounds} rounds")
    real = real_model(rounds, steps)["rows"]
    share = max(r["factored_seconds"] / (r["factored_seconds"] + r["client_seconds"]) for r in real)
    dense_share = max(r["dense_seconds"] / (r["dense_seconds"] + r["client_seconds"]) for r in real)
    print(f"  server share of round (worst round): factored {100 * share:.1f}%, dense {100 * dense_share:.1f}%")

    print(f"2. One Llama-3-8B-shaped block, 10 clients at rank 16, weighted_average, {rounds} rounds")
    factored = block_rounds(True, rounds, 10, 16, "weighted_average")
    report_block("factored", factored)
    dense = block_rounds(False, 1, 10, 16, "weighted_average")
    report_block("dense (reference)", dense)
    ratio = max(r["peak_bytes"] / r["received_bytes"] for r in factored)
    print(f"  round 1 against the dense path: {dense[0]['peak_bytes'] / factored[0]['peak_bytes']:.1f}x less memory, "
          f"{dense[0]['seconds'] / factored[0]['seconds']:.1f}x less time")
    print("3. Dense ΔW_g (central DP, secure aggregation), one Llama-3-8B-shaped block, ranks 8 and 16")
    dense_refactoring()
    print(f"server share of round: {100 * share:.1f}%; peak server memory / received adapters: {ratio:.1f}x")


if __name__ == "__main__":
    main()
