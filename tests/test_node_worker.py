"""The node's resident worker (`fedllm node`) and the authenticated channel the ClientApp reaches it by.

The worker runs here in a thread of the test process, serving real handlers on a real Unix
socket; the deployment test (tests/test_deploy_worker.py) runs it as its own process beside a
real SuperNode.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from client import channel as channel_module
from client.channel import ChannelError, accept, connect
from client.handlers import HANDLERS
from client.node_worker import SECRET_NAME, SOCKET_NAME, NodeWorkerError, call, serve
from fedllm.config import RunConfig
from fedllm.core.local import MODEL_BUILDS
from fedllm.methods import build_method
from fedllm.models import load_model
from fedllm.seeds import refactor_seed

SECRET = b"s" * channel_module.SECRET_BYTES


@pytest.fixture
def short_dir():
    """A folder with a path short enough for a Unix socket (pytest's tmp_path can be too long)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fw", dir="/tmp") as folder:
        yield Path(folder) / "node"


def running(folder: Path, handlers) -> tuple[threading.Event, threading.Thread]:
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(folder, handlers), kwargs={"stop": stop, "ready": ready}, daemon=True)
    thread.start()
    assert ready.wait(10), "the worker did not start listening"
    return stop, thread


@pytest.fixture
def worker(short_dir):
    """A worker serving toy handlers: `echo` doubles a number and counts calls in the node's state."""

    def echo(content: RecordDict, context: Context) -> RecordDict:
        calls = int(context.state["calls"]["n"]) + 1 if "calls" in context.state else 1
        context.state["calls"] = ConfigRecord({"n": calls})
        values = content["arrays"]["x"].numpy()
        return RecordDict({"arrays": ArrayRecord({"x": Array(values * 2)}),
                           "seen": ConfigRecord({"partition": context.node_config["partition-id"],
                                                 "node": str(context.node_id), "run": context.run_id})})

    def fail(content: RecordDict, context: Context) -> RecordDict:
        raise ValueError("the node's data file is missing")

    stop, thread = running(short_dir, {"echo": echo, "fail": fail})
    yield short_dir
    stop.set()
    thread.join(10)


def context(state: RecordDict | None = None) -> Context:
    return Context(run_id=7, node_id=2**64 - 5, node_config={"partition-id": 3}, state=state or RecordDict(),
                   run_config={"local-steps": 2})


def test_a_call_returns_the_handlers_reply_and_carries_the_node_state_both_ways(worker):
    node = context()
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.arange(4, dtype=np.float32))})})
    for expected_calls in (1, 2):
        reply = call(worker, "echo", content, node)
        assert reply["arrays"]["x"].numpy().tolist() == [0.0, 2.0, 4.0, 6.0]
        assert dict(reply["seen"]) == {"partition": 3, "node": str(2**64 - 5), "run": 7}  # the node's context arrived
        assert node.state["calls"]["n"] == expected_calls


def test_a_failing_handler_raises_in_the_clientapp_and_the_worker_goes_on(worker):
    with pytest.raises(NodeWorkerError, match="the node's data file is missing"):
        call(worker, "fail", RecordDict(), context())
    with pytest.raises(NodeWorkerError, match="unknown message kind 'other'"):
        call(worker, "other", RecordDict(), context())
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.ones(2, dtype=np.float32))})})
    assert call(worker, "echo", content, context())["arrays"]["x"].numpy().tolist() == [2.0, 2.0]


def test_a_caller_without_the_secret_is_refused_and_learns_nothing(worker):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(worker / SOCKET_NAME))
        with pytest.raises(ChannelError, match="does not hold this node's secret"):
            connect(sock, b"x" * channel_module.SECRET_BYTES)
    # the worker refused that caller only
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.ones(1, dtype=np.float32))})})
    assert call(worker, "echo", content, context())["arrays"]["x"].numpy().tolist() == [2.0]


def test_the_worker_folder_and_secret_are_owner_only_and_a_readable_secret_is_refused(worker):
    assert (worker.stat().st_mode & 0o777) == 0o700
    assert ((worker / SECRET_NAME).stat().st_mode & 0o777) == 0o600
    assert ((worker / SOCKET_NAME).stat().st_mode & 0o777) == 0o600
    os.chmod(worker / SECRET_NAME, 0o644)
    with pytest.raises(NodeWorkerError, match="must be 0600"):
        call(worker, "echo", RecordDict(), context())


def test_no_worker_is_an_error_that_says_how_to_start_one(short_dir):
    with pytest.raises(NodeWorkerError, match=f"fedllm node --dir {short_dir}"):
        call(short_dir, "train", RecordDict(), context())


