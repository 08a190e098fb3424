"""A model's knowledge on public prompts: its greedy answer to each, with the top-k candidates of
every answer token's distribution. This is all that leaves a node in cooperation (no weights, no
private data), so the server checks it like an update before using it: counts, shapes, token ids
within the vocabulary, log-probabilities finite, sorted and summing to at most one.

On the wire it is three arrays: `lengths` (answer tokens per prompt, the end-of-turn token
included when the answer stopped), `ids` and `logprobs` (one row of k candidates per answer token,
the model's own token first: answers are greedy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.data.example import Example
from fedllm.data.format import Prompter
from fedllm.evaluation import equal_length_batches, greedy, prompts_for_generation

KNOWLEDGE = "knowledge"  # the reply record that carries a node's answers
LENGTHS, IDS, LOGPROBS = "lengths", "ids", "logprobs"
SLACK = 1e-3  # float32 rounding allowed in a row's total probability and in its order
MAX_ANSWER_TOKENS = 48  # tokens of an answer to a public prompt, its end-of-turn token included


class BadKnowledge(ValueError):
    """Knowledge that must not be learned from (a node's reply is rejected with this reason)."""


@dataclass(frozen=True)
class Answer:
    """One greedy answer: `ids[i]`, `logprobs[i]` the top-k candidates at answer token `i`, best first."""

    ids: torch.Tensor  # (tokens, k) int64
    logprobs: torch.Tensor  # (tokens, k) float32

    def tokens(self) -> list[int]:
        return self.ids[:, 0].tolist()

    def probability_of_token(self, position: int) -> float:
        """The model's probability of its own token at `position`."""
        return math.exp(float(self.logprobs[position, 0]))

    def candidates(self, position: int) -> list[tuple[int, float]]:
        """(token id, probability) of the top-k at `position`, best first."""
        return [(int(i), math.exp(float(p))) for i, p in zip(self.ids[position], self.logprobs[position])]

    def confidence(self) -> float:
        """Mean log-probability of the answer's own tokens (FedMKT weighs teachers by this)."""
        return float(self.logprobs[:, 0].mean())


@torch.no_grad()
def answer(model: torch.nn.Module, prompter: Prompter, prompts: Sequence[Example], *, top_k: int,
           max_new_tokens: int, max_length: int | None, batch_size: int = 64, noise: float = 0.0,
           seed: int = 0) -> list[Answer]:
    """`model`'s greedy answers to `prompts` (their outputs are not read), with the top-`top_k`
    log-probabilities of every answer token. With `noise` σ > 0, Gaussian noise N(0, σ²) (seeded)
    is added to every token's log-probabilities before the token is chosen and its top-k are
    taken, renormalised: report-noisy-max, so the answers themselves blur, not only their numbers."""
    device = next(model.parameters()).device
    rows = prompts_for_generation(prompter, prompts, max_new_tokens, max_length)
    answers: list[Answer | None] = [None] * len(prompts)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    for chunk in equal_length_batches(rows, batch_size):
        steps: list[torch.return_types.topk] = []

        def scores(logits: torch.Tensor) -> torch.Tensor:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            if noise:
                drawn = torch.randn(logprobs.shape, generator=generator).to(logprobs.device)
                logprobs = torch.log_softmax(logprobs + noise * drawn, dim=-1)
            steps.append(logprobs.topk(top_k, dim=-1))
            return logprobs

        ids = torch.tensor([rows[i] for i in chunk], device=device)
        for row, (index, tokens) in enumerate(zip(chunk, greedy(model, ids, max_new_tokens, prompter.stop_id, scores))):
            length = min(len(tokens) + 1, len(steps))  # the end-of-turn token too, where the answer stopped
            answers[index] = Answer(torch.stack([steps[s].indices[row] for s in range(length)]).cpu(),
                                    torch.stack([steps[s].values[row] for s in range(length)]).cpu())
    return answers  # type: ignore[return-value]


def to_arrays(answers: Sequence[Answer]) -> dict[str, np.ndarray]:
    """The wire form (see the module doc)."""
    return {
        LENGTHS: np.array([len(a.ids) for a in answers], dtype=np.int64),
        IDS: torch.cat([a.ids for a in answers]).numpy().astype(np.int64),
        LOGPROBS: torch.cat([a.logprobs for a in answers]).numpy().astype(np.float32),
    }


def from_arrays(arrays: dict[str, np.ndarray], *, prompts: int, top_k: int, max_tokens: int, vocabulary: int) -> list[Answer]:
    """Checked answers from the wire form; `BadKnowledge` saying what is wrong. Bounds first: the
    sizes are checked before any row is read."""
    if set(arrays) != {LENGTHS, IDS, LOGPROBS}:
        raise BadKnowledge(f"knowledge arrays {sorted(arrays)}, expected {sorted((LENGTHS, IDS, LOGPROBS))}")
    lengths, ids, logprobs = arrays[LENGTHS], arrays[IDS], arrays[LOGPROBS]
    if lengths.shape != (prompts,) or lengths.dtype.kind not in "iu":
        raise BadKnowledge(f"knowledge lengths: shape {lengths.shape} {lengths.dtype}, expected ({prompts},) integers "
                           "(one answer per public prompt sent)")
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_tokens):
        raise BadKnowledge(f"knowledge lengths must be in [1, {max_tokens}] tokens, got {lengths.min()}..{lengths.max()}")
    rows = int(lengths.sum())
    for name, array, kinds in ((IDS, ids, "iu"), (LOGPROBS, logprobs, "f")):
        if array.shape != (rows, top_k) or array.dtype.kind not in kinds:
            raise BadKnowledge(f"knowledge {name}: shape {array.shape} {array.dtype}, expected ({rows}, {top_k}) "
                               f"{'integers' if kinds == 'iu' else 'floats'} (distill-top-k = {top_k})")
    if ids.size and (ids.min() < 0 or ids.max() >= vocabulary):
        raise BadKnowledge(f"knowledge ids must be token ids in [0, {vocabulary}), got {ids.min()}..{ids.max()}")
    if top_k > 1 and (np.sort(ids, axis=1)[:, 1:] == np.sort(ids, axis=1)[:, :-1]).any():
        raise BadKnowledge("knowledge ids repeat a token within a row of candidates")
    if not np.isfinite(logprobs).all():
        raise BadKnowledge("knowledge logprobs are not all finite (NaN or infinite)")
    if (logprobs > SLACK).any() or (np.diff(logprobs, axis=1) > SLACK).any():
        raise BadKnowledge("knowledge logprobs must be log-probabilities (<= 0), best first in each row")
    if rows and (np.logaddexp.reduce(logprobs.astype(np.float64), axis=1) > SLACK).any():
        raise BadKnowledge("knowledge logprobs of a row sum to more than probability 1")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [Answer(torch.from_numpy(ids[a:b].astype(np.int64)), torch.from_numpy(logprobs[a:b].astype(np.float32)))
            for a, b in zip(bounds[:-1], bounds[1:])]
