"""The server's view of the wire: a Grid that measures every message and can keep an audit copy.

Everything the ServerApp sends or receives, in plain rounds and in every stage of secure
aggregation alike, passes through `MeteredGrid`, so the byte counts in `metrics.jsonl` are the
serialized sizes of the real messages, per node. With `audit_dir` set, the serialized content of
every message the server receives is also written there: what the server could have read; under
secure aggregation, so is what it decodes from them (the sum), so attacks can be tried on its view.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from safetensors.torch import save

from fedllm.outputs import private_folder, write_private

POLL_SECONDS = 0.1


def content_bytes(content: RecordDict) -> int:
    """Size of a message's content as serialized for the wire."""
    return recorddict_to_proto(content).ByteSize()


class MeteredGrid(Grid):
    """Delegates to Flower's Grid; counts bytes sent to and received from each node."""

    def __init__(self, grid: Grid, audit_dir: Path | None = None) -> None:
        self.grid = grid
        self.audit_dir = audit_dir
        self.sent: Counter[int] = Counter()
        self.received: Counter[int] = Counter()
        self.asked: dict[str, int] = {}  # message id -> node it was sent to
        self.audited = 0

    def take_counts(self) -> tuple[Counter[int], Counter[int]]:
        """Bytes sent to and received from each node since the last call; the counts restart."""
        counts = self.sent, self.received
        self.sent, self.received = Counter(), Counter()
        return counts

    def set_run(self, run):  # noqa: ANN001, ANN201 - Flower's own signature
        return self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        for message, message_id in zip(messages, ids):
            self.sent[message.metadata.dst_node_id] += content_bytes(message.content)
            self.asked[message_id] = message.metadata.dst_node_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            node = self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if not reply.has_error():
                self.received[node] += content_bytes(reply.content)
                self.audit(node, reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Through this wrapper, so secure aggregation's stages are measured too."""
        return exchange(self, messages, math.inf if timeout is None else timeout)

    def audit(self, node: int, content: RecordDict) -> None:
        if self.audit_dir is None:
            return
        private_folder(self.audit_dir)
        self.audited += 1
        write_private(self.audit_dir / f"{self.audited:06d}-node{node}.pb", recorddict_to_proto(content).SerializeToString())

    def audit_view(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors`, something the server computed from what it received, as `<name>.safetensors`."""
        if self.audit_dir is None:
            return
        private_folder(self.audit_dir)
        write_private(self.audit_dir / f"{name}.safetensors", save(tensors))


def exchange(
    grid: Grid, messages: Iterable[Message], timeout: float, on_reply: Callable[[Message], None] | None = None,
) -> list[Message]:
    """Push messages and collect replies as they arrive, until all are in or `timeout` passes."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if pending:
            time.sleep(POLL_SECONDS)
    if pending:
        log(WARNING, "%d node(s) did not reply within %.0f s; going on without them", len(pending), timeout)
    return replies
