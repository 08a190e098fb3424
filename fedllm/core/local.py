"""The client's half of a round, without Flower: what a client process keeps between rounds (the
base model, its adapters, its data) and `local_round`, one round of local training on it.

A client process serves many rounds (and in simulation many simulated clients), so the base model
is built once per process and only adapter weights change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedllm.config import RunConfig
from fedllm.cooperation.align import Target
from fedllm.cooperation.distill import distill
from fedllm.data import Example, client_share, load_examples, load_splits, train_test_split
from fedllm.data.format import Prompter
from fedllm.emulator import FULL, EmulatorError, LayerMap, instantiate, load_cached, save_cached, verified
from fedllm.evaluation import Scores, context_length, score
from fedllm.methods import PeftMethod, Tensors, build_method
from fedllm.models import cache_dir, load_model, load_tokenizer, pick_device
from fedllm.seeds import local_training_seed, validation_seed
from fedllm.train import Encoded, encode, train_steps

log = logging.getLogger(__name__)

MODEL_BUILDS: dict[str, int] = {}  # base model (or emulator) -> times built in this process (reported to the server)


class Worker:
    """One base model (the full one, or an emulator) with the run's PEFT method: an adapter per
    rank, encoded data per share."""

    def __init__(self, cfg: RunConfig, name: str, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 layer_map: LayerMap | None = None) -> None:
        self.cfg, self.name, self.tokenizer = cfg, name, tokenizer
        self.device = pick_device()
        self.base = base.to(self.device)
        self.method = build_method(cfg, self.base, layer_map)
        self.peft_model: PeftModel | None = None
        self.data: dict[tuple, list[Encoded]] = {}
        MODEL_BUILDS[name] = MODEL_BUILDS.get(name, 0) + 1
        log.info("client process %d built base model %s", os.getpid(), name)

    def adapter(self, rank: int) -> tuple[PeftModel, str]:
        """The peft model with the adapter for `rank` active (created on first use), and its name."""
        name = self.method.adapter_name(rank)
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.base, self.method.peft_config(rank), adapter_name=name)
        elif name not in self.peft_model.peft_config:
            self.peft_model.add_adapter(name, self.method.peft_config(rank))
        self.peft_model.set_adapter(name)
        return self.peft_model, name

    def prompter(self, cfg: RunConfig) -> Prompter:
        return Prompter(self.tokenizer, cfg.prompt_format)

    def training_data(self, cfg: RunConfig, node: NodeSettings) -> list[Encoded]:
        """This client's training examples, encoded once."""
        key = (node.data_path, cfg.dataset, cfg.partition, node.partition_id, node.num_partitions, cfg.seed,
               cfg.train_per_task, cfg.baseline, cfg.evaluation, cfg.prompt_format)
        if key not in self.data:
            context = getattr(self.base.config, "max_position_embeddings", 512) - self.method.virtual_tokens()
            self.data[key] = encode(Prompter(self.tokenizer, cfg.prompt_format), client_examples(cfg, node), min(context, 512))
        return self.data[key]


def client_examples(cfg: RunConfig, node: NodeSettings) -> list[Example]:
    """The node's training examples: its own file (less its held-out share when clients evaluate),
    or its share of the run's dataset (all of it for the centralized baseline)."""
    if node.data_path and cfg.baseline == "centralized":
        raise ValueError("baseline 'centralized' pools the run's dataset, which a node's own data-path is not "
                         "part of; run the baseline in simulation")
    if node.data_path:
        return own_splits(cfg, node.data_path)[0] if cfg.evaluation != "server" else load_examples(node.data_path)
    train, _, _ = run_splits(cfg)
    if cfg.baseline == "centralized":
        return train
    return client_share(train, cfg.partition, node.partition_id, node.num_partitions, cfg.seed)


def client_test_examples(cfg: RunConfig, node: NodeSettings) -> list[Example]:
    """What the node scores the global model on: the held-out share of its own file, or its share
    of the run's test split (partitioned as the training split, so it follows the node's tasks)."""
    if node.data_path:
        return own_splits(cfg, node.data_path)[1]
    _, _, test = run_splits(cfg)
    try:
        return client_share(test, cfg.partition, node.partition_id, node.num_partitions, cfg.seed)
    except ValueError as error:
        raise ValueError(f"the test split cannot give every client a held-out share ({error}); raise "
                         "test-per-task / test-fraction or use evaluation = 'server'") from None


