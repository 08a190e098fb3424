"""Scoring a model on held-out examples, per task: exact match and ROUGE-L of its greedy answers,
and the token-level loss (and perplexity) of the reference answers; and pooling the scores of
several evaluators (the clients, each on its own split) into one.

Answers are generated greedily with a KV cache, also for peft's prompt-learning methods: their
virtual tokens (or prefix) enter the cache on the first step, the base model continues from it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.data.example import Example
from fedllm.data.format import Prompter
from fedllm.settings import ConfigError, Settings, choice, positive, setting
from fedllm.train import IGNORE, collate, encode

EXACT_MATCH, ROUGE_L, LOSS, PERPLEXITY = "exact-match", "rouge-l", "loss", "perplexity"
HEADLINES = (EXACT_MATCH, ROUGE_L)  # what `metric` may pick: in [0, 1], higher is better
POOLED = (EXACT_MATCH, ROUGE_L, LOSS)  # what an evaluator reports; perplexity = exp(loss) follows
LOGIT_FLOATS = 2**26  # logits kept at once when scoring the loss (256 MB): rows per batch follow from the vocabulary


def mean_over_tasks(per_task: dict[str, float]) -> float:
    """Unweighted mean over tasks, so a large task does not hide a small one."""
    return sum(per_task.values()) / len(per_task)


@dataclass(frozen=True)
class Scores:
    """Per-task means of each metric in `POOLED`, over `counts[task]` examples of the task."""

    counts: dict[str, int]
    values: dict[str, dict[str, float]]  # metric -> task -> mean

    def headline(self, metric: str) -> float:
        return mean_over_tasks(self.values[metric])

    def metrics(self) -> dict[str, dict[str, float]]:
        """Every metric per task, perplexity included."""
        perplexity = {task: math.exp(min(loss, 700.0)) for task, loss in self.values[LOSS].items()}
        return {**self.values, PERPLEXITY: perplexity}

    def fields(self, metric: str, prefix: str = "") -> dict[str, Any]:
        """A metrics row's fields: the headline as `accuracy`, its per-task values, every metric per task."""
        return {f"{prefix}accuracy": self.headline(metric), f"{prefix}per_task_accuracy": self.values[metric],
                f"{prefix}metrics": self.metrics(), f"{prefix}examples": self.counts}

    @staticmethod
    def pooled(scores: Sequence[Scores]) -> Scores:
        """Several evaluators' scores as one: per task, each metric weighted by its examples there."""
        counts: dict[str, int] = defaultdict(int)
        sums: dict[str, dict[str, float]] = {metric: defaultdict(float) for metric in POOLED}
        for score in scores:
            for task, count in score.counts.items():
                counts[task] += count
                for metric in POOLED:
                    sums[metric][task] += count * score.values[metric][task]
        tasks = sorted(counts)
        return Scores({t: counts[t] for t in tasks}, {m: {t: sums[m][t] / counts[t] for t in tasks} for m in POOLED})


def score(
    model: torch.nn.Module, prompter: Prompter, examples: Sequence[Example], *, max_length: int | None = None,
    batch_size: int = 128,
) -> Scores:
    """Every metric of `model` on `examples`, per task.

    With `max_length` (see `context_length`) long prompts are cut from the left, and at most
    `max_length - 1` tokens are generated, so nothing runs past the model's positions.
    """
    if not examples:
        raise ValueError("no test examples to evaluate: the test split is empty; give the data set tasks "
                         "with at least 2 examples each so that the split keeps some for testing")
    longest = max(len(prompter.answer_ids(e)) for e in examples)
    new_tokens = longest + 1 if max_length is None else min(longest + 1, max_length - 1)
    answers = generate_answers(model, prompter, examples, new_tokens, batch_size, max_length=max_length)
    losses = answer_losses(model, prompter, examples, max_length or 2**31)
    per_example = {
        EXACT_MATCH: [float(a.strip() == e.output.strip()) for a, e in zip(answers, examples)],
        ROUGE_L: [rouge_l(a, e.output) for a, e in zip(answers, examples)],
        LOSS: losses,
    }
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_task[example.task].append(index)
    tasks = sorted(by_task)
    return Scores({t: len(by_task[t]) for t in tasks},
                  {m: {t: sum(v[i] for i in by_task[t]) / len(by_task[t]) for t in tasks} for m, v in per_example.items()})


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004) of `prediction` against `reference`, by Google's `rouge-score`
    (lower-cased words of letters and digits; 0 when either has none)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@torch.no_grad()
def answer_losses(model: torch.nn.Module, prompter: Prompter, examples: Sequence[Example], max_length: int) -> list[float]:
    """Each example's mean token cross-entropy of its reference answer (teacher forced, stop token
    included), in the order given."""
    device = next(model.parameters()).device
    encoded = encode(prompter, examples, max_length)
    width = max(len(ids) for ids, _ in encoded)
    rows = max(1, LOGIT_FLOATS // (width * _vocabulary(model)))
    losses: list[float] = []
    model.eval()
    for start in range(0, len(encoded), rows):
        batch = collate(encoded[start : start + rows], prompter.tokenizer.pad_token_id or 0, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1] :]  # prompt tuning puts its virtual tokens first
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE, reduction="none")
        learned = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
        losses += (token_losses.sum(dim=1) / learned).tolist()
    return losses