def test_a_second_worker_on_the_same_folder_is_refused_and_the_first_goes_on(worker):
    with pytest.raises(NodeWorkerError, match="already listens"):
        serve(worker, {}, stop=threading.Event())
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.ones(1, dtype=np.float32))})})
    assert call(worker, "echo", content, context())["arrays"]["x"].numpy().tolist() == [2.0]


def handshaken():
    """A client's and a worker's channel after the handshake, and the raw socket under the worker's."""
    left, right = socket.socketpair()
    ends = {}
    thread = threading.Thread(target=lambda: ends.setdefault("worker", accept(right, SECRET)))
    thread.start()
    client = connect(left, SECRET)
    thread.join(5)
    return client, ends["worker"], right


def on_the_wire(client, raw: socket.socket, payload: bytes) -> bytes:
    """The bytes a frame of `payload` takes on the wire."""
    client.send(payload)
    return raw.recv(8 + len(payload) + channel_module.TAG_BYTES, socket.MSG_WAITALL)


def fed(worker, data: bytes):
    """`worker` now reads `data`, as if it had arrived on its socket."""
    sender, worker.sock = socket.socketpair()
    sender.sendall(data)
    return sender


def test_a_tampered_frame_is_refused():
    client, worker, raw = handshaken()
    frame = bytearray(on_the_wire(client, raw, b"train"))
    frame[8] ^= 1
    fed(worker, bytes(frame))
    with pytest.raises(ChannelError, match="failed authentication"):
        worker.receive()


def test_a_replayed_frame_is_refused():
    client, worker, raw = handshaken()
    frame = on_the_wire(client, raw, b"once")
    fed(worker, frame + frame)
    assert worker.receive() == b"once"
    with pytest.raises(ChannelError, match="failed authentication"):
        worker.receive()


def test_a_frame_over_the_bound_is_refused_before_it_is_read():
    _, worker, _ = handshaken()
    fed(worker, struct.pack(">Q", 2**62))  # the length alone: reading on would block
    with pytest.raises(ChannelError, match="over the limit"):
        worker.receive()


def test_a_caller_of_another_protocol_version_is_refused():
    left, right = socket.socketpair()
    left.sendall(b"fedllm-node-worker/0\n" + b"n" * channel_module.NONCE_BYTES)
    with pytest.raises(ChannelError, match="fedllm versions differ"):
        accept(right, SECRET)
    left.close()
    right.close()


def test_the_worker_builds_the_model_once_for_a_runs_train_and_evaluate_messages(short_dir):
    """Real handlers on the builtin model: two rounds of train and evaluate through the worker use
    one model, built once, in one process."""
    run_config = {"model": "builtin:micro", "local-steps": 2, "batch-size": 4, "evaluation": "clients",
                  "test-per-task": 2, "train-per-task": 8}
    cfg = RunConfig.from_flower(run_config)
    base, _ = load_model(cfg.model)
    method = build_method(cfg, base)
    sent = method.sent_state(method.zero_update(), cfg.lora_rank, refactor_seed(cfg.seed, 1))
    arrays = ArrayRecord({name: Array(t.numpy()) for name, t in sent.state.items()})
    node = Context(run_id=1, node_id=11, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                   run_config=run_config)
    before = MODEL_BUILDS.get("builtin:micro", 0)
    stop, thread = running(short_dir, HANDLERS)
    try:
        replies = []
        for server_round in (1, 2):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
            replies.append(call(short_dir, "train", content, node)["metrics"])
            scores = call(short_dir, "evaluate", RecordDict({"arrays": arrays}), node)["scores"]
            assert sum(scores["examples"]) > 0
    finally:
        stop.set()
        thread.join(10)
    # one build for the run (another test of this process may have built the same model before)
    assert replies[0]["model-builds"] == replies[1]["model-builds"] == MODEL_BUILDS["builtin:micro"] <= before + 1
    assert {r["pid"] for r in replies} == {os.getpid()}
    assert all(r["train_loss"] > 0 for r in replies)


def test_a_process_serving_a_second_run_lets_go_of_the_first_runs_model():
    """A resident worker outlives runs: building the next run's model drops the last run's."""
    import gc
    import weakref

    from fedllm.core.local import worker_for

    first_cfg, second_cfg = (RunConfig.from_flower({"model": "builtin:micro", "seed": seed}) for seed in (0, 1))
    first = worker_for(first_cfg)
    assert worker_for(first_cfg) is first, "the same run keeps its worker"
    released = weakref.ref(first.base)
    del first
    second = worker_for(second_cfg)
    gc.collect()
    assert released() is None, "the first run's model is still held"
    assert worker_for(second_cfg) is second
