"""Checks every client reply must pass before it enters the aggregate.

Each check raises `ReplyRejected` naming the node and the problem; the strategy drops that reply,
logs the reason and counts it in the round's metrics.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.adapters import Delta
from fedllm.wire import UploadCodec, decode, wire_names


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself in the start-up query."""

    partition_id: int
    rank: int
    num_examples: int
    client_model: str = "full"  # 'full' or 'emulator:<keep>' (fedllm.emulator.ClientModel)


class ReplyRejected(ValueError):
    """A client reply that must not enter the aggregate."""


MAX_EXAMPLES_UNKNOWN_NODE = 10**9  # example-count ceiling for a node absent from the start-up table


def error_summary(reason: str, limit: int = 300) -> str:
    """An error reply's reason, short: a remote traceback is cut to its last line (the exception)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(reason)).splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    text = " ".join(lines) if len(" ".join(lines)) <= limit else lines[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reply_records(node: int, content: RecordDict) -> tuple[ArrayRecord, MetricRecord | ConfigRecord]:
    """The reply's `arrays` and `metrics` records, present and of the right kind."""
    arrays, metrics = content.get("arrays"), content.get("metrics")
    missing = [name for name, record in (("arrays", arrays), ("metrics", metrics)) if record is None]
    if missing:
        raise ReplyRejected(f"node {node}: reply has no {' or '.join(repr(m) for m in missing)} record "
                            f"(it has {sorted(content) or 'none'})")
    if not isinstance(arrays, ArrayRecord):
        raise ReplyRejected(f"node {node}: 'arrays' record is a {type(arrays).__name__}, expected an ArrayRecord")
    if not isinstance(metrics, (MetricRecord, ConfigRecord)):
        raise ReplyRejected(f"node {node}: 'metrics' record is an {type(metrics).__name__}, expected a MetricRecord")
    return arrays, metrics


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def check_train_loss(node: int, metrics: MetricRecord | ConfigRecord) -> None:
    if "train_loss" not in metrics:
        raise ReplyRejected(f"node {node}: metrics have no train_loss")
    loss = metrics["train_loss"]
    if not _is_real(loss) or not math.isfinite(loss):
        raise ReplyRejected(f"node {node}: train_loss is {_shown(loss)}, expected a finite real number")


def check_rank(node: int, metrics: MetricRecord | ConfigRecord, sent: list[int]) -> int:
    rank = metrics.get("lora-rank")
    if not _is_int(rank) or rank <= 0:
        raise ReplyRejected(f"node {node}: lora-rank is {_shown(rank)}, expected a positive int")
    if rank not in sent:
        raise ReplyRejected(f"node {node} replied with rank {rank}, but was sent rank(s) {sent}")
    return rank


def checked_upload(node: int, arrays: ArrayRecord, shapes: dict[str, torch.Size], codec: UploadCodec) -> dict[str, torch.Tensor]:
    """The reply's upload as float32 tensors, if its wire arrays are exactly the names, dtypes and
    shapes the run's upload encoding gives for `shapes`, and every value is finite."""
    expected = wire_names(shapes, codec)
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        problems = [f"{len(names)} {what} tensor(s) {names[:3]}"
                    for what, names in (("missing", missing), ("extra", extra)) if names]
        raise ReplyRejected(f"node {node}: {' and '.join(problems)} compared with the {len(expected)} expected")
    wire = {}
    for name, dtype in expected.items():
        try:
            wire[name] = arrays[name].numpy()
        except Exception as error:  # noqa: BLE001 - any unreadable array is the client's fault
            raise ReplyRejected(f"node {node}: {name} cannot be read as an array ({error})") from None
        if wire[name].dtype != dtype:
            raise ReplyRejected(f"node {node}: {name} has dtype {wire[name].dtype}; with upload-dtype "
                                f"{codec.dtype} the server accepts {dtype} only")
    try:
        upload = decode(wire, shapes, codec)
    except ValueError as error:
        raise ReplyRejected(f"node {node}: {error}") from None
    for name, tensor in upload.items():
        if not torch.isfinite(tensor).all():
            nans, infs = int(tensor.isnan().sum()), int(tensor.isinf().sum())
            raise ReplyRejected(f"node {node}: {name} contains {nans} NaN and {infs} Inf value(s)")
    return upload


def check_examples(node: int, metrics: MetricRecord | ConfigRecord, info: NodeInfo | None) -> int:
    """A positive integer example count, at most what the node reported at start-up (else 10^9)."""
    examples = metrics.get("num-examples")
    if not _is_int(examples):
        raise ReplyRejected(f"node {node}: num-examples is {_shown(examples)}, expected a positive integer")
    if examples <= 0:
        raise ReplyRejected(f"node {node} reported {examples} training examples; it must be > 0")
    if info is not None and examples > info.num_examples:
        raise ReplyRejected(f"node {node} reported an absurd {examples} training examples, "
                            f"more than the {info.num_examples} it reported at start-up")
    if examples > MAX_EXAMPLES_UNKNOWN_NODE:
        raise ReplyRejected(f"node {node} reported an absurd {examples} training examples "
                            f"(more than {MAX_EXAMPLES_UNKNOWN_NODE})")
    return examples


def check_norm(node: int, tau: Delta, limit: float | None) -> None:
    """‖τ_k‖ (L2 over all modules, model space) finite and, with `max-update-norm`, within it."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tau.values()))
    if not math.isfinite(norm):
        raise ReplyRejected(f"node {node}: its model-space update norm is not finite (overflow in s·B·A)")
    if limit is not None and norm > limit:
        raise ReplyRejected(f"node {node}: model-space update norm {norm:.4g} exceeds max-update-norm {limit:g}")
