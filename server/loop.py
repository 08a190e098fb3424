"""The federated round loop, top to bottom: sample, send, collect, merge, evaluate, record."""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.adapters import Delta
from fedllm.checkpoint import RunState, capture_rng, restore_rng, save_state
from server.grid import MeteredGrid, exchange
from server.model import ServerModel
from server.record import RunRecorder
from server.secure import RoundResult, secure_round
from server.strategy import ModelSpaceStrategy
from server.validation import NodeRefused, PartitionHeld, error_summary


def reply_metric(reply: Message, key: str) -> int | float | None:
    """A number from a reply's metrics, or None if absent; judging replies is the strategy's job."""
    if reply.has_error() or "metrics" not in reply.content.metric_records:
        return None
    value = reply.content.metric_records["metrics"].get(key)
    return value if isinstance(value, (int, float)) else None


def refresh_nodes(grid: Grid, strategy: ModelSpaceStrategy, timeout: float, wait: bool = False) -> None:
    """Mark which nodes are online and ask new ones for their partition, rank and data size.

    Called before every round, so a node that (re)joins takes part from the next round on and a
    node that left is not sampled. With `wait`, waits up to `timeout` for min-clients nodes.
    """
    deadline = time.monotonic() + timeout
    while wait and len(online := set(grid.get_node_ids())) < strategy.min_train_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(online)} node(s) online after {timeout:.0f} s; min-clients = {strategy.min_train_nodes}")
        log(INFO, "waiting for nodes: %d connected, min-clients = %d", len(online), strategy.min_train_nodes)
        time.sleep(1)
    online = set(grid.get_node_ids())
    strategy.online = online & set(strategy.nodes)
    new = sorted(online - set(strategy.nodes) - set(strategy.refused))
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
    replies = exchange(grid, queries, timeout, on_reply=lambda r: None) if queries else []
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # who claims a partition first: not timing
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d could not start: %s", node_id, error_summary(reply.error.reason))
            continue
        try:
            node = strategy.admit(node_id, reply.content)
        except PartitionHeld as reason:
            log(WARNING, "%s; asking it again next round", reason)
            continue
        except NodeRefused as reason:
            strategy.refuse(node_id, str(reason))
            continue
        log(INFO, "node %d joined: partition %d, rank %d, %d examples, %s", node_id,
            node.partition_id, node.rank, node.num_examples, node.client_model)
    if len(strategy.online) < strategy.min_train_nodes:
        raise RuntimeError(f"only {len(strategy.online)} usable node(s); min-clients = {strategy.min_train_nodes}"
                           + (f"; left out: {'; '.join(strategy.refused.values())}" if strategy.refused else ""))


def run_rounds(
    grid: MeteredGrid, strategy: ModelSpaceStrategy, server: ServerModel, recorder: RunRecorder, rounds: int,
    timeout: float, resumed: RunState | None = None,
):
    """Train up to round `rounds` (continuing `resumed` if given); returns the final ΔW_g.

    The run state is saved atomically after round 0 and after every completed round.
    """
    refresh_nodes(grid, strategy, timeout, wait=True)
    if resumed is None:
        global_delta = strategy.initial_update()
        arrays = ArrayRecord(global_delta)
        per_task, scores = strategy.evaluate(server, global_delta)
        base = recorder.record(0, per_task, train_loss=None, upload_bytes=0, download_bytes=0, round_seconds=0.0,
                               **scores, **privacy_fields(strategy))
        checkpoint(recorder, strategy, global_delta, 0)
    else:
        global_delta = resumed.global_delta
        arrays = ArrayRecord(global_delta)
        strategy.optimizer_state = resumed.optimizer_state
        recorder.restore(resumed.metrics)
        restore_rng(resumed.rng)
        if strategy.dp is not None:
            strategy.dp.restore(recorder.rounds)
        base = recorder.rounds[0]
        log(INFO, "resuming after round %d of %d", resumed.round, rounds)
    log(INFO, "round 0: base model accuracy %.3f", base["accuracy"])
    first = 1 if resumed is None else resumed.round + 1
    for server_round in range(first, rounds + 1):
        if strategy.dp is not None and not strategy.dp.allows_another_round():
            recorder.stop_reason = (f"stopped before round {server_round}: it would take ε past dp-target-epsilon "
                                    f"{strategy.cfg.dp_target_epsilon:g} (ε = {strategy.dp.epsilon():.3f} "
                                    f"after {server_round - 1} rounds)")
            log(WARNING, "%s", recorder.stop_reason)
            break
        started = time.perf_counter()
        if server_round > first:
            refresh_nodes(grid, strategy, timeout)
        grid.reset_counts()
        play = secure_round if strategy.cfg.secure_aggregation else plain_round
        result = play(grid, strategy, server_round, rounds, arrays, timeout)
        arrays = result.arrays
        global_delta = arrays.to_torch_state_dict()  # once per round: evaluation and checkpoint share it
        check_global_update(global_delta, server_round)
        if strategy.dp is not None:
            strategy.dp.complete_round(result.metrics["clients"], result.min_survivors)
        evaluating = time.perf_counter()
        per_task, scores = strategy.evaluate(server, global_delta)
        evaluate_seconds = time.perf_counter() - evaluating
        upload, download = (
            {strategy.nodes[n].partition_id: size for n, size in counts.items() if n in strategy.nodes}
            for counts in (grid.received, grid.sent)
        )
        row = recorder.record(
            server_round, per_task,
            train_loss=result.metrics.get("train_loss"), clients=result.metrics["clients"],
            rejected=result.metrics["rejected"], rejected_reasons=strategy.rejected, timed_out=result.timed_out,
            bounded=strategy.bounded,
            upload_bytes=sum(upload.values()), download_bytes=sum(download.values()),
            client_upload_bytes=upload, client_download_bytes=download,
            refactor_error={str(r): s.relative_error for r, s in strategy.sent.items()},
            client_processes=result.client_processes, round_seconds=time.perf_counter() - started,
            client_train_seconds=result.train_seconds,
            refactor_seconds=strategy.refactor_seconds, aggregate_seconds=result.aggregate_seconds,
            evaluate_seconds=evaluate_seconds, **scores,
            **privacy_fields(strategy),
        )
        checkpoint(recorder, strategy, global_delta, server_round)
        loss = "withheld (DP)" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
        log(INFO, "round %d/%d: accuracy %.3f (base %.3f), train loss %s, %.1f s",
            server_round, rounds, row["accuracy"], base["accuracy"], loss, row["round_seconds"])
    return global_delta