def _vocabulary(model: torch.nn.Module) -> int:
    return _base(model).get_output_embeddings().weight.shape[0]


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, prompter: Prompter, examples: Sequence[Example], max_new_tokens: int,
    batch_size: int = 128, *, max_length: int | None = None,
) -> list[str]:
    """Greedy continuations of each example's prompt, cut at the prompter's stop token.

    With `max_length` (the model's context), a prompt is cut from its left so that prompt +
    `max_new_tokens` fits; None cuts nothing. Prompts are batched by equal length, so there is no
    padding and no position shift. Not `generate`: with peft's prompt-learning methods (peft 0.21,
    transformers 5) it gets only the first token right.
    """
    device = next(model.parameters()).device
    prompts = prompts_for_generation(prompter, examples, max_new_tokens, max_length)
    answers = [""] * len(examples)
    model.eval()
    for chunk in equal_length_batches(prompts, batch_size):
        ids = torch.tensor([prompts[i] for i in chunk], device=device)
        for row, tokens in zip(chunk, greedy(model, ids, max_new_tokens, prompter.stop_id)):
            answers[row] = prompter.tokenizer.decode(tokens, skip_special_tokens=True)
    return answers


def prompts_for_generation(prompter: Prompter, examples: Sequence[Example], max_new_tokens: int,
                           max_length: int | None) -> list[list[int]]:
    """Each example's prompt ids, cut from the left so that `max_new_tokens` more fit in `max_length`."""
    room = _prompt_room(max_length, max_new_tokens)
    prompts = [prompter.prompt_ids(e) for e in examples]
    return prompts if room is None else [prompt[-room:] for prompt in prompts]


def equal_length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of equal length (no padding, no position shift)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    return [indices[start : start + batch_size] for indices in by_length.values()
            for start in range(0, len(indices), batch_size)]


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


def greedy(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, stop_id: int,
           scores: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[list[int]]:
    """Up to `max_new_tokens` argmax tokens after each row of `ids`, each cut before its first `stop_id`;
    `scores`, if given, maps each step's next-token logits (rows × vocabulary) to what the argmax is
    taken of (it may record them, or add noise).

    Each step after the first feeds only the new token and the KV cache. For a peft prompt-learning
    model the first step goes through peft (which puts the virtual tokens or the prefix in front),
    and the later ones through its base model, whose cache already holds them.
    """
    width, name = ids.shape[1], _cache_name(model)
    virtual = model.active_peft_config.num_virtual_tokens if _prompt_learning(model) else 0
    step_model = _base(model) if virtual else model
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    for step in range(max_new_tokens):
        if step:
            mask = torch.ones(len(ids), virtual + ids.shape[1], dtype=torch.long, device=ids.device)
            out = step_model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{name: out[name]})
        logits = out.logits[:, -1] if scores is None else scores(out.logits[:, -1])
        next_ids = logits.argmax(dim=-1).masked_fill(done, stop_id)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        done |= next_ids == stop_id
        if done.all():
            break
    rows = ids[:, width:].tolist()
    return [row[: row.index(stop_id)] if stop_id in row else row for row in rows]


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_name(model: torch.nn.Module) -> str:
    """The KV cache's argument (and output) name: `cache` from transformers 5.24 on, before it
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(_base(model).forward).parameters else "past_key_values"


def _prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def context_length(model: torch.nn.Module) -> int | None:
    """Positions left for real tokens: the base config's `max_position_embeddings`, less the virtual
    tokens of a peft prompt-learning method; None when the config does not say."""
    positions = getattr(getattr(_base(model), "config", None), "max_position_embeddings", None)
    if positions is None or not _prompt_learning(model):
        return positions
    return positions - model.active_peft_config.num_virtual_tokens


WHERE = ("server", "clients", "both")  # `evaluation`: who scores the global model


@dataclass(frozen=True)
class EvaluationSettings(Settings):
    """Where and how often the global model is scored, and which metric is the headline."""

    evaluation: str = choice(
        "evaluation", "server", WHERE,
        "who scores the global model: the server on its test split, each client on its own held-out split "
        "(metrics only leave it; a deployment needs no data on the server), or both",
    )
    evaluate_every: int = setting(
        "evaluate-every", 1, positive, "an integer >= 1", "score every N rounds (round 0 and the last always)",
    )
    metric: str = choice(
        "metric", EXACT_MATCH, HEADLINES,
        "the headline (`accuracy`): exact match, or ROUGE-L F1 for free-form answers; loss and perplexity are "
        "recorded beside it",
    )

    def check(self) -> None:
        if self.evaluation == "server":
            return
        if self.dp != "none":
            raise ConfigError(f"evaluation = {self.evaluation!r} releases each client's test scores, which the DP "
                              "accountant does not cover; use evaluation = 'server' with dp")
        if self.baseline == "local-only":
            raise ConfigError("baseline 'local-only' keeps one model per client on the server and scores each there; "
                              "use evaluation = 'server'")

    def evaluates(self, server_round: int, rounds: int) -> bool:
        """Whether round `server_round` of `rounds` is scored."""
        return server_round % self.evaluate_every == 0 or server_round == rounds
