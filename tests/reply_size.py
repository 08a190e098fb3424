"""The serialized size of a train reply, built from zeros: what a client's reported upload bytes must be."""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedllm.wire import wire_names
from server.grid import content_bytes


def serialized_reply_size(shapes: dict[str, torch.Size], codec) -> int:
    """The size of a train reply carrying an upload of these tensors, built here from zeros."""
    arrays = {}
    for name, dtype in wire_names(shapes, codec).items():
        tensor = name.rsplit("::", 1)[0] if codec.sparse else name
        length = math.ceil(codec.density * shapes[tensor].numel())
        arrays[name] = Array(np.zeros(length if codec.sparse else tuple(shapes[name]), dtype=dtype))
    metrics = MetricRecord({"num-examples": 0, "train_loss": 0.0, "train-seconds": 0.0, "partition-id": 0,
                            "lora-rank": 0, "pid": 0, "model-builds": 0, "startup-seconds": 0.0,
                            "overhead-seconds": 0.0})
    return content_bytes(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}))
