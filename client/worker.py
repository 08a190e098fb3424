"""What a client process keeps between messages (the base model, its adapters, its data), and
one round of local training on it.

Flower reuses a worker process for many messages (rounds, and in simulation many simulated
clients), so the base model is built once per process and only adapter weights change.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from flwr.app import Context

from peft import PeftModel, get_peft_model

from fedllm.config import RunConfig
from fedllm.data import Example, client_share, load_examples, load_splits
from fedllm.methods import build_method
from fedllm.models import load_model, pick_device
from fedllm.train import Encoded, encode, train_steps

log = logging.getLogger(__name__)

MODEL_BUILDS: dict[str, int] = {}  # model name -> times built in this process (reported to the server)


@dataclass
class Worker:
    """One base model with the run's PEFT method: an adapter per rank, encoded data per share."""

    model_name: str
    cfg: RunConfig
    peft_model: PeftModel | None = None
    data: dict[tuple, list[Encoded]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = pick_device()
        self.base, self.tokenizer = load_model(self.model_name, self.device)
        self.method = build_method(self.cfg, self.base)
        MODEL_BUILDS[self.model_name] = MODEL_BUILDS.get(self.model_name, 0) + 1
        log.info("client process %d built base model %s", os.getpid(), self.model_name)

    def adapter(self, rank: int) -> tuple[PeftModel, str]:
        """The peft model with the adapter for `rank` active (created on first use), and its name."""
        name = self.method.adapter_name(rank)
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.base, self.method.peft_config(rank), adapter_name=name)
        elif name not in self.peft_model.peft_config:
            self.peft_model.add_adapter(name, self.method.peft_config(rank))
        self.peft_model.set_adapter(name)
        return self.peft_model, name

    def training_data(self, cfg: RunConfig, partition_id: int, num_partitions: int, data_path: str) -> list[Encoded]:
        """This client's encoded training examples: its own file, or its share of the run's dataset."""
        key = (data_path, cfg.dataset, cfg.partition, partition_id, num_partitions, cfg.seed, cfg.train_per_task)
        if key not in self.data:
            examples: list[Example]
            if data_path and cfg.baseline == "centralized":
                raise ValueError("baseline 'centralized' pools the run's dataset, which a node's own data-path is not "
                                 "part of; run the baseline in simulation")
            if data_path:
                examples = load_examples(data_path)
            else:
                train, _ = load_splits(
                    cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                    test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction,
                )
                pooled = cfg.baseline == "centralized"
                examples = train if pooled else client_share(train, cfg.partition, partition_id, num_partitions, cfg.seed)
            limit = getattr(self.base.config, "max_position_embeddings", 512)
            self.data[key] = encode(self.tokenizer, examples, min(limit, 512))
        return self.data[key]


@dataclass(frozen=True)
class NodeSettings:
    """Per-node settings from `node-config`, with the run config as fallback."""

    partition_id: int
    num_partitions: int
    rank: int
    data_path: str

    @classmethod
    def from_context(cls, context: Context, cfg: RunConfig) -> NodeSettings:
        node = context.node_config
        partition_id = int(node.get("partition-id", 0))
        return cls(
            partition_id=partition_id,
            num_partitions=int(node.get("num-partitions", 1)),
            rank=int(node.get("lora-rank", cfg.rank_for_partition(partition_id))),
            data_path=str(node.get("data-path", "")),
        )


@dataclass(frozen=True)
class LocalResult:
    """One round of local training: the update to upload and what the reply reports."""

    update: dict[str, torch.Tensor]
    loss: float
    examples: int
    seconds: float  # wall time of the training itself


def local_round(
    cfg: RunConfig, node: NodeSettings, received: dict[str, torch.Tensor], server_round: int, steps: int,
) -> LocalResult:
    """Train `steps` steps from the received state. Seeded per (seed, round, partition), so a round
    can be replayed exactly."""
    started = time.perf_counter()
    worker = worker_for(cfg)
    data = worker.training_data(cfg, node.partition_id, node.num_partitions, node.data_path)
    model, adapter = worker.adapter(node.rank)
    worker.method.install(model, adapter, received)
    seed = cfg.seed * 100_003 + server_round * 1009 + node.partition_id
    torch.manual_seed(seed)  # dropout draws from the global RNG
    loss = train_steps(
        model, data, steps=steps, batch_size=cfg.batch_size, learning_rate=cfg.client_learning_rate(),
        seed=seed, pad_id=worker.tokenizer.pad_token_id,
    )
    update = worker.method.upload(worker.method.trained(model, adapter), received, cfg.additive_uploads())
    return LocalResult(update, loss, len(data), time.perf_counter() - started)


_WORKERS: dict[str, Worker] = {}


def worker_for(cfg: RunConfig) -> Worker:
    """The process-wide worker of a run (its base model and PEFT method), built on first use."""
    key = cfg.digest()
    if key not in _WORKERS:
        _WORKERS[key] = Worker(cfg.model, cfg)
    return _WORKERS[key]
