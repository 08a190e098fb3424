"""What a client process keeps between messages: the base model, its adapters, its data.

Flower reuses a worker process for many messages (rounds, and in simulation many simulated
clients), so the base model is built once per process and only adapter weights change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedllm.adapters import LoraSettings, default_target_modules
from fedllm.config import RunConfig
from fedllm.data import Example, client_share, load_examples, load_splits
from fedllm.models import load_model, pick_device
from fedllm.train import Encoded, encode

log = logging.getLogger(__name__)

MODEL_BUILDS: dict[str, int] = {}  # model name -> times built in this process (reported to the server)


@dataclass
class Worker:
    """One base model with a LoRA adapter per rank, and encoded data per client share."""

    model_name: str
    peft_model: PeftModel | None = None
    data: dict[tuple, list[Encoded]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = pick_device()
        self.base, self.tokenizer = load_model(self.model_name, self.device)
        MODEL_BUILDS[self.model_name] = MODEL_BUILDS.get(self.model_name, 0) + 1
        log.info("client process %d built base model %s", os.getpid(), self.model_name)

    def adapter(self, cfg: RunConfig, rank: int) -> PeftModel:
        """The peft model with the rank-`rank` adapter active (created on first use)."""
        targets = cfg.target_modules() or default_target_modules(self.base)
        settings = LoraSettings(rank, cfg.lora_alpha, cfg.lora_dropout, targets)
        name = f"rank{rank}"
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.base, settings.peft_config(), adapter_name=name)
        elif name not in self.peft_model.peft_config:
            self.peft_model.add_adapter(name, settings.peft_config())
        self.peft_model.set_adapter(name)
        return self.peft_model

    def load_factors(self, rank: int, state: dict[str, torch.Tensor]) -> None:
        """Install the factors the server sent (all keys must match the adapter's)."""
        name = f"rank{rank}"
        expected = set(get_peft_model_state_dict(self.peft_model, adapter_name=name))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"server sent adapter keys that do not match this model: missing {missing}, extra {extra}")
        result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected adapter keys {result.unexpected_keys[:3]}")

    def factors(self, rank: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().float() for k, v in get_peft_model_state_dict(self.peft_model, adapter_name=f"rank{rank}").items()}

    def training_data(self, cfg: RunConfig, partition_id: int, num_partitions: int, data_path: str) -> list[Encoded]:
        """This client's encoded training examples: its own file, or its share of the run's dataset."""
        key = (data_path, cfg.dataset, cfg.partition, partition_id, num_partitions, cfg.seed, cfg.train_per_task)
        if key not in self.data:
            examples: list[Example]
            if data_path:
                examples = load_examples(data_path)
            else:
                train, _ = load_splits(
                    cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                    test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction,
                )
                examples = client_share(train, cfg.partition, partition_id, num_partitions, cfg.seed)
            limit = getattr(self.base.config, "max_position_embeddings", 512)
            self.data[key] = encode(self.tokenizer, examples, min(limit, 512))
        return self.data[key]


_WORKERS: dict[str, Worker] = {}


def worker_for(model_name: str) -> Worker:
    """The process-wide worker for a base model, built on first use."""
    if model_name not in _WORKERS:
        _WORKERS[model_name] = Worker(model_name)
    return _WORKERS[model_name]
