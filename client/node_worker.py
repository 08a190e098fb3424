"""A node's resident worker: one process beside the SuperNode that keeps the base model loaded for
the whole run and handles every message the node's ClientApp forwards to it.

Flower 1.42 runs each message in a fresh `flwr-clientapp` process, so without it a node loads its
model (and imports torch, transformers and peft) twice per round. Started with `fedllm node --dir
FOLDER` and named in the SuperNode's `--node-config "node-worker='FOLDER' ..."`, the worker
listens on `FOLDER/worker.sock` (a Unix socket, owner-only) and authenticates every caller with
the node-local secret in `FOLDER/secret` (`client.channel`). A call is three frames each way:
the call's header, the node's `context.state`, the message content, all Flower records in
Flower's own protobuf encoding (data, never code). A handler that fails answers with its error;
the worker goes on serving.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from client.channel import SECRET_BYTES, Channel, ChannelError, accept, connect

log = logging.getLogger(__name__)

SOCKET_NAME, SECRET_NAME = "worker.sock", "secret"
NODE_CONFIG_KEY = "node-worker"  # node-config key naming the worker's folder
HANDSHAKE_SECONDS = 30.0  # a caller that connects and says nothing is dropped after this
MAX_SOCKET_PATH = 100  # Unix socket paths are limited to ~104-108 bytes
Handler = Callable[[RecordDict, Context], RecordDict]


class NodeWorkerError(RuntimeError):
    """The worker is not there, not ours, or its handler failed; the message says what to do."""


def _encode(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def _decode(payload: bytes) -> RecordDict:
    """Flower records from an authenticated frame (protobuf: data only, never code)."""
    try:
        proto = RecordDictProto()
        proto.ParseFromString(payload)
        return recorddict_from_proto(proto)
    except Exception as error:  # protobuf's DecodeError, or records Flower refuses to build
        raise ChannelError(f"a frame is not Flower records: {type(error).__name__}: {error}") from None


def _header(kind: str, context: Context) -> RecordDict:
    return RecordDict({
        "call": ConfigRecord({"kind": kind, "run-id": str(context.run_id), "node-id": str(context.node_id)}),
        "run-config": ConfigRecord(dict(context.run_config)),
        "node-config": ConfigRecord(dict(context.node_config)),
    })


def _context(header: RecordDict, state: RecordDict) -> tuple[str, Context]:
    call = header.config_records["call"]
    context = Context(run_id=int(call["run-id"]), node_id=int(call["node-id"]),
                      node_config=dict(header.config_records["node-config"]), state=state,
                      run_config=dict(header.config_records["run-config"]))
    return str(call["kind"]), context


def socket_path(folder: Path) -> Path:
    path = folder / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise NodeWorkerError(f"the worker's socket path {path} is longer than {MAX_SOCKET_PATH} bytes, the limit "
                              "of Unix sockets; choose a shorter --dir")
    return path


def read_secret(folder: Path) -> bytes:
    """The node-local secret; refused if anyone but its owner may read it."""
    path = folder / SECRET_NAME
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes()
    except FileNotFoundError:
        raise NodeWorkerError(f"no node worker secret at {path}: start the worker with `fedllm node --dir {folder}`, "
                              f"or remove {NODE_CONFIG_KEY} from the SuperNode's --node-config") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise NodeWorkerError(f"{path} may be read by others (mode {stat.S_IMODE(mode):04o}); it must be 0600")
    if len(secret) != SECRET_BYTES:
        raise NodeWorkerError(f"{path} holds {len(secret)} bytes, not a {SECRET_BYTES}-byte secret; restart the worker")
    return secret


# --------------------------------------------------------------------------------------------
# the ClientApp's side
# --------------------------------------------------------------------------------------------


def call(folder: Path, kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Have the worker in `folder` handle a message: the reply's content; `context.state` is
    updated with the worker's."""
    secret = read_secret(folder)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(socket_path(folder)))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NodeWorkerError(f"no node worker listens at {folder / SOCKET_NAME}: start it with `fedllm node "
                                  f"--dir {folder}` beside the SuperNode") from None
        channel = connect(sock, secret)
        for records in (_header(kind, context), context.state, content):
            channel.send(_encode(records))
        status, state, reply = (_decode(channel.receive()) for _ in range(3))
    error = str(status.config_records["status"]["error"])
    if error:
        raise NodeWorkerError(f"the node worker failed on a {kind} message: {error}")
    for name in list(context.state):
        del context.state[name]
    context.state.update(state)
    return reply


# --------------------------------------------------------------------------------------------
# the worker's side
# --------------------------------------------------------------------------------------------


def fresh_secret(folder: Path) -> bytes:
    """Write a fresh secret into `folder` (a restarted worker gets a new one, so a stale caller is
    refused); the secret."""
    secret = secrets.token_bytes(SECRET_BYTES)
    path = folder / SECRET_NAME
    temporary = folder / f".{SECRET_NAME}.{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret)
    os.replace(temporary, path)
    return secret


def listen(folder: Path) -> socket.socket:
    """The worker's listening socket in `folder` (made owner-only); a stale socket file is replaced,
    a live worker's is not."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = socket_path(folder)
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise NodeWorkerError(f"a node worker already listens at {path}; stop it first or choose another --dir")
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o600)
    server.listen(8)
    return server


def handle(channel: Channel, handlers: Mapping[str, Handler]) -> None:
    """One call: read the three frames, run the handler, answer with the state and the reply (or the error)."""
    header, state, content = (_decode(channel.receive()) for _ in range(3))
    kind, context = _context(header, state)
    try:
        if kind not in handlers:
            raise NodeWorkerError(f"unknown message kind {kind!r}")
        reply, error = handlers[kind](content, context), ""
    except Exception as failure:  # the node's ClientApp raises it; Flower reports it to the server
        log.exception("node worker: the %s handler failed", kind)
        reply, error = RecordDict(), f"{type(failure).__name__}: {failure}"
    for records in (RecordDict({"status": ConfigRecord({"error": error})}), context.state, reply):
        channel.send(_encode(records))


def serve(folder: Path, handlers: Mapping[str, Handler], stop: threading.Event | None = None,
          ready: threading.Event | None = None) -> None:
    """Serve calls one at a time until `stop` is set (or forever); callers without the secret,
    and broken frames, end their own connection only."""
    server = listen(folder)
    secret = fresh_secret(folder)
    server.settimeout(0.5)
    log.info("node worker %d listening at %s", os.getpid(), folder / SOCKET_NAME)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                try:
                    connection.settimeout(HANDSHAKE_SECONDS)
                    channel = accept(connection, secret)
                    connection.settimeout(None)  # a call lasts as long as the training it asks for
                    handle(channel, handlers)
                except (ChannelError, OSError) as refused:
                    log.warning("node worker: a call was refused: %s", refused)
    finally:
        server.close()
        socket_path(folder).unlink(missing_ok=True)
