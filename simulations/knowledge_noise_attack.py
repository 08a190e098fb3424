"""What `knowledge-noise` hides of a cooperation client's tasks from a server that grades the
public prompts, and what it costs (docs/privacy.md, "Cooperation").

Two `builtin:tiny` clients each train 150 steps on three of the six builtin tasks, as in
tests/test_cooperation.py; each answers 8 public prompts per task with noise σ (three noise
seeds). The server names the three tasks whose answers come closest to the right ones (difflib's
ratio); we count how many of the named tasks the client really holds (3 = all, chance 1.5) and
how many of its answers to its own tasks are exactly right.

    python simulations/knowledge_noise_attack.py --noise 0 1 2 3 4 6
"""

from __future__ import annotations

import argparse
import difflib
import statistics

import torch
from peft import LoraConfig, get_peft_model

from fedllm.cooperation.align import answer_text
from fedllm.cooperation.knowledge import answer
from fedllm.data.example import Example
from fedllm.data.format import Prompter
from fedllm.data.tasks import SUITE_TASKS, builtin_suite, generate
from fedllm.models import load_model
from fedllm.train import encode, train_steps


def trained_client(held: list[str], train: list[Example]) -> tuple[torch.nn.Module, Prompter]:
    torch.manual_seed(0)
    model, tokenizer = load_model("builtin:tiny")
    client = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                              task_type="CAUSAL_LM"))
    prompter = Prompter(tokenizer, "plain")
    train_steps(client, encode(prompter, [e for e in train if e.task in held], 128), steps=150, batch_size=16,
                learning_rate=3e-3, seed=0, pad_id=tokenizer.pad_token_id)
    return client, prompter


def graded(client: torch.nn.Module, prompter: Prompter, held: list[str], noise: float, seed: int) -> tuple[int, float]:
    """How many of the three tasks the server names the client holds, and the client's exact
    match on its own tasks' prompts."""
    names = [task.name for task in SUITE_TASKS]
    questions = generate(SUITE_TASKS, 8, seed=1000)  # the server knows the right answers
    prompts = [Example(e.instruction, e.input, "", e.task) for e in questions]
    answers = answer(client, prompter, prompts, top_k=4, max_new_tokens=16, max_length=128, noise=noise, seed=seed)
    closeness = {t: 0.0 for t in names}
    right = 0
    for found, example in zip(answers, questions):
        text = answer_text(prompter, found.tokens())
        closeness[example.task] += difflib.SequenceMatcher(None, text, example.output).ratio()
        right += example.task in held and text == example.output
    named = set(sorted(names, key=lambda t: -closeness[t])[:3])
    return len(named & set(held)), right / (8 * len(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0, 1, 2, 3, 4, 6])
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per client")
    args = parser.parse_args()
    names = [task.name for task in SUITE_TASKS]
    train, _ = builtin_suite(200, 1, seed=0)
    clients = {tuple(held): trained_client(held, train) for held in (names[:3], names[3:])}
    print("| knowledge-noise σ | held tasks the server names (of 3; chance 1.5) | "
          + " | ".join(f"exact match on {', '.join(held)}" for held in clients) + " |")
    print("|---|---|" + "---|" * len(clients))
    for noise in args.noise:
        hits, exact = [], {held: [] for held in clients}
        for held, (client, prompter) in clients.items():
            for seed in range(args.seeds):
                named, right = graded(client, prompter, list(held), noise, seed)
                hits.append(named)
                exact[held].append(right)
        print(f"| {noise:g} | {statistics.mean(hits):.2f} (min {min(hits)}) | "
              + " | ".join(f"{statistics.mean(v):.2f}" for v in exact.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
