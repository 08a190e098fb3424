"""Checks every client reply must pass before it enters the aggregate.

Each check raises `ReplyRejected` naming the node and the problem (the round leaves that reply out,
logs the reason and counts it in the round's metrics), or, for a start-up answer, `NodeRefused`
(the node is left out of the run, with the reason in summary.json).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.cooperation.knowledge import IDS, KNOWLEDGE, LENGTHS, LOGPROBS, MAX_ANSWER_TOKENS, Answer, BadKnowledge, from_arrays
from fedllm.core.nodes import NodeInfo, NodeRefused, ReplyRejected
from fedllm.evaluation import LOSS, POOLED, Scores
from fedllm.wire import UploadCodec, decode, wire_entries, wire_names


LARGEST_PARTITION = 2**31 - 1


@dataclass(frozen=True)
class NodeBounds:
    """What the run accepts in a start-up answer: derived from the server's model and the config."""

    max_rank: int  # max-client-rank, and at most the smallest adapted layer's min(d_in, d_out)
    max_examples: int  # max-client-examples


def checked_node(node: int, content: RecordDict, bounds: NodeBounds) -> NodeInfo:
    """The node's start-up answer as a `NodeInfo`, every field checked against `bounds` first;
    `NodeRefused` naming the node and the field otherwise."""
    info = content.get("node")
    if not isinstance(info, (MetricRecord, ConfigRecord)):
        raise NodeRefused(f"node {node}: its start-up answer has no 'node' record (it has {sorted(content) or 'none'})")
    values = {}
    for key, low, high in (("partition-id", 0, LARGEST_PARTITION), ("lora-rank", 1, bounds.max_rank),
                           ("num-examples", 1, bounds.max_examples)):
        value = info.get(key)
        if value is None:
            raise NodeRefused(f"node {node}: its start-up answer has no {key}")
        if not _is_int(value) or not low <= value <= high:
            raise NodeRefused(f"node {node}: {key} is {_shown(value)}, expected an integer in [{low}, {high}]")
        values[key] = value
    return NodeInfo(values["partition-id"], values["lora-rank"], values["num-examples"], _client_model(node, content))


def _client_model(node: int, content: RecordDict) -> str:
    """The client model a node reported ('full' from nodes that say nothing of it), a short string."""
    record = content.get("node-model")
    if record is None:
        return "full"
    value = record.get("client-model", "full") if isinstance(record, ConfigRecord) else None
    if not isinstance(value, str) or not 0 < len(value) <= 100:
        raise NodeRefused(f"node {node}: client-model is {_shown(value)}, expected a short string")
    return value


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


def check_rank(node: int, metrics: MetricRecord | ConfigRecord) -> int:
    """The rank the reply reports (whether it was sent this round is the aggregator's to say)."""
    rank = metrics.get("lora-rank")
    if not _is_int(rank) or rank <= 0:
        raise ReplyRejected(f"node {node}: lora-rank is {_shown(rank)}, expected a positive int")
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
    wire, limits = {}, wire_entries(shapes, codec)
    for name, dtype in expected.items():
        check_declared(node, name, arrays[name], dtype, limits[name], f"with upload-dtype {codec.dtype} ")
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


NPY_HEADER_BYTES = 4096  # numpy's .npy header is at most a few hundred bytes


def check_declared(node: int, name: str, array: object, dtype: np.dtype, max_entries: int, why: str = "") -> None:
    """An array's declared type, dtype, shape and byte size within what the run expects, checked
    before a byte of it is decoded (a node cannot make the server decode a 256 MiB array)."""
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise ReplyRejected(f"node {node}: {name} is not a numpy array record")
    if array.dtype != str(dtype):
        raise ReplyRejected(f"node {node}: {name} has dtype {array.dtype}; {why}the server accepts {dtype} only")
    entries = math.prod(array.shape) if all(_is_int(d) and d >= 0 for d in array.shape) else -1
    if not 0 <= entries <= max_entries or len(array.data) > entries * dtype.itemsize + NPY_HEADER_BYTES:
        raise ReplyRejected(f"node {node}: {name} declares shape {tuple(array.shape)[:8]} and {len(array.data)} bytes, "
                            f"more than the {max_entries} entries it can hold; not decoded")


