"""How fast the server model learns the tasks from their *true* labels with the server's own
distillation step: the most any teacher could give it in that many steps. A fresh LoRA adapter on
the base server model is trained on `--examples` training examples (hard labels only, the
distillation's `α = 1`), in chunks of `--steps` AdamW steps (a fresh optimiser per chunk, as per
round), and scored on the run's test split after each chunk.

    python simulations/cooperation_ceiling.py --run-config "model='smollm2-135m-instruct' test-per-task=16" --chunks 4
"""

from __future__ import annotations

import argparse
import copy
import random
import time

from peft import get_peft_model

from fedllm.cooperation.align import Target
from fedllm.cooperation.distill import distill
from fedllm.core.local import run_splits
from fedllm.core.server_model import ServerModel
from fedllm.evaluation import context_length, score
from fedllm.cli import project_dir
from fedllm.launch import resolved_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="model='smollm2-135m-instruct' test-per-task=16",
                        help="the run's settings (model, dataset, lora-rank, batch-size, seed, ...)")
    parser.add_argument("--learning-rate", type=float, default=0.002, help="as distill-learning-rate")
    parser.add_argument("--steps", type=int, default=50, help="steps per chunk (a round's distill-steps)")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--examples", type=int, default=512, help="training examples drawn (seeded)")
    args = parser.parse_args()

    cfg = resolved_config(project_dir(), args.run_config)  # pyproject defaults, as a run sees them
    train, test = run_splits(cfg)
    random.Random(cfg.seed).shuffle(train)
    server = ServerModel(cfg, test)
    targets = [Target(e, (None,) * len(server.prompter.answer_ids(e))) for e in train[: args.examples]]
    student = get_peft_model(copy.deepcopy(server.model), server.method.peft_config(cfg.lora_rank))
    started = time.perf_counter()
    print(f"{cfg.model} on {cfg.dataset}: {len(targets)} true-label examples, learning rate {args.learning_rate}, "
          f"batch {cfg.batch_size}; test split {len(test)} examples")
    for chunk in range(args.chunks):
        losses = distill(student, server.prompter, targets, steps=args.steps, batch_size=cfg.batch_size,
                         learning_rate=args.learning_rate, alpha=1.0, seed=cfg.seed + chunk,
                         max_length=context_length(student) or 512)
        accuracy = score(student, server.prompter, test, max_length=context_length(student)).headline(cfg.metric)
        print(f"after {(chunk + 1) * args.steps:4d} steps: last loss {losses[-1]:.2f}, test {cfg.metric} {accuracy:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
