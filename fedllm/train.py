"""Local training for any causal LM (with or without adapters): examples to token ids, batches, AdamW steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import torch

from fedllm.data.example import Example
from fedllm.data.format import Prompter
from fedllm.settings import Settings, positive, setting

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # (input ids, labels with the prompt masked out)


def encode(prompter: Prompter, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """Token ids of prompt + answer + its stop token (`Prompter`); only the answer and stop token
    are learned.

    A sequence longer than `max_length` loses the start of its prompt, so the whole answer is still
    learned. Only an answer + stop token longer than `max_length - 1` is itself cut: the sequence is then the
    prompt's last token and the first `max_length - 1` answer tokens (the stop token lost). The cut is written
    here, not in a helper, because the builtin models' cache key hashes this function's source.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and an answer token), got {max_length}")
    encoded = []
    for example in examples:
        prompt, answer = prompter.prompt_ids(example), prompter.answer_ids(example)
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


@dataclass(frozen=True)
class TrainingSettings(Settings):
    """Each client's local training in a round."""

    local_steps: int = setting("local-steps", 40, positive, "an integer >= 1", "optimizer steps per client per round")
    batch_size: int = setting("batch-size", 16, positive, "an integer >= 1", "examples per local step")
    fedprox_mu: float = setting(
        "fedprox-mu", 0.0, lambda v: v >= 0, "a number >= 0 (0: plain local training)",
        "FedProx: weight μ of the proximal term (μ/2)·‖θ − θ_received‖² on the trained parameters, which keeps "
        "local training near what the server sent",
    )
