"""How fast a prompt-learning method's answers are generated now (KV cache after the virtual tokens)
against recomputing the whole sequence at every step, as fedllm did before, and against LoRA.

    python simulations/bench_evaluation.py [--model smollm2-135m-instruct] [--examples 48] [--new-tokens 12]

Each method's peft model is built on the same base with seeded, trained-looking adapter weights;
the same prompts (the structured suite's test examples, in the model's prompt layout) are decoded
greedily for `--new-tokens` tokens both ways, and the answers are checked to be identical. Times are
the best of `--repeats`; the ratios are what matters on a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.data import load_splits  # noqa: E402
from fedllm.data.format import Prompter  # noqa: E402
from fedllm.evaluation import greedy  # noqa: E402
from fedllm.models import load_model  # noqa: E402


def recomputed(model: torch.nn.Module, ids: torch.Tensor, steps: int, stop_id: int) -> list[list[int]]:
    """Greedy decoding without a cache: the whole sequence through the model at every step."""
    width = ids.shape[1]
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1:].argmax(-1)], 1)
    return [row[: row.index(stop_id)] if stop_id in row else row for row in ids[:, width:].tolist()]


def peft_model(base: torch.nn.Module, method: str) -> torch.nn.Module:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = {"prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
              "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
              "lora": LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)}[method]
    model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def best_of(repeats: int, work) -> tuple[float, object]:  # noqa: ANN001
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, test = load_splits("builtin:structured", seed=0, train_per_task=1, test_per_task=args.examples, test_fraction=0.1)
    print(f"model {args.model}, {args.examples} prompts of equal length, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    for method in ("prompt-tuning", "prefix-tuning", "lora"):
        base, tokenizer = load_model(args.model)
        prompter = Prompter(tokenizer, "auto")
        prompts = [prompter.prompt_ids(e) for e in test]
        width = min(len(p) for p in prompts)
        ids = torch.tensor([p[-width:] for p in prompts[: args.examples]])
        model = peft_model(base, method)
        with torch.no_grad():
            cached_s, cached = best_of(args.repeats, lambda: greedy(model, ids, args.new_tokens, prompter.stop_id))
            full_s, full = best_of(args.repeats, lambda: recomputed(model, ids, args.new_tokens, prompter.stop_id))
        same = "same answers" if cached == full else "ANSWERS DIFFER"
        print(f"  {method:<14} cached {cached_s:6.2f} s   recomputed {full_s:6.2f} s   "
              f"speed-up {full_s / cached_s:4.1f}x   ({same})")


if __name__ == "__main__":
    main()