def run_splits(cfg: RunConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """The run's training, validation and test examples: `validation-fraction` of each task's
    training examples is held out before the training split is partitioned, so no client trains on
    it (none without validation-fraction)."""
    train, test = load_splits(cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                              test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction)
    if cfg.validation_fraction == 0:
        return train, [], test
    train, validation = train_test_split(train, cfg.validation_fraction, validation_seed(cfg.seed))
    return train, validation, test


def own_splits(cfg: RunConfig, path: str) -> tuple[list[Example], list[Example]]:
    """A node's own file split as the run splits a file dataset (`test-fraction` of each task held out)."""
    return load_splits(path, seed=cfg.seed, train_per_task=cfg.train_per_task, test_per_task=cfg.test_per_task,
                       test_fraction=cfg.test_fraction)


@dataclass(frozen=True)
class NodeSettings:
    """Per-node settings from `node-config`, with the run config as fallback."""

    partition_id: int
    num_partitions: int
    rank: int
    data_path: str
    client_model: str = FULL  # 'full' or 'emulator:<keep>'

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], cfg: RunConfig) -> NodeSettings:
        """From a node's `node-config` (Flower's `context.node_config`)."""
        partition_id = int(node.get("partition-id", 0))
        return cls(
            partition_id=partition_id,
            num_partitions=int(node.get("num-partitions", 1)),
            rank=int(node.get("lora-rank", cfg.rank_for_partition(partition_id))),
            data_path=str(node.get("data-path", "")),
            client_model=str(node.get("client-model", cfg.client_model_for_partition(partition_id))),
        )


@dataclass(frozen=True)
class LocalResult:
    """One round of local training: the update to upload and what the reply reports."""

    update: dict[str, torch.Tensor]
    loss: float
    examples: int
    seconds: float  # wall time of the training itself


def local_round(
    cfg: RunConfig, node: NodeSettings, worker: Worker, received: dict[str, torch.Tensor], server_round: int,
    steps: int, teacher: Sequence[Target] = (),
) -> LocalResult:
    """Train `steps` steps from the received state (after `client-distill-steps` on the server
    model's answers `teacher`, in cooperation). Seeded per (seed, round, partition), so a round can
    be replayed exactly."""
    started = time.perf_counter()
    data = worker.training_data(cfg, node)
    model, adapter = worker.adapter(node.rank)
    seed = local_training_seed(cfg.seed, server_round, node.partition_id)
    worker.method.install(model, adapter, received)
    torch.manual_seed(seed)  # dropout draws from the global RNG
    if teacher and cfg.client_distill_steps:
        distill(model, worker.prompter(cfg), teacher, steps=cfg.client_distill_steps, batch_size=cfg.batch_size,
                learning_rate=cfg.distill_learning_rate, alpha=cfg.distill_alpha, seed=seed,
                max_length=context_length(model) or 512)
    update, loss = train_installed(cfg, worker.method, model, adapter, received, data, steps, seed,
                                   worker.tokenizer.pad_token_id)
    return LocalResult(update, loss, len(data), time.perf_counter() - started)


def local_evaluation(cfg: RunConfig, node: NodeSettings, worker: Worker, received: Tensors) -> Scores:
    """Score the received global state on the node's held-out examples."""
    model, adapter = worker.adapter(node.rank)
    worker.method.install(model, adapter, received)
    return score(model, Prompter(worker.tokenizer, cfg.prompt_format), client_test_examples(cfg, node),
                 max_length=context_length(model))


def train_round(
    cfg: RunConfig, method: PeftMethod, model: PeftModel, adapter: str, received: Tensors, data: list[Encoded],
    steps: int, seed: int, pad_id: int,
) -> tuple[Tensors, float]:
    """Install the received state in `adapter`, train `steps` AdamW steps on `data`, and return the
    upload (`method.upload` of trained vs received) and the mean training loss."""
    method.install(model, adapter, received)
    torch.manual_seed(seed)  # dropout draws from the global RNG
    return train_installed(cfg, method, model, adapter, received, data, steps, seed, pad_id)


