"""Cooperation on a client of another model: read the round's public prompts and the server
model's answers from a train message, and answer the prompts after training (only these answers,
as top-k token distributions, leave the node besides the update of its own model)."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

from fedllm.config import RunConfig
from fedllm.cooperation.align import TEACHER, TEACHER_TEXTS, Target, unpack
from fedllm.cooperation.knowledge import MAX_ANSWER_TOKENS, answer, to_arrays
from fedllm.cooperation.public import PUBLIC, from_lists
from fedllm.core.local import NodeSettings, Worker
from fedllm.data.example import Example
from fedllm.evaluation import context_length
from fedllm.seeds import knowledge_noise_seed


def cooperation_inputs(cfg: RunConfig, worker: Worker, content: RecordDict) -> tuple[list[Example], list[Target]]:
    """This round's public prompts, and the server model's answers to last round's (in this
    model's tokens) to learn from first; both empty without cooperation."""
    if PUBLIC not in content:
        return [], []
    prompts = from_lists(dict(content[PUBLIC]), cfg.public_prompts)
    if TEACHER not in content:
        return prompts, []
    texts = dict(content[TEACHER_TEXTS])
    taught = from_lists(texts, cfg.public_prompts)
    arrays = {name: array.numpy() for name, array in content[TEACHER].items()}
    targets = unpack(taught, list(texts.get("answer", [])), arrays, worker.prompter(cfg), len(worker.tokenizer))
    return prompts, targets


def knowledge_record(cfg: RunConfig, worker: Worker, node: NodeSettings, prompts: list[Example],
                     server_round: int) -> ArrayRecord:
    """The trained model's answers to the public prompts, with the top-k of every token (noised
    by `knowledge-noise`, seeded per round and partition)."""
    model, _ = worker.adapter(node.rank)
    answers = answer(model, worker.prompter(cfg), prompts, top_k=cfg.distill_top_k,
                     max_new_tokens=MAX_ANSWER_TOKENS, max_length=context_length(model), noise=cfg.knowledge_noise,
                     seed=knowledge_noise_seed(cfg.seed, server_round, node.partition_id))
    return ArrayRecord({name: Array(array) for name, array in to_arrays(answers).items()})
