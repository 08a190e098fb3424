"""Emulator study report: server-model accuracy against what each kind of client needs.

    python simulations/emulator_report.py <study folder> [--steps 30]

Reads a finished `fedllm study simulations/studies/emulator.toml --out <folder>` and prints, per
client model: the server model's accuracy (base → final), the base weights a client must hold,
the bytes it receives in its first round (the emulator travels then) and in later rounds, what
it uploads per round, and the distillation's effect. It then measures a client in a process of
its own, one after another on this machine: peak resident memory of a process that loads only
that client's base model (the emulator from the node's cache, never the full model) and trains a
rank-8 LoRA adapter, and the median time of a training step, as a ratio to the full model.
Writes `emulator.md` and `emulator.png` into the folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm.study import mean_spread_text  # noqa: E402


def load_rows(study_dir: Path) -> list[dict]:
    """One dict per finished run: client model, accuracy, client weights, bytes, distillation."""
    rows = []
    for row in csv.DictReader(open(study_dir / "results.csv")):
        if not row.get("final_accuracy"):
            continue
        folder = study_dir / "runs" / row["run"]
        summary = json.loads((folder / "summary.json").read_text())
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        spec = summary["config"]["client-model"]
        build = summary["emulators"][spec]
        per_client = lambda r, key: statistics.fmean(r[key].values())  # noqa: E731
        rows.append({
            "run": row["run"], "model": summary["config"]["model"], "client_model": spec,
            "distill_steps": summary["config"]["emulator-distill-steps"],
            "adapters": summary["config"].get("emulator-adapters", "kept"),
            "base_accuracy": summary["base_accuracy"], "accuracy": summary["final_accuracy"],
            "weights_bytes": build["base_bytes"], "layers": build["layers"], "digest": build.get("digest", ""),
            "first_download": per_client(metrics[1], "client_download_bytes"),
            "later_download": statistics.fmean(per_client(r, "client_download_bytes") for r in metrics[2:]),
            "upload": statistics.fmean(per_client(r, "client_upload_bytes") for r in metrics[1:]),
            "gap": (build.get("distill_gap_before"), build.get("distill_gap_after")),
            "build_seconds": build.get("build_seconds", 0.0),
            "curve": [r["accuracy"] for r in metrics],
        })
    return rows


def order(row: dict) -> tuple:
    return row["model"], -row["weights_bytes"], row["adapters"], row["distill_steps"]


def settings(rows: list[dict]) -> list[list[dict]]:
    """The runs of each setting (its seeds together), in the report's order."""
    groups: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=order):
        groups.setdefault((*order(row), row["client_model"]), []).append(row)
    return list(groups.values())


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def label(row: dict) -> str:
    name = "full model" if row["client_model"] == "full" else f"{row['client_model']} (layers {row['layers']})"
    name += ", adapters on the first and last layer" if row["adapters"] == "ends" else ""
    return name + (f" + distillation ({row['distill_steps']} steps)" if row["distill_steps"] else "")


# -- one client, measured in a process of its own --------------------------------------------

def measure_client(model: str, digest: str, steps: int) -> dict:
    """Peak RSS and step time of a process that holds only this client's base model and trains."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fedllm.core.local import emulator_cache
    from fedllm.data import builtin_suite
    from fedllm.emulator import instantiate, load_cached
    from fedllm.models import load_model, load_tokenizer
    from fedllm.data.format import Prompter
    from fedllm.train import encode, train_steps

    torch.set_num_threads(1)  # as a simulated client runs (one CPU each)
    if digest:
        base, tokenizer = instantiate(load_cached(emulator_cache(), digest)), load_tokenizer(model)
    else:
        base, tokenizer = load_model(model)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                 "o_proj", "gate_proj", "up_proj", "down_proj"]))
    data = encode(Prompter(tokenizer), builtin_suite(100, 1, 0)[0], 512)
    train_steps(peft_model, data, steps=3, batch_size=16, learning_rate=3e-3, seed=0, pad_id=tokenizer.pad_token_id)
    times = []
    for trial in range(steps):
        started = time.perf_counter()
        train_steps(peft_model, data, steps=1, batch_size=16, learning_rate=3e-3, seed=trial,
                    pad_id=tokenizer.pad_token_id)
        times.append(time.perf_counter() - started)
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": statistics.median(times)}


def measure_all(rows: list[dict], steps: int) -> dict[str, dict]:
    """`measure_client` for each setting's client base model, each in a fresh process: the first
    seed's, since memory and step time do not depend on the weights' values."""
    results = {}
    for row in (members[0] for members in settings(rows)):
        if client_key(row) in results:
            continue
        digest = client_key(row)[1]
        out = subprocess.run([sys.executable, __file__, "--measure", row["model"], digest, str(steps)],
                             check=True, capture_output=True, text=True).stdout
        results[client_key(row)] = json.loads(out.strip().splitlines()[-1])
    return results


def client_key(row: dict) -> tuple[str, str]:
    """What a client holds: the base model, and the emulator's digest ('' for the full model)."""
    return row["model"], row["digest"] if row["client_model"] != "full" else ""


