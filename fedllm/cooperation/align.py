"""A teacher's answer and token distributions carried over to a student's tokenizer.

Both sides read the same text, so tokens align by the characters they cover: the exact version of
the edit-distance alignment FuseLLM and FedMKT run over token strings (which must guess where
markers such as `Ġ` or `▁` stand for a space). For a student token covering characters `[a, b)`:

- if teacher tokens start at `a` and end at `b` (the boundaries coincide), the student token gets
  the product of those teacher tokens' probabilities (the chain rule: the teacher's probability of
  that string), and each other candidate of the first of them goes to the student token with the
  same text, if there is one;
- otherwise (a teacher token crosses a student boundary) it gets no soft target, only the hard one.

The answer's end-of-turn token maps to the student's. With identical tokenizers every token aligns
one to one and the distributions carry over unchanged.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from fedllm.cooperation.knowledge import Answer
from fedllm.data.example import Example
from fedllm.data.format import Prompter


@dataclass(frozen=True)
class SoftTarget:
    """A distribution over a few student tokens at one answer position (probabilities sum to 1)."""

    ids: tuple[int, ...]
    probs: tuple[float, ...]


@dataclass(frozen=True)
class Target:
    """What a student learns from one teacher answer: the prompt with the answer as its output (the
    hard labels, in the student's tokens) and a soft target per answer token where one aligns."""

    example: Example
    soft: tuple[SoftTarget | None, ...]  # one per student answer token, the end-of-turn token included
    weight: float = 1.0


def answer_text(prompter: Prompter, ids: list[int]) -> str:
    """An answer's text from its token ids, up to the prompter's stop token."""
    if prompter.stop_id in ids:
        ids = ids[: ids.index(prompter.stop_id)]
    return prompter.tokenizer.decode(ids, skip_special_tokens=True)


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:  # noqa: ANN001 - any HF tokenizer
    """The characters `[start, end)` of the decoded text that each token adds (decoded prefix by
    prefix, so byte-level and sentencepiece markers are resolved by the tokenizer itself)."""
    spans, previous = [], 0
    for end in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:end], skip_special_tokens=True))
        spans.append((previous, length))
        previous = length
    return spans


@functools.lru_cache(maxsize=8)
def _token_texts(tokenizer) -> dict[str, int]:  # noqa: ANN001
    """Each token's text -> its id (the lowest id where texts repeat)."""
    texts: dict[str, int] = {}
    for token_id in range(len(tokenizer)):
        texts.setdefault(tokenizer.decode([token_id]), token_id)
    return texts


class VocabularyMap:
    """Teacher token id -> the student token with the same text (identity for the same vocabulary)."""

    def __init__(self, teacher, student) -> None:  # noqa: ANN001 - HF tokenizers
        self.teacher, self.student = teacher, student
        self.same = teacher is student or teacher.get_vocab() == student.get_vocab()
        self._cache: dict[int, int | None] = {}

    def __call__(self, teacher_id: int) -> int | None:
        if self.same:
            return teacher_id
        if teacher_id not in self._cache:
            self._cache[teacher_id] = _token_texts(self.student).get(self.teacher.decode([teacher_id]))
        return self._cache[teacher_id]


def align(answer: Answer, teacher: Prompter, student: Prompter, vocabulary: VocabularyMap, example: Example) -> Target:
    """The student's target from a teacher's answer to `example`'s prompt (its output is ignored)."""
    tokens = answer.tokens()
    stopped = tokens[-1] == teacher.stop_id
    text_ids = tokens[:-1] if stopped else tokens
    target_example = Example(example.instruction, example.input, answer_text(teacher, tokens), example.task)
    student_ids = student.answer_ids(target_example)
    student_text_ids = student_ids[:-1]
    t_spans, s_spans = token_spans(teacher.tokenizer, text_ids), token_spans(student.tokenizer, student_text_ids)
    starts = {span[0]: i for i, span in enumerate(t_spans) if span[1] > span[0]}
    ends = {span[1]: i for i, span in enumerate(t_spans) if span[1] > span[0]}
    soft: list[SoftTarget | None] = []
    for s_id, (a, b) in zip(student_text_ids, s_spans):
        first, last = starts.get(a), ends.get(b)
        soft.append(None if first is None or last is None or last < first
                    else _carried(answer, range(first, last + 1), s_id, vocabulary))
    soft.append(_carried(answer, [len(tokens) - 1], student.stop_id, vocabulary) if stopped else None)
    return Target(target_example, tuple(soft))


