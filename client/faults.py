"""Fault injection, a testing aid: make a partition's ClientApp send a bad reply on purpose.

The run-config key `fault-injection` (e.g. `"1:nan,2:shape"`) names partitions and what their
ClientApp does to its training reply, so the server's reply validation can be tested end to end
in simulation and in deployment:

| kind | what the reply gets |
|---|---|
| `nan` | one NaN entry in the first tensor |
| `shape` | the first tensor loses its last row |
| `missing` | the last tensor is left out |
| `extra` | an additional tensor the server never sent |
| `dtype` | every array as float64 (the server accepts only the run's `upload-dtype`) |
| `norm` | every uploaded LoRA `B` (change) ×1e6, so the model-space update grows about ×1e6 |
| `examples-zero` | `num-examples = 0` |
| `examples-absurd` | `num-examples = 10^12` |
| `metrics-type` | `train_loss` as text (e.g. `'0.513'`, in a ConfigRecord) instead of a number |
| `crash` | the ClientApp raises an exception (Flower turns it into an error reply) |
| `hang` | the ClientApp sleeps `round-timeout` + 5 s, so its reply arrives after its round closed |

Three act on a cooperating node's answers to the public prompts (`knowledge`, see
`fedllm.cooperation.knowledge`):

| kind | what the answers get |
|---|---|
| `knowledge-nan` | one NaN log-probability |
| `knowledge-top-k` | each token's last candidate dropped (fewer than `distill-top-k`) |
| `knowledge-vocab` | a token id beyond any vocabulary (2^40) |

Three more act on the node's start-up answer instead (the server's node checks):

| kind | what the start-up answer gets |
|---|---|
| `query-rank` | `lora-rank = 0` |
| `query-missing` | no `num-examples` |
| `query-examples` | `num-examples = 10^9` |
"""

from __future__ import annotations

import math
import time

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedllm.config import FAULT_KINDS, RunConfig
from fedllm.cooperation.knowledge import IDS, LOGPROBS

Metrics = MetricRecord | ConfigRecord
HANG_LATE_SECONDS = 5.0  # how long after its round closed a `hang` reply arrives


class InjectedFault(RuntimeError):
    """The `crash` fault: an exception raised in the ClientApp on purpose."""


def apply(cfg: RunConfig, partition_id: int, arrays: ArrayRecord, metrics: MetricRecord) -> tuple[ArrayRecord, Metrics]:
    """The training reply's records after every fault `fault-injection` sets for this partition."""
    for kind in cfg.faults_for(partition_id):
        if kind not in _ON_QUERY and kind not in _ON_KNOWLEDGE:
            arrays, metrics = inject(kind, arrays, metrics, hang_seconds=cfg.round_timeout + HANG_LATE_SECONDS)
    return arrays, metrics


def apply_to_knowledge(cfg: RunConfig, partition_id: int, knowledge: ArrayRecord) -> ArrayRecord:
    """The answers to the public prompts after the knowledge faults set for this partition."""
    for kind in cfg.faults_for(partition_id):
        if kind in _ON_KNOWLEDGE:
            arrays = {name: array.numpy().copy() for name, array in knowledge.items()}
            knowledge = ArrayRecord({name: Array(array) for name, array in _ON_KNOWLEDGE[kind](arrays).items()})
    return knowledge


def apply_to_query(cfg: RunConfig, partition_id: int, info: MetricRecord) -> MetricRecord:
    """The start-up answer's `node` record after the query faults set for this partition."""
    for kind in cfg.faults_for(partition_id):
        if kind in _ON_QUERY:
            info = _ON_QUERY[kind](dict(info))
    return info


def inject(kind: str, arrays: ArrayRecord, metrics: Metrics, *, hang_seconds: float = 3600.0) -> tuple[ArrayRecord, Metrics]:
    """Corrupt a training reply's `arrays` and `metrics` as `kind` says (see the table above)."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; kinds: {', '.join(FAULT_KINDS)}")
    if kind == "crash":
        raise InjectedFault("injected fault 'crash': the ClientApp raised on purpose")
    if kind == "hang":
        time.sleep(hang_seconds)
        return arrays, metrics
    if kind in _ON_QUERY or kind in _ON_KNOWLEDGE:
        raise ValueError(f"fault kind {kind!r} acts on the start-up answer or the public answers, not on the update")
    if kind in _ON_METRICS:
        return arrays, _ON_METRICS[kind](dict(metrics))
    state = arrays.to_torch_state_dict()
    return ArrayRecord(_ON_TENSORS[kind](state)), metrics


def _first(state: dict[str, torch.Tensor]) -> str:
    return next(iter(state))


def _nan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = _first(state)
    tensor = state[key].clone()
    tensor.view(-1)[0] = math.nan
    return {**state, key: tensor}


def _shape(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = _first(state)
    return {**state, key: state[key][:-1].clone()}


def _missing(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(list(state.items())[:-1])


def _extra(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**state, "injected.extra.weight": torch.zeros(2, 2)}


def _dtype(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.double() for key, tensor in state.items()}


def _norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    factors_b = [key for key in state if ".lora_B." in key]
    scaled = factors_b or list(state)  # no LoRA factors: scale every tensor
    return {key: tensor * 1e6 if key in scaled else tensor for key, tensor in state.items()}


def _examples_zero(values: dict) -> MetricRecord:
    return MetricRecord({**values, "num-examples": 0})


def _examples_absurd(values: dict) -> MetricRecord:
    return MetricRecord({**values, "num-examples": 10**12})


def _metrics_type(values: dict) -> ConfigRecord:
    return ConfigRecord({**values, "train_loss": str(values.get("train_loss", "0.5"))})


_ON_TENSORS = {"nan": _nan, "shape": _shape, "missing": _missing, "extra": _extra, "dtype": _dtype, "norm": _norm}
_ON_METRICS = {"examples-zero": _examples_zero, "examples-absurd": _examples_absurd, "metrics-type": _metrics_type}


def _query_rank(values: dict) -> MetricRecord:
    return MetricRecord({**values, "lora-rank": 0})


def _query_missing(values: dict) -> MetricRecord:
    return MetricRecord({k: v for k, v in values.items() if k != "num-examples"})


def _query_examples(values: dict) -> MetricRecord:
    return MetricRecord({**values, "num-examples": 10**9})


_ON_QUERY = {"query-rank": _query_rank, "query-missing": _query_missing, "query-examples": _query_examples}


def _knowledge_nan(arrays: dict) -> dict:
    arrays[LOGPROBS][0, 0] = math.nan
    return arrays


def _knowledge_top_k(arrays: dict) -> dict:
    return {**arrays, IDS: arrays[IDS][:, :-1].copy(), LOGPROBS: arrays[LOGPROBS][:, :-1].copy()}


def _knowledge_vocab(arrays: dict) -> dict:
    arrays[IDS][0, -1] = 2**40
    return arrays


_ON_KNOWLEDGE = {"knowledge-nan": _knowledge_nan, "knowledge-top-k": _knowledge_top_k, "knowledge-vocab": _knowledge_vocab}
