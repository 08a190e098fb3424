"""Cooperation run report: the server model's accuracy per round against its teachers'.

    python simulations/cooperation_report.py <run folder> [<run folder> ...] --out docs/results/cooperation

Reads each finished (or running) `fedllm run` with `cooperation = 'distill'` and writes, into
`--out`, `rounds.md` (per round: the server model's exact match, the clients' merged model's,
the KL to the teachers before and after distilling, the server's seconds of cooperation) and
`accuracy.png` (both accuracies per round, one line pair per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def table(folder: Path) -> str:
    lines = [f"`{folder.name}`", "", "| round | server model | clients' model | KL to teachers: before → after | "
             "server s (cooperation) | upload / client |", "|---|---|---|---|---|---|"]
    for row in rows(folder):
        family = statistics.fmean(row.get("family_accuracy", {"": float("nan")}).values())
        kl = (f"{row['teacher_kl_before']:.2f} → {row['teacher_kl_after']:.2f}" if "teacher_kl_before" in row else "–")
        upload = statistics.fmean(row["client_upload_bytes"].values()) / 1024 if row.get("client_upload_bytes") else 0.0
        lines.append(f"| {row['round']} | {row['accuracy']:.3f} | {family:.3f} | {kl} | "
                     f"{row.get('cooperation_seconds', 0.0):.0f} | {upload:.0f} KiB |")
    return "\n".join(lines)


def plot(folders: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for folder in folders:
        found = rows(folder)
        line, = axes.plot([r["round"] for r in found], [r["accuracy"] for r in found], marker="o",
                          label=f"server model ({folder.name})")
        axes.plot([r["round"] for r in found], [statistics.fmean(r["family_accuracy"].values()) for r in found],
                  linestyle="--", color=line.get_color(), label=f"clients' merged model ({folder.name})")
    axes.set_xlabel("round")
    axes.set_ylabel("exact match, held-out test split")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rounds.md").write_text("\n\n".join(table(folder) for folder in args.runs) + "\n")
    plot(args.runs, args.out / "accuracy.png")
    print((args.out / "rounds.md").read_text())


if __name__ == "__main__":
    main()