def checked_knowledge(node: int, content: RecordDict, prompts: int, top_k: int, vocabulary: int) -> list[Answer]:
    """A cooperating node's answers to the round's public prompts (`fedllm.cooperation.knowledge`):
    each array's declared size bounded before it is decoded, then every value checked."""
    record = content.get(KNOWLEDGE)
    if not isinstance(record, ArrayRecord):
        raise ReplyRejected(f"node {node}: its reply has no '{KNOWLEDGE}' record of answers to the public prompts")
    rows = prompts * MAX_ANSWER_TOKENS
    limits = {LENGTHS: (np.dtype(np.int64), prompts), IDS: (np.dtype(np.int64), rows * top_k),
              LOGPROBS: (np.dtype(np.float32), rows * top_k)}
    if set(record) != set(limits):
        raise ReplyRejected(f"node {node}: knowledge arrays {sorted(record)[:5]}, expected {sorted(limits)}")
    for name, (dtype, entries) in limits.items():
        check_declared(node, name, record[name], dtype, entries)
    try:
        return from_arrays({name: record[name].numpy() for name in limits}, prompts=prompts, top_k=top_k,
                           max_tokens=MAX_ANSWER_TOKENS, vocabulary=vocabulary)
    except BadKnowledge as error:
        raise ReplyRejected(f"node {node}: {error}") from None


def check_examples(node: int, metrics: MetricRecord | ConfigRecord, info: NodeInfo | None) -> int:
    """A positive integer example count, at most what the node reported at start-up."""
    examples = metrics.get("num-examples")
    if not _is_int(examples):
        raise ReplyRejected(f"node {node}: num-examples is {_shown(examples)}, expected a positive integer")
    if examples <= 0:
        raise ReplyRejected(f"node {node} reported {examples} training examples; it must be > 0")
    if info is None:
        raise ReplyRejected(f"node {node} never answered the start-up query; its reply is not taken")
    if examples > info.num_examples:
        raise ReplyRejected(f"node {node} reported an absurd {examples} training examples, "
                            f"more than the {info.num_examples} it reported at start-up")
    return examples


MAX_EVAL_TASKS = 256  # tasks an evaluation reply may report
MAX_TASK_NAME = 200  # characters of a task name
MAX_EVAL_LOSS = 1e4  # a token loss above this is no model's (log of the largest vocabulary is ~13)


def checked_scores(node: int, content: RecordDict, max_examples: int) -> Scores:
    """An evaluation reply's per-task scores, every field bounded before use: task names (few, short,
    distinct), example counts in [1, `max_examples`], metrics finite and in range."""
    tasks, scores = content.get("tasks"), content.get("scores")
    if not isinstance(tasks, ConfigRecord) or not isinstance(scores, MetricRecord):
        raise ReplyRejected(f"node {node}: an evaluation reply needs a 'tasks' ConfigRecord and a 'scores' "
                            f"MetricRecord (it has {sorted(content) or 'none'})")
    names = tasks.get("names")
    if (not isinstance(names, list) or not 0 < len(names) <= MAX_EVAL_TASKS
            or not all(isinstance(n, str) and 0 < len(n) <= MAX_TASK_NAME for n in names) or len(set(names)) < len(names)):
        raise ReplyRejected(f"node {node}: task names are {_shown(names)}, expected 1 to {MAX_EVAL_TASKS} distinct "
                            f"strings of at most {MAX_TASK_NAME} characters")
    counts = _checked_list(node, scores, "examples", len(names), 1, max_examples, _is_int)
    values = {metric: _checked_list(node, scores, metric, len(names), 0.0, MAX_EVAL_LOSS if metric == LOSS else 1.0,
                                    _is_real)
              for metric in POOLED}
    return Scores(dict(zip(names, counts)), {m: dict(zip(names, map(float, v))) for m, v in values.items()})


def _checked_list(node: int, record: MetricRecord, key: str, length: int, low: float, high: float, kind) -> list:  # noqa: ANN001
    values = record.get(key)
    if (not isinstance(values, list) or len(values) != length
            or not all(kind(v) and math.isfinite(v) and low <= v <= high for v in values)):
        raise ReplyRejected(f"node {node}: evaluation {key} is {_shown(values)}, expected {length} number(s) "
                            f"in [{low:g}, {high:g}]")
    return values
