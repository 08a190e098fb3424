"""Training a model towards aligned targets: `α · CE(hard labels) + (1 − α) · CE(soft targets)`
over the answer tokens (FedMKT's objective, Fan et al. 2024, §3; the soft term is the KL to the
teacher up to the teacher's entropy, a constant). Prompts are never learned, as in local training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedllm.cooperation.align import Target
from fedllm.data.format import Prompter
from fedllm.train import IGNORE, collate, encode


def _batch(prompter: Prompter, targets: Sequence[Target], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids, hard labels, and per position the soft target as a dense (ids, probs) pair of k columns."""
    encoded = encode(prompter, [t.example for t in targets], max_length)
    batch = collate(encoded, prompter.tokenizer.pad_token_id or 0, device)
    width = max((len(s.ids) for t in targets for s in t.soft if s is not None), default=1)
    soft_ids = torch.zeros(*batch["labels"].shape, width, dtype=torch.long)
    soft_probs = torch.zeros(*batch["labels"].shape, width)
    for row, (target, (ids, labels)) in enumerate(zip(targets, encoded)):
        answer_start = next(i for i, label in enumerate(labels) if label != IGNORE)
        answer_tokens = len(labels) - answer_start
        for offset, soft in enumerate(target.soft[-answer_tokens:]):  # an answer cut to fit loses its start's targets
            if soft is not None:
                soft_ids[row, answer_start + offset, : len(soft.ids)] = torch.tensor(soft.ids)
                soft_probs[row, answer_start + offset, : len(soft.probs)] = torch.tensor(soft.probs)
    weights = torch.tensor([t.weight for t in targets], dtype=torch.float32)
    return {**batch, "soft_ids": soft_ids.to(device), "soft_probs": soft_probs.to(device), "weights": weights.to(device)}


def losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the hard-label cross-entropy and the soft one (0 where no position has a soft
    target), each a mean over the example's answer positions that have one."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["labels"].shape[1]:]  # prompt tuning puts its virtual tokens first
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels, soft_ids, soft_probs = batch["labels"][:, 1:], batch["soft_ids"][:, 1:], batch["soft_probs"][:, 1:]
    learned = labels != IGNORE
    hard = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * learned
    soft = -(logp.gather(-1, soft_ids) * soft_probs).sum(-1)
    has_soft = soft_probs.sum(-1) > 0
    hard_mean = hard.sum(1) / learned.sum(1).clamp(min=1)
    soft_mean = (soft * has_soft).sum(1) / has_soft.sum(1).clamp(min=1)
    return hard_mean, soft_mean


def distill(model: torch.nn.Module, prompter: Prompter, targets: Sequence[Target], *, steps: int, batch_size: int,
            learning_rate: float, alpha: float, seed: int, max_length: int = 512) -> list[float]:
    """AdamW on `model`'s trainable parameters for `steps` batches of `targets` (seeded random
    order, each example weighted by its `weight`); returns the loss at every step."""
    if not targets:
        return []
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(targets), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        batch = _batch(prompter, [targets[i] for i in chosen], max_length, device)
        hard, soft = losses(model, batch)
        weights = batch["weights"] / batch["weights"].sum()
        loss = (weights * (alpha * hard + (1 - alpha) * soft)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append(loss.item())
    model.eval()
    return history


@torch.no_grad()
def divergence(model: torch.nn.Module, prompter: Prompter, targets: Sequence[Target], max_length: int = 512) -> float:
    """Mean KL(soft target ‖ model) over the answer positions that have a soft target."""
    device = next(model.parameters()).device
    batch = _batch(prompter, targets, max_length, device)
    _, soft = losses(model, batch)
    probs = batch["soft_probs"][:, 1:]
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    has_soft = probs.sum(-1) > 0
    entropy_mean = (entropy * has_soft).sum(1) / has_soft.sum(1).clamp(min=1)
    present = has_soft.any(1)
    return float((soft - entropy_mean)[present].mean()) if present.any() else 0.0
