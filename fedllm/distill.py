"""Layer-wise distillation of an emulator's middle layers (Offsite-Tuning's "emulator
distillation", Xiao et al. 2023, arXiv 2302.04870, §3.3), on data the server may use.

The first and the last layer stay exact copies, as in Offsite-Tuning. The full model's middle
layers `1 .. L−2` are split among the emulator's middle layers: layer `j` stands for the
dropped layers before it and for itself, `kept[j−1]+1 .. kept[j]` (the last one also for the
dropped layers after it). With the full model's hidden states `H_l` (the input of layer `l`),
each is trained on its own, teacher-forced: `min ‖e_j(H_start) − H_stop‖²` over the real
(unpadded) tokens of its span `start .. stop−1`. All of them learn in one pass of the
emulator, so a step costs one teacher and one emulator forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedllm.emulator import LayerMap, decoder_layers
from fedllm.train import Encoded, collate


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def spans(kept: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """Emulator middle layer `j` -> the full model's layers `start .. stop−1` it stands for."""
    last = len(kept) - 2
    return {j: (kept[j - 1] + 1, kept[j] + 1 if j < last else kept[-1]) for j in range(1, last + 1)}


def distill_middle_layers(
    teacher: torch.nn.Module, emulator: torch.nn.Module, layer_map: LayerMap, data: Sequence[Encoded], *,
    steps: int, batch_size: int, learning_rate: float, seed: int, pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `emulator`'s middle layers in place towards the spans they replace; returns the
    loss (mean squared error per hidden unit, summed over the layers) at every step."""
    _, layers = decoder_layers(emulator)
    span = spans(layer_map.kept)
    middle = list(span)
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    trained = [p for j in middle for p in layers[j].parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    if not trained:
        return []
    device = next(emulator.parameters()).device
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    teacher_in: dict[int, torch.Tensor] = {}
    student_out: dict[int, torch.Tensor] = {}

    def feed(j: int):  # noqa: ANN202 - a forward pre-hook
        def hook(module, args, kwargs):  # noqa: ANN001, ANN202
            if args:
                return (teacher_in[j], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": teacher_in[j]}
        return hook

    def catch(j: int):  # noqa: ANN202 - a forward hook
        def hook(module, args, output):  # noqa: ANN001, ANN202
            student_out[j] = _hidden(output)
        return hook

    handles = [layers[j].register_forward_pre_hook(feed(j), with_kwargs=True) for j in middle]
    handles += [layers[j].register_forward_hook(catch(j)) for j in middle]
    losses = []
    try:
        emulator.train()
        order: list[int] = []
        for step in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(data), generator=generator).tolist()
            batch, order = collate([data[i] for i in order[:batch_size]], pad_id, device), order[batch_size:]
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with torch.no_grad():
                hidden = teacher(**inputs, output_hidden_states=True).hidden_states
            teacher_in.update({j: hidden[start] for j, (start, _) in span.items()})
            emulator(**inputs)
            real = batch["attention_mask"].bool()
            loss = sum(torch.nn.functional.mse_loss(student_out[j][real], hidden[stop][real])
                       for j, (_, stop) in span.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        for handle in handles:
            handle.remove()
        emulator.eval()
        for parameter in emulator.parameters():
            parameter.requires_grad_(False)
    return losses


def gap_loss(teacher: torch.nn.Module, emulator: torch.nn.Module, layer_map: LayerMap, data: Sequence[Encoded],
             pad_id: int, batch_size: int = 64) -> float:
    """How far the emulator's last hidden state is from the full model's, free-running (no
    teacher forcing): mean squared error per hidden unit over the real tokens of `data`."""
    device = next(emulator.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate(data[start:start + batch_size], pad_id, device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            full = teacher(**inputs, output_hidden_states=True).hidden_states[-1]
            small = emulator(**inputs, output_hidden_states=True).hidden_states[-1]
            real = batch["attention_mask"].bool()
            total += float(torch.nn.functional.mse_loss(small[real], full[real], reduction="sum"))
            count += int(real.sum()) * full.shape[-1]
    return total / max(count, 1)

