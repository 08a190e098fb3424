"""Cooperation, server side: clients of other models than the server's teach it (FedMKT, Fan et
al., COLING 2025, arXiv 2406.02224), each round:

1. each node of another model is sent its family's merged adapter (clients of the same model are a
   family, merged with the run's operator as usual), the round's public prompts, and the server
   model's answers to last round's prompts, in its own tokens, to learn from first;
2. it trains on its private data and answers the public prompts with top-k token distributions;
3. the server checks the answers, takes per prompt the answer most nodes agree on, from its most
   confident node (`fedllm.cooperation.teachers`), aligns it to its own tokenizer, and distils it into ΔW_g: a fresh LoRA adapter
   on the exact server model `W0 + ΔW_g` is trained, and its `s·B·A` added to ΔW_g;
4. the server answers this round's prompts for the next round's clients.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from logging import INFO
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log
from peft import get_peft_model

from fedllm.config import RunConfig
from fedllm.cooperation.align import TEACHER, TEACHER_TEXTS, Target, VocabularyMap, align, answer_text, pack
from fedllm.cooperation.distill import distill, divergence
from fedllm.cooperation.knowledge import MAX_ANSWER_TOKENS, Answer, answer
from fedllm.cooperation.public import PUBLIC, public_pool, round_prompts, to_lists
from fedllm.cooperation.teachers import choose_teacher
from fedllm.core.aggregator import Aggregator, Contribution
from fedllm.core.nodes import NodeRegistry
from fedllm.core.server_model import ServerModel
from fedllm.data.example import Example
from fedllm.emulator import ClientModel
from fedllm.evaluation import context_length
from fedllm.seeds import server_distill_seed
from server.validation import checked_knowledge

PROBE = 32  # targets on which the KL to the teachers is measured before and after distilling


@dataclass
class Family:
    """The clients of one other model: their merged adapter and the model itself (to read their
    answers in its tokenizer, and to score the merged adapter)."""

    spec: str
    model: ServerModel
    aggregator: Aggregator
    to_server: VocabularyMap
    from_server: VocabularyMap


@dataclass
class Cooperation:
    """The families, the public prompts, and what the round's nodes answered."""

    cfg: RunConfig
    server: ServerModel
    nodes: NodeRegistry
    test: list[Example]
    families: dict[str, Family] = field(default_factory=dict)
    pool: list[Example] = field(default_factory=list)
    prompts: list[Example] = field(default_factory=list)  # this round's public prompts
    answers: dict[int, list[Answer]] = field(default_factory=dict)  # this round's, by node
    # last round's prompts and the server's answers to them in each family's tokens
    taught: tuple[list[Example], dict[str, list[Target]]] = field(default_factory=lambda: ([], {}))

    def __post_init__(self) -> None:
        self.pool = public_pool(self.cfg.public_dataset, self.cfg.dataset, self.cfg.seed, exclude=self.test)
        for model in self.cfg.client_models():  # the run's own, up front; a node's node-config one when it joins
            if model.other is not None:
                self.family(model.other)

    def family(self, spec: str) -> Family:
        """The family of clients of model `spec`, built on first use (`ValueError` if it cannot load)."""
        if spec not in self.families:
            model = ServerModel(self.cfg, self.test, name=spec)
            aggregator = Aggregator(self.cfg, model.method, self.nodes)
            aggregator.start()
            self.families[spec] = Family(spec, model, aggregator, VocabularyMap(model.tokenizer, self.server.tokenizer),
                                         VocabularyMap(self.server.tokenizer, model.tokenizer))
            log(INFO, "cooperation: clients of %s, %d parameters", spec, model.model.num_parameters())
        return self.families[spec]

    def family_of(self, node_id: int) -> Family | None:
        """The family of a node that trains another model (None: it trains the server's)."""
        info = self.nodes.nodes.get(node_id)
        other = ClientModel.parse(info.client_model).other if info else None
        return None if other is None else self.family(other)

    # -- a round ---------------------------------------------------------------------------------

    def begin(self, server_round: int, node_ids: list[int]) -> None:
        """The round's public prompts, and each family's states for its sampled nodes."""
        self.prompts = round_prompts(self.pool, self.cfg.public_prompts, self.cfg.seed, server_round)
        self.answers = {}
        for family in self.families.values():
            family.aggregator.begin(server_round, [n for n in node_ids if self.family_of(n) is family])

    def records(self, node_id: int, family: Family) -> dict[str, Any]:
        """A train message's records for a node of `family`."""
        records = {"arrays": ArrayRecord(family.aggregator.state_for(node_id).state),
                   PUBLIC: ConfigRecord(to_lists(self.prompts))}
        taught, answers = self.taught
        if family.spec in answers:
            texts, arrays = pack(answers[family.spec])
            records[TEACHER_TEXTS] = ConfigRecord({**to_lists(taught), "answer": texts})
            records[TEACHER] = ArrayRecord({name: Array(array) for name, array in arrays.items()})
        return records

    def checked_answers(self, node_id: int, family: Family, content: RecordDict) -> list[Answer]:
        """The node's answers to the round's prompts; `ReplyRejected` if anything is wrong with them."""
        vocabulary = family.model.model.get_output_embeddings().weight.shape[0]  # what its logits range over
        return checked_knowledge(node_id, content, len(self.prompts), self.cfg.distill_top_k, vocabulary)

    def complete(self, server_round: int, contributions: list[Contribution], answers: dict[int, list[Answer]],
                 aggregator: Aggregator) -> dict[str, Any]:
        """Merge each family's updates, distil the answers into the server model, and answer the
        round's prompts for the next; returns the round's cooperation fields."""
        for family in self.families.values():
            own = [c for c in contributions if self.family_of(c.node_id) is family]
            if own:
                family.aggregator.complete(server_round, own)
        started = time.perf_counter()
        targets, chosen = self.teacher_targets(answers)
        fields: dict[str, Any] = {"teacher_choices": chosen}
        if targets:
            fields |= self.distil(server_round, targets, aggregator)
        if self.cfg.client_distill_steps:
            self.taught = (self.prompts, self.server_answers(aggregator))
        return fields | {"cooperation_seconds": time.perf_counter() - started}

    def teacher_targets(self, answers: dict[int, list[Answer]]) -> tuple[list[Target], dict[str, int]]:
        """Per public prompt, the chosen node's answer (`choose_teacher`) aligned to the server's
        tokens; and how many prompts each partition's answer was chosen for."""
        targets: list[Target] = []
        chosen: dict[str, int] = {}
        prompters = {node: self.family_of(node).model.prompter for node in answers}
        for index, prompt in enumerate(self.prompts if answers else []):
            texts = {node: answer_text(prompters[node], found[index].tokens()) for node, found in answers.items()}
            node, agreement = choose_teacher(texts, {node: found[index].confidence() for node, found in answers.items()})
            family = self.family_of(node)
            target = align(answers[node][index], family.model.prompter, self.server.prompter, family.to_server, prompt)
            targets.append(replace(target, weight=agreement))
            partition = str(self.nodes.nodes[node].partition_id)
            chosen[partition] = chosen.get(partition, 0) + 1
        return targets, chosen

    def distil(self, server_round: int, targets: list[Target], aggregator: Aggregator) -> dict[str, Any]:
        """Train a fresh adapter on the exact server model towards `targets`; ΔW_g gains its `s·B·A`."""
        cfg, method = self.cfg, self.server.method
        method.install_global(self.server.model, aggregator.global_delta)
        student = get_peft_model(copy.deepcopy(self.server.model), method.peft_config(cfg.lora_rank))
        probe = targets[:PROBE]
        before = divergence(student, self.server.prompter, probe)
        losses = distill(student, self.server.prompter, targets, steps=cfg.distill_steps, batch_size=cfg.batch_size,
                         learning_rate=cfg.distill_learning_rate, alpha=cfg.distill_alpha,
                         seed=server_distill_seed(cfg.seed, server_round), max_length=context_length(student) or 512)
        after = divergence(student, self.server.prompter, probe)
        tau = method.model_space(method.trained(student, "default"), cfg.lora_rank)
        aggregator.commit(server_round, {m: d + tau[m] if m in tau else d for m, d in aggregator.global_delta.items()},
                          aggregator.optimizer_state)
        log(INFO, "round %d: distilled %d answers into the server model, KL to the teachers %.3f -> %.3f",
            server_round, len(targets), before, after)
        return {"distill_loss": sum(losses) / len(losses), "teacher_kl_before": before, "teacher_kl_after": after}

    def server_answers(self, aggregator: Aggregator) -> dict[str, list[Target]]:
        """The server model's answers to the round's prompts, in each family's tokens."""
        method = self.server.method
        method.install_global(self.server.model, aggregator.global_delta)
        answers = answer(self.server.model, self.server.prompter, self.prompts, top_k=self.cfg.distill_top_k,
                         max_new_tokens=MAX_ANSWER_TOKENS, max_length=context_length(self.server.model))
        return {spec: [align(a, self.server.prompter, family.model.prompter, family.from_server, p)
                       for a, p in zip(answers, self.prompts)] for spec, family in self.families.items()}

    def evaluate(self) -> dict[str, Any]:
        """Each family's merged model on the server's test split: what the clients' own models know."""
        return {"family_accuracy": {spec: family.model.evaluate(family.aggregator.global_delta).headline(self.cfg.metric)
                                    for spec, family in self.families.items()}}