def train_installed(
    cfg: RunConfig, method: PeftMethod, model: PeftModel, adapter: str, received: Tensors, data: list[Encoded],
    steps: int, seed: int, pad_id: int,
) -> tuple[Tensors, float]:
    """`train_round` after the received state is installed: train, and the upload and mean loss."""
    with proximal_term(model, cfg.fedprox_mu):
        loss = train_steps(model, data, steps=steps, batch_size=cfg.batch_size,
                           learning_rate=cfg.client_learning_rate(), seed=seed, pad_id=pad_id)
    return method.upload(method.trained(model, adapter), received, cfg.additive_uploads()), loss


@contextlib.contextmanager
def proximal_term(model: torch.nn.Module, mu: float) -> Iterator[None]:
    """FedProx (Li et al., MLSys 2020, arXiv 1812.06127): while training, each trainable parameter's
    gradient gains μ·(θ − θ₀), the gradient of (μ/2)·‖θ − θ₀‖², θ₀ its value on entry (what the
    server sent). With PEFT the parameters are the adapter's (LoRA's factors, prompt tables), as in
    OpenFedLLM's FedProx; gradient clipping then applies to the sum."""
    if mu == 0:
        yield
        return
    handles = []
    for param in (p for p in model.parameters() if p.requires_grad):
        start = param.detach().clone()
        handles.append(param.register_hook(lambda grad, param=param, start=start: grad + mu * (param.detach() - start)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_WORKERS: dict[str, Worker] = {}  # "<run config digest>:<model>" -> the worker, while that run is this process's latest


def _worker(cfg: RunConfig, model: str, build: Callable[[], Worker]) -> Worker:
    """This run's worker of `model` ('' for the full base model), built on first use. Building one
    drops the workers of other runs: a resident node worker serves runs one after another, and
    each would otherwise keep its base model in memory for good."""
    run = cfg.digest()
    key = f"{run}:{model}"
    if key not in _WORKERS:
        for other in [k for k in _WORKERS if not k.startswith(f"{run}:")]:
            del _WORKERS[other]
        _WORKERS[key] = build()
    return _WORKERS[key]


def worker_for(cfg: RunConfig) -> Worker:
    """The process-wide worker of a run on the full base model, built on first use."""
    def build() -> Worker:
        base, tokenizer = load_model(cfg.model, pick_device())
        return Worker(cfg, cfg.model, base, tokenizer)
    return _worker(cfg, "", build)


def model_worker(cfg: RunConfig, name: str) -> Worker:
    """The process-wide worker of another model than the server's (cooperation), built on first use."""
    def build() -> Worker:
        base, tokenizer = load_model(name, pick_device())
        return Worker(cfg, name, base, tokenizer)
    return _worker(cfg, name, build)


def emulator_cache() -> Path:
    """Where a node keeps the emulators it was sent (for client processes that start per message)."""
    return cache_dir() / "emulators"


def emulator_worker(cfg: RunConfig, identity: dict, weights: dict[str, torch.Tensor] | None) -> Worker:
    """The worker of the emulator a train message names: built from the weights it carries (the
    first message of a run), else from this process or the node's cache; the digest is checked."""
    digest = str(identity["digest"])

    def build() -> Worker:
        if weights is not None:
            emulator = verified(str(identity["config"]), tuple(int(i) for i in identity["kept"]),
                                str(identity["prefix"]), weights, digest)
            save_cached(emulator, emulator_cache())
        elif (emulator := load_cached(emulator_cache(), digest)) is None:
            raise EmulatorError(f"emulator {digest[:12]} is not on this node (its cache {emulator_cache()} was "
                                "cleared?); the server sends it again in the node's next round")
        model, layer_map = instantiate(emulator), emulator.layer_map.with_adapters(cfg.emulator_adapters)
        return Worker(cfg, f"emulator:{digest[:12]}", model, load_tokenizer(cfg.model), layer_map)
    return _worker(cfg, f"emulator:{digest}", build)
