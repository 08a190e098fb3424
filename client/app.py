"""The ClientApp: hand each message to the node's resident worker (`node-worker` in the SuperNode's
node-config), or handle it in this process (`client.handlers`).

In deployment Flower starts a fresh process per message, so this module stays light: torch,
transformers and the handlers are imported only when this process handles a message itself.
Every training reply reports where its time went besides training: `startup-seconds`, from this
process's start to the message reaching the ClientApp (Flower's per-message process: spawning it,
importing flwr and this module), and `overhead-seconds`, the message's time in the ClientApp outside
training (importing torch and the handlers, loading the model, the hop to the worker).
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client import node_worker

app = ClientApp()
STARTUP, OVERHEAD = "startup-seconds", "overhead-seconds"  # a training reply's metrics


def _process_start() -> list[float]:
    """When this process started, if Flower started it to handle messages (`flwr-clientapp`, as in
    deployment); a simulation's Ray actor starts long before its first message, not for it."""
    process = psutil.Process()
    return [process.create_time()] if any("flwr-clientapp" in part for part in process.cmdline()) else []


_STARTED = _process_start()  # emptied by the first message


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client mod, for runs with `secure-aggregation = true` only."""
    if context.run_config.get("secure-aggregation") is True:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition, rank and data size (no data leaves the node)."""
    return Message(handled("query", msg.content, context), reply_to=msg)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Load the global state the server sent, train `local-steps` steps, upload the change."""
    return Message(handled("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global state on this node's held-out examples; only the scores leave the node."""
    return Message(handled("evaluate", msg.content, context), reply_to=msg)


def handled(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply's content, from the node's worker if it has one, else from this process."""
    arrived = time.time()
    startup = arrived - _STARTED.pop() if _STARTED else 0.0
    folder = context.node_config.get(node_worker.NODE_CONFIG_KEY)
    if folder:
        reply = node_worker.call(Path(str(folder)).expanduser(), kind, content, context)
    else:
        from client.handlers import HANDLERS  # torch, transformers, peft: only where the work happens here

        reply = HANDLERS[kind](content, context)
    _report_overhead(reply, startup, time.time() - arrived)
    return reply


def _report_overhead(reply: RecordDict, startup: float, handled_seconds: float) -> None:
    """Add the process's start-up and the message's seconds outside training to a training reply's metrics."""
    metrics = reply.get("metrics")
    if isinstance(metrics, MetricRecord) and isinstance(metrics.get("train-seconds"), float):
        metrics[STARTUP] = max(0.0, startup)
        metrics[OVERHEAD] = max(0.0, handled_seconds - float(metrics["train-seconds"]))
