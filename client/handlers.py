"""What a node does with each message: answer the server's node query, train from the state it
sends and upload the change, score the global state on the node's own held-out data.

Each handler maps a message's content and the node's `Context` to the reply's content. They run
in the ClientApp's own process, or in the node's resident worker (`client.node_worker`), which
keeps the base model loaded for the whole run.

Node settings come from the SuperNode's `node-config` (in simulation Flower fills in
`partition-id` and `num-partitions`): `lora-rank` overrides the run's rank, `data-path` points
at the node's own data file instead of a share of the run's dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER

from client import faults
from client.cooperation import cooperation_inputs, knowledge_record
from client.privacy import privatize, released_metrics, reported_examples
from client.secure import secure_reply
from fedllm.config import RunConfig
from fedllm.core.local import (
    MODEL_BUILDS, NodeSettings, Worker, client_examples, emulator_worker, local_evaluation, local_round, model_worker,
    worker_for,
)
from fedllm.cooperation.knowledge import KNOWLEDGE
from fedllm.emulator import EMULATOR_RECORD, WEIGHTS_RECORD, ClientModel
from fedllm.evaluation import POOLED
from fedllm.logs import quiet_third_party
from fedllm.wire import encode

Handler = Callable[[RecordDict, Context], RecordDict]
RESIDUAL = "upload-residual"  # context.state record: error feedback of sparse uploads


def _setup(context: Context) -> tuple[RunConfig, NodeSettings]:
    quiet_third_party(FLOWER_LOGGER.handlers)
    cfg = RunConfig.from_flower(context.run_config)
    return cfg, NodeSettings.from_node_config(context.node_config, cfg)


def query(content: RecordDict, context: Context) -> RecordDict:
    """Tell the server this node's partition, rank and data size (no data leaves the node)."""
    cfg, node = _setup(context)
    info = faults.apply_to_query(cfg, node.partition_id, MetricRecord({
        "partition-id": node.partition_id, "lora-rank": node.rank,
        "num-examples": reported_examples(cfg, len(client_examples(cfg, node)))}))
    return RecordDict({"node": info, "node-model": ConfigRecord({"client-model": node.client_model})})


def train(content: RecordDict, context: Context) -> RecordDict:
    """Load the global state the server sent, train `local-steps` steps, upload the change."""
    cfg, node = _setup(context)
    if cfg.secure_aggregation:
        return secure_reply(content, cfg, node)
    received = content["arrays"].to_torch_state_dict()
    config = content["config"]
    server_round = int(config["server-round"])
    worker = worker_for_message(cfg, node, content)
    public, teacher = cooperation_inputs(cfg, worker, content)
    result = local_round(cfg, node, worker, received, server_round, int(config.get("local-steps", cfg.local_steps)),
                         teacher)
    update, _ = privatize(cfg, result.update, server_round, node.partition_id)  # local DP only here
    metrics = MetricRecord(released_metrics(cfg, {
        "num-examples": reported_examples(cfg, result.examples), "train_loss": result.loss,
        "train-seconds": result.seconds, "partition-id": node.partition_id, "lora-rank": node.rank,
        "pid": os.getpid(), "model-builds": MODEL_BUILDS[worker.name],
    }))
    arrays, metrics = faults.apply(cfg, node.partition_id, upload_record(cfg, update, context), metrics)
    knowledge = {}
    if public:
        answers = knowledge_record(cfg, worker, node, public, server_round)
        knowledge[KNOWLEDGE] = faults.apply_to_knowledge(cfg, node.partition_id, answers)
    return RecordDict({"arrays": arrays, "metrics": metrics, **knowledge})


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Score the global state the server sent on this node's held-out examples; only the scores
    (per task: examples, exact match, ROUGE-L, loss) leave the node."""
    cfg, node = _setup(context)
    scores = local_evaluation(cfg, node, worker_for(cfg), content["arrays"].to_torch_state_dict())
    tasks = list(scores.counts)
    values = {metric: [float(scores.values[metric][t]) for t in tasks] for metric in POOLED}
    return RecordDict({
        "tasks": ConfigRecord({"names": tasks}),
        "scores": MetricRecord({"examples": [scores.counts[t] for t in tasks], **values}),
    })


HANDLERS: dict[str, Handler] = {"query": query, "train": train, "evaluate": evaluate}


def worker_for_message(cfg: RunConfig, node: NodeSettings, content: RecordDict) -> Worker:
    """The full base model's worker, that of the emulator the message names, or that of the node's
    own other model (cooperation)."""
    if ClientModel.parse(node.client_model).other is not None:
        return model_worker(cfg, node.client_model)
    if EMULATOR_RECORD not in content:
        return worker_for(cfg)
    weights = content.get(WEIGHTS_RECORD)
    return emulator_worker(cfg, dict(content[EMULATOR_RECORD]), None if weights is None else weights.to_torch_state_dict())


def upload_record(cfg: RunConfig, update: dict[str, torch.Tensor], context: Context) -> ArrayRecord:
    """The upload as wire arrays (`upload-dtype`, `upload-sparsity`). With a sparse upload, what
    was not sent is kept in the node's `context.state` and added to its next upload."""
    codec = cfg.upload_codec()
    residual = context.state.get(RESIDUAL) if codec.sparse else None
    wire, left = encode(update, codec, residual.to_torch_state_dict() if residual is not None else None)
    if codec.sparse:
        context.state[RESIDUAL] = ArrayRecord(left)
    return ArrayRecord({name: Array(array) for name, array in wire.items()})
