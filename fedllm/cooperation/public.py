"""The public prompts cooperation runs on: fresh prompts of a builtin suite, or a file of prompts
(outputs, if any, are never read). A prompt that is also a test prompt of the run is dropped, so
no answer to a test question is ever learned from."""

from __future__ import annotations

from collections.abc import Sequence

from fedllm.data import BUILTIN_SUITES, load_examples
from fedllm.data.example import Example
from fedllm.data.tasks import generate
from fedllm.seeds import public_prompts_rng

PUBLIC = "public"  # the train message record that carries a round's public prompts
BUILTIN_PUBLIC_PER_TASK = 250
PUBLIC_SEED_OFFSET = 7_777_777  # builtin public prompts come from another seed than the run's data
MAX_PROMPT_CHARS = 4000  # a public prompt's instruction and input together, as sent to the clients


def public_pool(public_dataset: str, dataset: str, seed: int, exclude: Sequence[Example] = ()) -> list[Example]:
    """Every public prompt, outputs emptied, without `exclude`'s prompts (the run's test split)."""
    source = public_dataset or dataset
    if source in BUILTIN_SUITES:
        pool = generate(BUILTIN_SUITES[source], BUILTIN_PUBLIC_PER_TASK, seed + PUBLIC_SEED_OFFSET)
    elif public_dataset:
        pool = load_examples(public_dataset, outputs=False)
    else:
        raise ValueError(f"cooperation needs public prompts: dataset {dataset!r} is not a builtin suite, so set "
                         "public-dataset to a file of prompts (instruction, input; outputs optional)")
    held_out = {(e.instruction, e.input) for e in exclude}
    prompts = [Example(e.instruction, e.input, "", e.task) for e in pool if (e.instruction, e.input) not in held_out]
    if too_long := [e for e in prompts if len(e.instruction) + len(e.input) > MAX_PROMPT_CHARS]:
        raise ValueError(f"public-dataset {source!r}: a prompt of {len(too_long[0].instruction + too_long[0].input)} "
                         f"characters; public prompts are at most {MAX_PROMPT_CHARS}")
    if not prompts:
        raise ValueError(f"public-dataset {source!r} has no prompts that are not test prompts")
    return prompts


def round_prompts(pool: Sequence[Example], count: int, seed: int, server_round: int) -> list[Example]:
    """The round's `count` public prompts, drawn without replacement (all of them if fewer)."""
    return public_prompts_rng(seed, server_round).sample(list(pool), min(count, len(pool)))


def to_lists(prompts: Sequence[Example]) -> dict[str, list[str]]:
    """Prompts as three string lists (a Flower ConfigRecord's values)."""
    return {"instruction": [p.instruction for p in prompts], "input": [p.input for p in prompts],
            "task": [p.task for p in prompts]}


def from_lists(lists: dict, limit: int) -> list[Example]:
    """Prompts from `to_lists`' form, checked: at most `limit`, strings of bounded length."""
    columns = [lists.get(key) for key in ("instruction", "input", "task")]
    if not all(isinstance(c, list) and all(isinstance(v, str) for v in c) for c in columns):
        raise ValueError("public prompts: expected lists of strings 'instruction', 'input' and 'task'")
    if len({len(c) for c in columns}) != 1 or len(columns[0]) > limit:
        raise ValueError(f"public prompts: columns of lengths {[len(c) for c in columns]}, expected equal and <= {limit}")
    if any(len(i) + len(x) > MAX_PROMPT_CHARS for i, x, _ in zip(*columns)):
        raise ValueError(f"public prompts: a prompt longer than {MAX_PROMPT_CHARS} characters")
    return [Example(i, x, "", t) for i, x, t in zip(*columns)]
