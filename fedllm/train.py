"""Local training and exact-match evaluation for any causal LM (with or without adapters)."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedllm.data.example import Example
from fedllm.data.format import prompt_text
from fedllm.settings import Settings, positive, setting

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # (input ids, labels with the prompt masked out)


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """Token ids of prompt + answer + eos; only the answer and eos are learned.

    A sequence longer than `max_length` loses the start of its prompt, so the whole answer is still
    learned. Only an answer + eos longer than `max_length - 1` is itself cut: the sequence is then the
    prompt's last token and the first `max_length - 1` answer tokens (eos lost). The cut is written
    here, not in a helper, because the builtin models' cache key hashes this function's source.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and an answer token), got {max_length}")
    encoded = []
    for example in examples:
        prompt = tokenizer(prompt_text(example), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) > max_length:  # keep the prompt's end; cut the answer only if it must
            answer = answer[: max_length - 1]
            prompt = prompt[len(prompt) - (max_length - len(answer)) :]
        ids = prompt + answer
        labels = [IGNORE] * len(prompt) + answer
        encoded.append((ids, labels))
    return encoded


def collate(batch: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is neither attended to nor learned."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _lr_factor(step: int, steps: int, warmup_steps: int, decay: bool) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay:
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(
    model: torch.nn.Module,
    data: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    warmup_steps: int = 0,
    decay: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """AdamW on the trainable parameters for `steps` batches; returns the mean loss.

    Batches walk through seeded random permutations of `data`, so a run is reproducible.
    """
    if not data:
        raise ValueError("no training examples on this client; check the partition settings")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    total = 0.0
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(data), generator=generator).tolist()
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * _lr_factor(step, steps, warmup_steps, decay)
        loss = model(**collate(batch, pad_id, device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        total += loss.item()
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.eval()
    return total / steps


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
    max_new_tokens: int, batch_size: int = 128, *, max_length: int | None = None,
) -> list[str]:
    """Greedy continuations of each example's prompt, cut at eos.

    With `max_length` (the model's context), a prompt is cut from its left so that prompt +
    `max_new_tokens` fits; None cuts nothing. Prompts are batched by equal length, so there is no
    padding and no position shift. Not `generate`: with peft's prompt-learning methods (peft 0.21,
    transformers 5) it gets only the first token right.
    """
    device = next(model.parameters()).device
    room = _prompt_room(max_length, max_new_tokens)
    prompts = [tokenizer(prompt_text(e), add_special_tokens=False)["input_ids"] for e in examples]
    if room is not None:
        prompts = [prompt[-room:] for prompt in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    answers = [""] * len(examples)
    model.eval()
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            for row, tokens in zip(chunk, _greedy(model, ids, max_new_tokens, tokenizer.eos_token_id)):
                answers[row] = tokenizer.decode(tokens, skip_special_tokens=True)
    return answers


def _prompt_room(max_length: int | None, max_new_tokens: int) -> int | None:
    """How many of a prompt's last tokens fit before `max_new_tokens` in `max_length` (at least 1);
    None (keep them all) without a `max_length`."""
    if max_length is None:
        return None
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a new token), got {max_length}")
    if max_new_tokens >= max_length:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in max_length ({max_length}) "
            f"tokens; generate fewer tokens or pass a longer max_length"
        )
    return max_length - max_new_tokens


def _greedy(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Up to `max_new_tokens` argmax tokens after each row of `ids`, each cut before its first eos.

    With a KV cache each step feeds only the new token; peft's prompt-learning models (which use
    the cache for their own virtual tokens) recompute the whole sequence instead.
    """
    width = ids.shape[1]
    cached, name = not _prompt_learning(model), _cache_name(model)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    fed, past = ids, None
    for _ in range(max_new_tokens):
        cache = {name: past} if cached else {}  # prefix tuning brings its own cache: pass none, not None
        out = model(input_ids=fed, attention_mask=torch.ones_like(ids), use_cache=cached, **cache)
        next_ids = out.logits[:, -1].argmax(dim=-1).masked_fill(done, eos_id)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        fed, past = (next_ids[:, None], out[name]) if cached else (ids, None)
        done |= next_ids == eos_id
        if done.all():
            break
    rows = ids[:, width:].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def _cache_name(model: torch.nn.Module) -> str:
    """The KV cache's argument (and output) name: `cache` from transformers 5.24 on, before it
    `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def context_length(model: torch.nn.Module) -> int | None:
    """Positions left for real tokens: the base config's `max_position_embeddings`, less the virtual
    tokens of a peft prompt-learning method; None when the config does not say."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    positions = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    if positions is None or not _prompt_learning(model):
        return positions
    return positions - model.active_peft_config.num_virtual_tokens


def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 128,
    *, max_length: int | None = None,
) -> dict[str, float]:
    """Exact-match accuracy per task (answers compared after stripping surrounding spaces).

    With `max_length` (see `context_length`) long prompts are cut from the left, and at most
    `max_length - 1` tokens are generated, so nothing runs past the model's positions.
    """
    if not examples:
        raise ValueError("no test examples to evaluate: the test split is empty; give the data set tasks "
                         "with at least 2 examples each so that the split keeps some for testing")
    longest = max(len(tokenizer(e.output, add_special_tokens=False)["input_ids"]) for e in examples)
    new_tokens = longest + 2 if max_length is None else min(longest + 2, max_length - 1)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens=new_tokens, batch_size=batch_size,
                               max_length=max_length)
    hits: dict[str, list[bool]] = defaultdict(list)
    for example, answer in zip(examples, answers):
        hits[example.task].append(answer.strip() == example.output.strip())
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def mean_accuracy(per_task: dict[str, float]) -> float:
    """Unweighted mean over tasks, so a large task does not hide a small one."""
    return sum(per_task.values()) / len(per_task)


@dataclass(frozen=True)
class TrainingSettings(Settings):
    """Each client's local training in a round."""

    local_steps: int = setting("local-steps", 40, positive, "an integer >= 1", "optimizer steps per client per round")
    batch_size: int = setting("batch-size", 16, positive, "an integer >= 1", "examples per local step")
