"""The federated round loop, top to bottom: sample, send, collect, merge, evaluate, record."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from logging import INFO, WARNING

from flwr.app import Context
from flwr.common.logger import log

from fedllm.checkpoint import RunState, capture_rng, restore_rng, save_state
from fedllm.core.aggregator import Aggregator
from fedllm.core.server_model import ServerModel
from server.cooperation import Cooperation
from server.emulators import EmulatorFleet
from server.evaluate import evaluate_round
from server.grid import MeteredGrid
from server.nodes import refresh_nodes
from server.plain import Transport, plain_round
from server.record import RoundResult, RunRecorder
from server.secure import secure_round


@dataclass
class Run:
    """What the loop drives: the wire, the aggregator, the server model and the outputs."""

    grid: MeteredGrid
    context: Context  # the ServerApp's (secure aggregation's workflow needs it)
    aggregator: Aggregator
    server: ServerModel
    recorder: RunRecorder
    emulators: EmulatorFleet | None = None  # when nodes may train on emulators
    cooperation: Cooperation | None = None  # when nodes may train other models

    def evaluate(self, server_round: int, rounds: int, timeout: float) -> dict[str, Any]:
        """The round's evaluation fields ({} on a round `evaluate-every` skips), with the other
        models' merged adapters scored too in cooperation."""
        fields = evaluate_round(self.grid, self.aggregator, self.server, server_round, rounds, timeout)
        return fields | self.cooperation.evaluate() if fields and self.cooperation else fields

    def play(self, server_round: int, rounds: int, timeout: float) -> RoundResult:
        """One round of the run's kind, ΔW_g updated in the aggregator."""
        if self.aggregator.cfg.secure_aggregation:
            return secure_round(self.grid, self.context, self.aggregator, server_round, rounds, timeout)
        return plain_round(self.grid, Transport(self.aggregator, self.emulators, self.cooperation), server_round, rounds,
                           timeout)


def run_rounds(run: Run, rounds: int, timeout: float, resumed: RunState | None = None) -> None:
    """Train up to round `rounds` (continuing `resumed` if given); the run state is saved
    atomically after round 0 and after every completed round."""
    aggregator, dp, recorder = run.aggregator, run.aggregator.dp, run.recorder
    refresh_nodes(run.grid, aggregator, run.emulators, run.cooperation, timeout, wait=True)
    first = start(run, rounds, timeout) if resumed is None else resume(run, resumed)
    for server_round in range(first, rounds + 1):
        if dp is not None and not dp.allows_another_round():
            recorder.stop_reason = (f"stopped before round {server_round}: it would take ε past dp-target-epsilon "
                                    f"{aggregator.cfg.dp_target_epsilon:g} (ε = {dp.epsilon():.3f} "
                                    f"after {server_round - 1} rounds)")
            log(WARNING, "%s", recorder.stop_reason)
            break
        started = time.perf_counter()
        if server_round > first:
            refresh_nodes(run.grid, aggregator, run.emulators, run.cooperation, timeout)
        run.grid.take_counts()
        result = run.play(server_round, rounds, timeout)
        if dp is not None:
            dp.complete_round(result.clients, result.min_survivors)
        traffic = run.grid.take_counts()
        evaluation = run.evaluate(server_round, rounds, timeout)
        row = recorder.record_round(server_round, evaluation, result, aggregator, traffic, run.grid.take_counts(),
                                    round_seconds=time.perf_counter() - started)
        checkpoint(run, server_round)
        loss = "withheld (DP)" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
        scored = (f"{aggregator.cfg.metric} {row['accuracy']:.3f} (base {recorder.rounds[0]['accuracy']:.3f})"
                  if "accuracy" in row else f"not evaluated (evaluate-every {aggregator.cfg.evaluate_every})")
        log(INFO, "round %d/%d: %s, train loss %s, %.1f s", server_round, rounds, scored, loss, row["round_seconds"])


def start(run: Run, rounds: int, timeout: float) -> int:
    """Round 0: the base model evaluated and checkpointed. Returns the first round to train."""
    run.aggregator.start()
    run.grid.take_counts()
    evaluation = run.evaluate(0, rounds, timeout)
    row = run.recorder.record(0, **evaluation, **run.recorder.evaluation_traffic(run.grid.take_counts()),
                              train_loss=None, upload_bytes=0, download_bytes=0, round_seconds=0.0,
                              **run.recorder.privacy_fields(run.aggregator.dp))
    checkpoint(run, 0)
    log(INFO, "round 0: base model %s %.3f", run.aggregator.cfg.metric, row["accuracy"])
    return 1


def resume(run: Run, resumed: RunState) -> int:
    """The state after `resumed.round`, from its checkpoint. Returns the first round to train."""
    run.aggregator.restore(resumed.global_delta, resumed.optimizer_state, resumed.subspaces)
    run.recorder.restore(resumed.metrics)
    restore_rng(resumed.rng)
    if run.aggregator.dp is not None:
        run.aggregator.dp.restore(run.recorder.rounds)
    log(INFO, "resuming after round %d; base model %s %.3f", resumed.round, run.aggregator.cfg.metric,
        run.recorder.rounds[0]["accuracy"])
    return resumed.round + 1


def checkpoint(run: Run, server_round: int) -> None:
    """Save what a resumed run needs to continue after `server_round`."""
    cfg, aggregator = run.aggregator.cfg, run.aggregator
    save_state(run.recorder.out_dir, RunState(
        server_round, aggregator.global_delta, aggregator.optimizer_state, run.recorder.rounds,
        cfg.as_dict(), cfg.digest(), capture_rng(), aggregator.subspaces.bases,
    ), keep=cfg.keep_checkpoints)
