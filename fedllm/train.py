"""Local training and exact-match evaluation for any causal LM (with or without adapters)."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedllm.data.example import Example
from fedllm.data.format import prompt_text

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # (input ids, labels with the prompt masked out)


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """Token ids of prompt + answer + eos; only the answer and eos are learned."""
    encoded = []
    for example in examples:
        prompt = tokenizer(prompt_text(example), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:max_length]
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
    max_new_tokens: int, batch_size: int = 128,
) -> list[str]:
    """Greedy continuations of each example's prompt, cut at eos.

    Prompts are batched by equal length, so there is no padding and no position shift. Not
    `generate`: with peft's prompt-learning methods (peft 0.21, transformers 5) it gets only the
    first token right.
    """
    device = next(model.parameters()).device
    prompts = [tokenizer(prompt_text(e), add_special_tokens=False)["input_ids"] for e in examples]
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


def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 128,
) -> dict[str, float]:
    """Exact-match accuracy per task (answers compared after stripping surrounding spaces)."""
    longest = max(len(tokenizer(e.output, add_special_tokens=False)["input_ids"]) for e in examples)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens=longest + 2, batch_size=batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for example, answer in zip(examples, answers):
        hits[example.task].append(answer.strip() == example.output.strip())
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def mean_accuracy(per_task: dict[str, float]) -> float:
    """Unweighted mean over tasks, so a large task does not hide a small one."""
    return sum(per_task.values()) / len(per_task)