def _carried(answer: Answer, positions, student_id: int, vocabulary: VocabularyMap) -> SoftTarget | None:  # noqa: ANN001
    """The soft target of a student token standing for teacher `positions` (see the module doc)."""
    probability = 1.0
    for position in positions:
        probability *= answer.probability_of_token(position)
    if probability == 0.0:
        return None
    mass: dict[int, float] = defaultdict(float)
    mass[student_id] = probability
    first = positions[0]
    for teacher_id, p in answer.candidates(first)[1:]:  # the first candidate is the teacher's own token
        mapped = vocabulary(teacher_id)
        if mapped is not None and mapped != student_id:
            mass[mapped] += p
    total = sum(mass.values())
    ids = sorted(mass, key=lambda i: -mass[i])
    return SoftTarget(tuple(ids), tuple(mass[i] / total for i in ids))


# A train message carries the server model's answers in TEACHER_TEXTS (their prompts and texts) and
# TEACHER (their soft targets, `pack`'s arrays).
TEACHER, TEACHER_TEXTS = "server-answers", "server-answer-texts"
SOFT_COUNTS, SOFT_IDS, SOFT_PROBS = "soft-counts", "soft-ids", "soft-probs"
MAX_ANSWER_CHARS = 4000  # an answer of MAX_ANSWER_TOKENS tokens is far shorter; checked before tokenizing it


def pack(targets: list[Target]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Targets (of the same public prompts the receiver has) as their answer texts and three arrays:
    soft targets per answer, and each position's candidates (a row of zeros: none)."""
    width = max((len(s.ids) for t in targets for s in t.soft if s is not None), default=1)
    rows = [s for t in targets for s in t.soft]
    ids, probs = np.zeros((len(rows), width), dtype=np.int64), np.zeros((len(rows), width), dtype=np.float32)
    for row, soft in enumerate(rows):
        if soft is not None:
            ids[row, : len(soft.ids)], probs[row, : len(soft.probs)] = soft.ids, soft.probs
    counts = np.array([len(t.soft) for t in targets], dtype=np.int64)
    return [t.example.output for t in targets], {SOFT_COUNTS: counts, SOFT_IDS: ids, SOFT_PROBS: probs}


def unpack(prompts: list[Example], texts: list[str], arrays: dict[str, np.ndarray], student: Prompter,
           vocabulary: int) -> list[Target]:
    """`pack`'s targets for `prompts`, checked against the student's own tokenization of each text."""
    counts, ids, probs = (arrays.get(k) for k in (SOFT_COUNTS, SOFT_IDS, SOFT_PROBS))
    if counts is None or ids is None or probs is None or len(texts) != len(prompts) or counts.shape != (len(prompts),):
        raise ValueError(f"the server's answers: {len(texts)} texts and counts for {len(prompts)} prompts expected")
    if any(not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS for text in texts):
        raise ValueError(f"the server's answers: a text that is not a string of at most {MAX_ANSWER_CHARS} characters")
    if ids.shape != probs.shape or ids.ndim != 2 or ids.shape[0] != int(counts.sum()):
        raise ValueError("the server's answers: soft targets of inconsistent shapes")
    if ids.size and (ids.min() < 0 or ids.max() >= vocabulary) or not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("the server's answers: token ids outside the vocabulary or probabilities not finite and >= 0")
    targets, start = [], 0
    for prompt, text, count in zip(prompts, texts, counts.tolist()):
        example = Example(prompt.instruction, prompt.input, text, prompt.task)
        if count != len(student.answer_ids(example)):
            raise ValueError("the server's answers: soft targets do not match the answers' tokens")
        soft = tuple(SoftTarget(tuple(ids[r][probs[r] > 0].tolist()), tuple(probs[r][probs[r] > 0].tolist()))
                     if (probs[r] > 0).any() else None for r in range(start, start + count))
        targets.append(Target(example, soft))
        start += count
    return targets
