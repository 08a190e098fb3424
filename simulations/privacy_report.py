"""Privacy study report: accuracy against ε, and what secure aggregation adds per round.

Reads a finished `fedllm study simulations/studies/privacy.toml --out <dir>` and writes
`<dir>/privacy.md` (tables) and `<dir>/privacy.png` (accuracy against ε, with and without
secure aggregation). Usage: python simulations/privacy_report.py <dir>
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

from fedllm.study import mean_spread_text


def load_rows(study_dir: Path) -> list[dict]:
    """One dict per finished run: its settings, final accuracy, ε, and per-round cost."""
    rows = []
    for row in csv.DictReader(open(study_dir / "results.csv")):
        if not row.get("final_accuracy"):
            continue
        metrics = [json.loads(line) for line in (study_dir / "runs" / row["run"] / "metrics.jsonl").read_text().splitlines()]
        trained = metrics[1:]
        rows.append({
            "dp": row.get("dp") or "central",
            "z": float(row["dp-noise-multiplier"]) if row.get("dp-noise-multiplier") else None,
            "secure": row.get("secure-aggregation") == "True",
            "accuracy": float(row["final_accuracy"]),
            "epsilon": float(row["epsilon"]) if row.get("epsilon") else None,
            "round_seconds": statistics.median(m["round_seconds"] for m in trained),
            "bytes_per_client_round": statistics.fmean(
                (m["upload_bytes"] + m["download_bytes"]) / m["clients"] for m in trained),
        })
    return rows


def label(row: dict) -> str:
    return "no DP" if row["dp"] == "none" else f"z = {row['z']:g}"


def epsilon_text(value: float | None) -> str:
    return "–" if value is None else "∞" if math.isinf(value) else f"{value:.3g}"


def settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by setting (DP, noise multiplier, secure aggregation): the seeds of one setting together."""
    groups: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["dp"] != "none", r["z"] or 0, r["secure"])):
        groups.setdefault((row["dp"], row["z"], row["secure"]), []).append(row)
    return groups


def tables(rows: list[dict]) -> str:
    lines = ["| setting | secure aggregation | ε (δ = 1e-5) | seeds | final accuracy: mean ± std [95% interval] |", "|---|---|---|---|---|"]
    for (_, _, secure), members in settings(rows).items():
        lines.append(f"| {label(members[0])} | {'yes' if secure else 'no'} | {epsilon_text(members[0]['epsilon'])} | "
                     f"{len(members)} | {mean_spread_text([r['accuracy'] for r in members])} |")
    lines += ["", "| setting | round time (median), plain → secure | bytes sent + received per client per round, plain → secure |",
              "|---|---|---|"]
    pairs: dict[str, dict[bool, list[dict]]] = {}
    for (_, _, secure), members in settings(rows).items():
        pairs.setdefault(label(members[0]), {})[secure] = members
    for name, pair in pairs.items():
        if len(pair) == 2:
            (plain_s, secure_s), (plain_b, secure_b) = (
                (statistics.median(r[key] for r in pair[False]), statistics.median(r[key] for r in pair[True]))
                for key in ("round_seconds", "bytes_per_client_round"))
            lines.append(f"| {name} | {plain_s:.1f} s → {secure_s:.1f} s (×{secure_s / plain_s:.2f}) | "
                         f"{plain_b / 1024:,.0f} KiB → {secure_b / 1024:,.0f} KiB (×{secure_b / plain_b:.2f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Mean final accuracy against ε per setting, with error bars of ± one standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = settings(rows)
    for secure, marker in ((False, "o"), (True, "x")):
        points = sorted((m[0]["epsilon"], [r["accuracy"] for r in m]) for (_, _, s), m in groups.items()
                        if s == secure and m[0]["epsilon"] is not None and math.isfinite(m[0]["epsilon"]))
        ax.errorbar([p[0] for p in points], [statistics.fmean(p[1]) for p in points], marker=marker, capsize=2,
                    yerr=[statistics.stdev(p[1]) if len(p[1]) > 1 else 0.0 for p in points],
                    label="secure aggregation" if secure else "plain")
        for (dp, _, s), members in groups.items():
            if s == secure and dp == "none":
                ax.axhline(statistics.fmean(r["accuracy"] for r in members), linestyle=":", color="grey")
    ax.set(xscale="log", xlabel="ε after the run (δ = 1e-5)", ylabel="final accuracy (mean ± std over seeds)",
           title="accuracy against ε (dotted: no DP)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(study_dir: Path) -> None:
    rows = load_rows(study_dir)
    (study_dir / "privacy.md").write_text(tables(rows) + "\n")
    plot(rows, study_dir / "privacy.png")
    print(tables(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
