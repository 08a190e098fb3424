"""Write docs/RESULTS.md from the shipped studies' outputs: never edit its figures by hand.

    python simulations/results.py [--studies outputs] [--bench outputs/bench-simulation.json]

For every study file in simulations/studies/ whose folder `<studies>/study-<name>` exists (the
default `--out` of `fedllm study`), the section says what was run (the file's own comment and
command), on what machine (the study's `machine.json`), the table of mean ± std per setting
recomputed from the runs' summaries, and the plots (redrawn into docs/results/<name>/). Runs
that have not finished are listed as missing. The privacy study also gets its accuracy-against-ε
table and plot; `--bench` adds the figures of simulations/bench_simulation.py --json.

A study whose folder is absent (and the benchmark, without `--bench`) keeps its section from the
current docs/RESULTS.md, with the commit and date it was generated from: study outputs are not
committed, so a session can rerun one study and regenerate the page without rerunning them all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "simulations"))

from fedllm.study import execute, load_study, plot_study, selection_table, separability, settings_table  # noqa: E402

STUDY_ORDER = ("operators", "methods", "ranks", "clients", "privacy", "emulator", "real", "cooperation")  # then any other study file


BENCH_HEADING = "Simulation at scale"
MIN_SEEDS = 3  # fewer seeds per setting give no spread a difference can be tested against


class NotRun(RuntimeError):
    """A planned run with no finished result in the study folder."""


def not_run(run_config: str, clients: int, folder: Path) -> None:
    raise NotRun("not run yet")


def description(study_file: Path) -> list[str]:
    """The study file's leading comment, as prose."""
    lines = []
    for line in study_file.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return [" ".join(line for line in lines if line and not line.startswith("fedllm study"))]


def machine_text(folder: Path) -> str:
    path = folder / "machine.json"
    if not path.exists():
        return "Machine not recorded (the study predates `machine.json`)."
    m = json.loads(path.read_text())
    return (f"Ran on {m['cpus']} CPUs, {m['memory_gib']} GiB, GPU {m['gpu']} ({m['platform']}), fedllm "
            f"`{m['fedllm_commit']}`, torch {m['torch']}, flwr {m['flwr']}, peft {m['peft']}, "
            f"transformers {m['transformers']}; last run {m['date']}.")


def weights_text(rows: list[dict]) -> str:
    """Which builtin-model build the runs started from (fedllm.models.builtin_weights_digest)."""
    builds = sorted({r["base_weights"] for r in rows if r.get("base_weights")})
    return f" Builtin model weights, SHA-256 prefix: {', '.join(f'`{b}`' for b in builds)}." if builds else ""


def study_section(study_file: Path, folder: Path, docs: Path) -> list[str]:
    name = study_file.stem
    study = load_study(study_file)
    rows = execute(study, folder, not_run)
    done = [r for r in rows if "final_accuracy" in r]
    figures = docs / "results" / name
    figures.mkdir(parents=True, exist_ok=True)
    text = [f"## {name}", "", *description(study_file), "",
            f"`fedllm study simulations/studies/{study_file.name} --out outputs/study-{name}`: "
            f"{len(done)} of {len(rows)} runs finished. {machine_text(folder)}{weights_text(done)}", ""]
    missing = [r["run"] for r in rows if "final_accuracy" not in r]
    if missing:
        text += [f"Not run (or failed): {', '.join(f'`{m}`' for m in missing)}.", ""]
    if not done:
        return text
    text += [settings_table(done, study.varying), "", separability(done, study.varying), ""]
    if study.select_within is not None:
        text += ["Chosen on the validation split (the test split played no part):", "",
                 selection_table(done, study.varying, study.select_within), ""]
    plot_study(done, study, folder / "runs", figures)
    text += [f"![accuracy per round](results/{name}/accuracy_per_round.png)", "",
             f"![accuracy against upload](results/{name}/accuracy_vs_upload.png)", ""]
    if name == "emulator":
        import emulator_report

        text += [emulator_report.report(folder, steps=30, figure=figures / "emulator.png"), "",
                 f"![emulator clients](results/{name}/emulator.png)", ""]
    if name == "privacy":
        import privacy_report

        privacy_rows = privacy_report.load_rows(folder)
        privacy_report.plot(privacy_rows, figures / "accuracy_vs_epsilon.png")
        text += [privacy_report.tables(privacy_rows), "", f"![accuracy against ε](results/{name}/accuracy_vs_epsilon.png)", ""]
    return text


