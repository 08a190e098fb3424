"""Every merge operator on the built-in suite under pathological non-IID clients.

Same seed, clients, partition and round budget for each operator; the operators' parameters are
their defaults (nothing is tuned on the test split). Runs that already have a summary are skipped,
so an interrupted study continues. Writes `operators.md` (table) and `operators.png` (curves and
final per-task accuracy) into `--out`.

    python simulations/operator_study.py --out outputs/operator-study
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedllm.launch import run_simulation
from fedllm.merge import OPERATORS

PROJECT = Path(__file__).resolve().parent.parent


def run_all(out: Path, operators: list[str], base: str, clients: int) -> dict[str, dict]:
    results = {}
    for name in operators:
        folder = out / name
        if not (folder / "summary.json").exists():
            print(f"== {name}", flush=True)
            run_simulation(PROJECT, f"{base} aggregation='{name}'", clients, folder)
        summary = json.loads((folder / "summary.json").read_text())
        curve = [json.loads(line)["accuracy"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        results[name] = {**summary, "curve": curve}
    return results


def table(results: dict[str, dict]) -> str:
    tasks = list(next(iter(results.values()))["per_task_accuracy"])
    head = "| operator | mean | " + " | ".join(tasks) + " | wall s |"
    rows = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, r in sorted(results.items(), key=lambda item: -item[1]["final_accuracy"]):
        cells = " | ".join(f"{r['per_task_accuracy'][t]:.2f}" for t in tasks)
        rows.append(f"| `{name}` | **{r['final_accuracy']:.3f}** | {cells} | {r['wall_seconds']:.0f} |")
    base = next(iter(results.values()))["base_accuracy"]
    return "\n".join(rows) + f"\n\nBase model before training: {base:.3f}.\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, r in sorted(results.items(), key=lambda item: -item[1]["final_accuracy"]):
        curves.plot(range(len(r["curve"])), r["curve"], label=name)
    curves.set(xlabel="round", ylabel="mean exact-match accuracy", title="server model per round")
    curves.legend(fontsize=8)
    tasks = list(next(iter(results.values()))["per_task_accuracy"])
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(sorted(results.items())):
        bars.bar([t + i * width for t in range(len(tasks))], [r["per_task_accuracy"][t] for t in tasks], width, label=name)
    bars.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    bars.set(ylabel="final accuracy", title="per task, final round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROJECT / "outputs" / "operator-study")
    parser.add_argument("--operators", default=",".join(OPERATORS), help="comma-separated (default: all)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = f"num-server-rounds={args.rounds} partition='pathological:2' seed={args.seed}"
    results = run_all(args.out, args.operators.split(","), base, args.clients)
    report = (f"# Merge operators under pathological non-IID (2 tasks per client)\n\n"
              f"`python simulations/operator_study.py` — {args.clients} clients, {args.rounds} rounds, seed "
              f"{args.seed}, default run config otherwise.\n\n{table(results)}")
    (args.out / "operators.md").write_text(report)
    plot(results, args.out / "operators.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