# -- the report ------------------------------------------------------------------------------

def table(rows: list[dict], measured: dict[tuple[str, str], dict]) -> str:
    lines = ["| server model | clients train on | seeds | server accuracy: base → final, mean ± std [95% interval] | "
             "client base weights | "
             "client peak memory | step time (× full) | download, first round | download, later rounds | "
             "upload per round | distillation: hidden-state gap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for members in settings(rows):
        row = members[0]  # weights, bytes and the client measured are the same for every seed
        m, full = measured.get(client_key(row), {}), measured.get((row["model"], ""), {})
        ratio = f" (×{m['step_seconds'] / full['step_seconds']:.2f})" if m and full else ""
        distilled = [r for r in members if r["gap"][0] is not None]  # distillation is seeded: mean over seeds
        gap_text = (f"{statistics.fmean(r['gap'][0] for r in distilled):.3f} → "
                    f"{statistics.fmean(r['gap'][1] for r in distilled):.3f} in "
                    f"{statistics.fmean(r['build_seconds'] for r in distilled):.0f} s" if distilled else "–")
        accs = [r["accuracy"] for r in members]
        lines.append(
            f"| `{row['model']}` | {label(row)} | {len(members)} | {statistics.fmean(r['base_accuracy'] for r in members):.3f} → "
            f"{mean_spread_text(accs)} | "
            f"{row['weights_bytes'] / 2**20:.2f} MiB | {m.get('peak_rss_bytes', 0) / 2**20:.0f} MiB | "
            f"{m.get('step_seconds', 0) * 1000:.0f} ms{ratio} | {row['first_download'] / 1024:,.0f} KiB | "
            f"{row['later_download'] / 1024:,.0f} KiB | {row['upload'] / 1024:,.0f} KiB | {gap_text} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per setting, the server model's accuracy per round and against the weights a client holds,
    at the mean over seeds with error bars of ± one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 6.5))
    for members in settings(rows):
        row, length = members[0], min(len(r["curve"]) for r in members)
        per_round = [[r["curve"][i] for r in members] for i in range(length)]
        curves.errorbar(range(length), [statistics.fmean(v) for v in per_round], yerr=[spread(v) for v in per_round],
                        capsize=2, label=f"{row['model']}: {label(row)}")
        accs = [r["accuracy"] for r in members]
        bars.errorbar(row["weights_bytes"] / 2**20, statistics.fmean(accs), yerr=spread(accs), fmt="o", capsize=3)
        short = label(row).split(" (")[0] + (", ends" if row["adapters"] == "ends" else "") + (" + distil" if row["distill_steps"] else "")
        bars.annotate(f"{row['model'].split(':')[-1]}: {short}", (row["weights_bytes"] / 2**20, statistics.fmean(accs)),
                      fontsize=8, xytext=(4, 4), textcoords="offset points")
    curves.set(xlabel="round", ylabel="server model accuracy (exact match, mean ± std over seeds)",
               title="The full server model, per round")
    curves.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14))  # below the axes: curves stay visible
    bars.set(xlabel="base weights a client holds (MiB)", ylabel="final server accuracy (mean ± std over seeds)",
             title="Accuracy against client size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretraining_text(models: set[str]) -> str:
    """The check of each base model: exact match on examples of the warm-up tasks it was
    pre-trained on (it must know the answer format; the suite's tasks it must not know)."""
    from fedllm.data import WARMUP_TASKS
    from fedllm.data.tasks import generate
    from fedllm.models import load_model
    from fedllm.data.format import Prompter
    from fedllm.evaluation import EXACT_MATCH, score

    parts = []
    for model in sorted(models):
        base, tokenizer = load_model(model)
        warmup = score(base, Prompter(tokenizer), generate(WARMUP_TASKS, per_task=20, seed=12345)).headline(EXACT_MATCH)
        parts.append(f"`{model}` ({base.config.num_hidden_layers} layers) answers {warmup:.0%} of warm-up "
                     "examples (drawn with another seed than its pre-training) exactly")
    return "Base models, checked on the tasks they were pre-trained on: " + "; ".join(parts) + "." if parts else ""


def report(study_dir: Path, steps: int, figure: Path | None = None) -> str:
    """The table (with measured client processes) and the plot; returns the Markdown."""
    rows = load_rows(study_dir)
    text = "\n\n".join(filter(None, [table(rows, measure_all(rows, steps)), pretraining_text({r["model"] for r in rows})]))
    plot(rows, figure or study_dir / "emulator.png")
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        model, digest, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps(measure_client(model, digest, steps)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="folder of `fedllm study simulations/studies/emulator.toml`")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per client model")
    args = parser.parse_args()
    folder = Path(args.study)
    text = report(folder, args.steps)
    (folder / "emulator.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {folder / 'emulator.md'} and {folder / 'emulator.png'}")


if __name__ == "__main__":
    main()
