"""An authenticated channel between a node's ClientApp and its resident worker, over a local socket.

Both ends hold the node-local secret. A handshake of fresh nonces proves each end knows it (the
secret itself never crosses) and derives a session key; every frame then carries a length, checked
against a bound before a byte of it is read, and an HMAC-SHA256 tag over its direction, sequence
number and bytes, checked before anything decodes it. A frame that is too long, out of order,
tampered with or replayed ends the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct

PROTOCOL = b"fedllm-node-worker/1\n"  # a changed framing or record layout changes this line
NONCE_BYTES = 32
TAG_BYTES = hashlib.sha256().digest_size
SECRET_BYTES = 32
MAX_FRAME = 2**34  # 16 GiB: above any message a node is sent (an 8B model's full LoRA state is ~0.2 GiB)
_LENGTH = struct.Struct(">Q")


class ChannelError(ConnectionError):
    """The other end is not who it should be, or broke the framing; the connection is closed."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _read_exactly(sock: socket.socket, length: int) -> bytearray:
    buffer = bytearray(length)
    view, done = memoryview(buffer), 0
    while done < length:
        got = sock.recv_into(view[done:], min(length - done, 1 << 24))
        if got == 0:
            raise ChannelError(f"the other end closed the connection ({done} of {length} bytes read)")
        done += got
    return buffer


class Channel:
    """Framed, authenticated messages in both directions over one connected socket."""

    def __init__(self, sock: socket.socket, session: bytes, sending: bytes, receiving: bytes) -> None:
        self.sock, self.session = sock, session
        self.sending, self.receiving = sending, receiving
        self.sent = self.received = 0

    def send(self, payload: bytes) -> None:
        length = _LENGTH.pack(len(payload))
        tag = _mac(self.session, self.sending, _LENGTH.pack(self.sent), length, payload)
        self.sock.sendall(length)
        self.sock.sendall(payload)
        self.sock.sendall(tag)
        self.sent += 1

    def receive(self, limit: int = MAX_FRAME) -> bytes:
        """The next frame's bytes, once its length is within `limit` and its tag is right."""
        length_bytes = bytes(_read_exactly(self.sock, _LENGTH.size))
        (length,) = _LENGTH.unpack(length_bytes)
        if length > limit:
            raise ChannelError(f"a frame of {length} bytes is over the limit of {limit}")
        payload = bytes(_read_exactly(self.sock, length))
        tag = bytes(_read_exactly(self.sock, TAG_BYTES))
        expected = _mac(self.session, self.receiving, _LENGTH.pack(self.received), length_bytes, payload)
        if not hmac.compare_digest(tag, expected):
            raise ChannelError("a frame failed authentication (tampered with, replayed or out of order)")
        self.received += 1
        return payload


def connect(sock: socket.socket, secret: bytes) -> Channel:
    """The ClientApp's end: send a nonce, check the worker's proof, prove ours."""
    ours = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(PROTOCOL + ours)
    answer = bytes(_read_exactly(sock, NONCE_BYTES + TAG_BYTES))
    theirs, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _mac(secret, b"worker", ours, theirs)):
        raise ChannelError("the process on the worker's socket does not hold this node's secret")
    sock.sendall(_mac(secret, b"client", ours, theirs))
    return Channel(sock, _mac(secret, b"session", ours, theirs), b"to-worker", b"to-client")


def accept(sock: socket.socket, secret: bytes) -> Channel:
    """The worker's end: check the protocol line, prove the secret, check the client's proof."""
    hello = bytes(_read_exactly(sock, len(PROTOCOL) + NONCE_BYTES))
    if hello[:len(PROTOCOL)] != PROTOCOL:
        raise ChannelError(f"the caller speaks {hello[:len(PROTOCOL)]!r}, not {PROTOCOL!r} (fedllm versions differ?)")
    theirs, ours = hello[len(PROTOCOL):], secrets.token_bytes(NONCE_BYTES)
    sock.sendall(ours + _mac(secret, b"worker", theirs, ours))
    proof = bytes(_read_exactly(sock, TAG_BYTES))
    if not hmac.compare_digest(proof, _mac(secret, b"client", theirs, ours)):
        raise ChannelError("the caller does not hold this node's secret")
    return Channel(sock, _mac(secret, b"session", theirs, ours), b"to-client", b"to-worker")