def privacy_fields(strategy: ModelSpaceStrategy) -> dict[str, float]:
    """ε spent so far, the last round's noise multiplier and the clip norm the next round uses (DP runs only)."""
    dp = strategy.dp
    if dp is None:
        return {}
    last = {"dp_noise_multiplier": dp.releases[-1]} if dp.releases else {}
    return {"epsilon": dp.epsilon(), **last, "dp_clip_norm": dp.clip_norm}


def plain_round(
    grid: MeteredGrid, strategy: ModelSpaceStrategy, server_round: int, rounds: int, arrays: ArrayRecord,
    timeout: float,
) -> RoundResult:
    """Send each sampled node its state, collect the replies, merge them."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    done = 0

    def progress(reply: Message) -> None:
        nonlocal done
        done += 1
        loss = reply_metric(reply, "train_loss")
        status = "failed" if reply.has_error() else f"loss {loss:.3f}" if loss is not None else "no loss reported"
        log(INFO, "round %d/%d: client %d/%d done (%s)", server_round, rounds, done, len(messages), status)

    replies = exchange(grid, messages, timeout, progress)
    aggregating = time.perf_counter()
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    aggregate_seconds = time.perf_counter() - aggregating
    processes = sorted({p for r in replies if None not in (p := (reply_metric(r, "pid"), reply_metric(r, "model-builds")))})
    train_seconds = {
        strategy.nodes[node].partition_id: seconds for r in replies
        if (node := strategy.reply_node(r)) in strategy.nodes and (seconds := reply_metric(r, "train-seconds")) is not None
    }
    return RoundResult(arrays, metrics, len(messages) - len(replies), processes, train_seconds, aggregate_seconds)


# No fine-tuning moves a weight by this much: a global update with a larger entry is corrupt.
ABSURD_ENTRY = 1e4


def check_global_update(global_delta: Delta, server_round: int) -> None:
    """Fail the round, before anything is evaluated or checkpointed, if the new global update is
    not finite or absurdly large; the run can resume from the last good round."""
    for module, tensor in global_delta.items():
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if not math.isfinite(largest) or largest > ABSURD_ENTRY:
            raise RuntimeError(
                f"round {server_round}: the merged global update of {module} has an entry of {largest:.3g} "
                f"(non-finite or above {ABSURD_ENTRY:g}); the round is discarded and nothing is checkpointed. "
                "Resume from an earlier round (resume-round) with stricter max-update-norm / aggregation settings"
            )


def checkpoint(recorder: RunRecorder, strategy: ModelSpaceStrategy, global_delta: Delta, server_round: int) -> None:
    """Save what a resumed run needs to continue after `server_round`."""
    cfg = strategy.cfg
    save_state(recorder.out_dir, RunState(
        server_round, global_delta, strategy.optimizer_state, recorder.rounds,
        cfg.as_dict(), cfg.digest(), capture_rng(),
    ), keep=cfg.keep_checkpoints)