def previous_sections(results_md: Path) -> dict[str, list[str]]:
    """The `## ` sections of an earlier RESULTS.md by heading, without those that say "Not run yet"."""
    sections: dict[str, list[str]] = {}
    heading = None
    for line in results_md.read_text().splitlines() if results_md.exists() else []:
        if line.startswith("## "):
            heading = line[3:].strip()
            sections[heading] = []
        if heading is not None:
            sections[heading].append(line)
    return {h: lines for h, lines in sections.items() if not any(line.startswith("Not run yet") for line in lines)}


def fewest_seeds(section: list[str]) -> int | None:
    """The fewest seeds of any setting in a study section, read from its table's `seeds` column."""
    section = "\n".join(section).splitlines()  # a fresh section holds its table as one multi-line item
    for i, line in enumerate(section):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and "seeds" in cells:
            column = cells.index("seeds")
            rows = itertools.takewhile(lambda row: row.startswith("|"), section[i + 2:])
            counts = [int(c) for row in rows if (c := row.strip().strip("|").split("|")[column].strip()).isdigit()]
            return min(counts) if counts else None
    return None


def seeds_overview(sections: dict[str, list[str]]) -> list[str]:
    """A line at the top: the fewest seeds per setting of every study, and what fewer than 3 means."""
    seeds = {name: fewest_seeds(lines) for name, lines in sections.items()}
    listed = ", ".join(f"{name} {n}" for name, n in seeds.items() if n is not None)
    short = [name for name, n in seeds.items() if n is not None and n < MIN_SEEDS]
    if not listed:
        return []
    text = f"Seeds per setting (the fewest in each study): {listed}."
    if short:
        text += (f" With fewer than {MIN_SEEDS} ({', '.join(short)}) a setting has no usable spread: read those "
                 "studies' rankings as untested against seed noise.")
    return [text, ""]


def bench_section(path: Path) -> list[str]:
    results = json.loads(path.read_text())
    first = results[0]
    command = (f"python simulations/bench_simulation.py --clients {first['clients']} --per-round {first['per_round']} "
               f"--rounds {first['rounds']} --cpus-per-client {' '.join(str(r['cpus_per_client']) for r in results)}")
    text = [f"## {BENCH_HEADING}", "",
            f"`{command}` (simulations/bench_simulation.py says how each figure is measured; the machine was "
            "otherwise idle). Steady state: rounds 2 and later.", "",
            "| clients | per round | CPUs per client | peak memory (RSS, all processes) | s / round | training | "
            "aggregation | evaluation | overhead |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        text.append(
            f"| {r['clients']} | {r['per_round']} | {r['cpus_per_client']} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['seconds_per_round']:.1f} | {r['training_seconds']:.1f} s | {r['aggregation_seconds']:.2f} s | "
            f"{r['evaluation_seconds']:.2f} s | {r['overhead']:.1%} |")
    return text + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", default="outputs", help="folder holding study-<name> folders (default %(default)s)")
    parser.add_argument("--bench", default="", help="JSON written by simulations/bench_simulation.py --json")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where RESULTS.md and results/ go")
    args = parser.parse_args()
    studies, docs = Path(args.studies), Path(args.docs)
    files = sorted((ROOT / "simulations" / "studies").glob("*.toml"),
                   key=lambda f: (STUDY_ORDER.index(f.stem) if f.stem in STUDY_ORDER else len(STUDY_ORDER), f.stem))
    text = ["# Results", "",
            "Generated by `python simulations/results.py` from the outputs of the shipped studies "
            "(simulations/studies/); do not edit by hand. Accuracy is exact match of the server model "
            "on the built-in suite's held-out test split, mean over its six tasks.", ""]
    kept = previous_sections(docs / "RESULTS.md")
    sections: dict[str, list[str]] = {}
    for study_file in files:
        folder = studies / f"study-{study_file.stem}"
        if folder.is_dir():
            sections[study_file.stem] = study_section(study_file, folder, docs)
        elif study_file.stem in kept:
            sections[study_file.stem] = kept[study_file.stem]
            print(f"kept the section of {study_file.stem} from the previous RESULTS.md ({folder} is absent)")
        else:
            sections[study_file.stem] = [f"## {study_file.stem}", "",
                                         f"Not run yet: `fedllm study simulations/studies/{study_file.name}`.", ""]
    text += seeds_overview(sections)
    text += [line for lines in sections.values() for line in lines]
    if args.bench:
        text += bench_section(Path(args.bench))
    elif BENCH_HEADING in kept:
        text += kept[BENCH_HEADING]
    (docs / "RESULTS.md").write_text("\n".join(text).rstrip("\n") + "\n")
    print(f"wrote {docs / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
