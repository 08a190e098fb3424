"""Studies: many federated runs from one TOML file, with a table, a report and plots.

A study file has `clients` (simulated nodes per run, default 6), a `[base]` table of run-config
keys, a `[grid]` table of key = list of values whose cross product is run (`seed` is a key like
any other), and optionally `[[runs]]`, explicit override tables run on top of `[base]`, and
`seeds = [...]`: every setting of the grid and of `[[runs]]` is run once per seed. `clients`
may also be a key of `[grid]` or `[[runs]]` (a client-count sweep). A `[select]` table with
`within = [keys]` tunes on the validation split: for each value of those keys (e.g. each
`aggregation`), the setting of the other varying keys with the best mean validation accuracy over
seeds is chosen, and its test accuracy reported (the runs need `validation-fraction` > 0). Every run
gets its own folder under `<out>/runs/`; a run whose `summary.json` exists is skipped, so an
interrupted study continues where it stopped. A run that fails is reported and the study goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.config import SECRET_KEYS, ConfigError, RunConfig
from fedllm.evaluation import ROUGE_L, mean_over_tasks
from fedllm.outputs import earlier_run


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its folder name, its run-config overrides and its simulated nodes."""

    name: str
    overrides: dict[str, Any]
    clients: int


@dataclass
class Study:
    clients: int
    base: dict[str, Any]
    runs: list[PlannedRun]
    varying: list[str] = field(default_factory=list)  # keys that differ between runs (table columns)
    select_within: list[str] | None = None  # `[select] within`: tune the other keys on validation, per value of these


def _value_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def run_config_text(overrides: dict[str, Any]) -> str:
    """The `--run-config` string for a dict of overrides."""
    return " ".join(f"{key}={_value_text(value)}" for key, value in overrides.items())


def _slug(overrides: dict[str, Any], keys: list[str]) -> str:
    parts = [f"{key}={overrides[key]}" for key in keys if key in overrides]
    text = ",".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in text)


def load_study(path: Path) -> Study:
    """Read and check a study file; unknown run-config keys and bad shapes are `ConfigError`s."""
    try:
        spec = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"study file {path}: {error}") from None
    unknown = set(spec) - {"clients", "seeds", "reference", "base", "grid", "runs", "select"}
    if unknown:
        raise ConfigError(f"study file {path}: unknown table(s) {sorted(unknown)}; use clients, seeds, reference, [base], "
                          "[grid], [[runs]], [select]")
    base, grid, extra = spec.get("base", {}), spec.get("grid", {}), spec.get("runs", [])
    clients = spec.get("clients", 6)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"study file {path}: [grid] {key} must be a non-empty list of values")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    settings = [{"clients": clients, **base, **combo} for combo in combos]
    settings += [{"clients": clients, **base, **run} for run in extra]
    if "reference" in spec:
        settings = _reference_first(path, spec["reference"], settings)
    if "seeds" in spec:
        seeds = _seeds(path, spec["seeds"], settings)
        settings = [{**setting, "seed": seed} for setting in settings for seed in seeds]
    for setting in settings:
        if not isinstance(setting["clients"], int) or setting["clients"] < 1:
            raise ConfigError(f"study file {path}: clients = {setting['clients']!r}; expected an integer >= 1")
        overrides = {k: v for k, v in setting.items() if k != "clients"}
        RunConfig.check_keys(overrides)
        RunConfig.from_flower(overrides)
    varying = sorted({k for s in settings for k in s if any(s.get(k) != t.get(k) for t in settings)})
    names = [_slug(s, varying) for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"study file {path}: two runs have identical settings")
    runs = [PlannedRun(n, {k: v for k, v in s.items() if k != "clients"}, s["clients"]) for n, s in zip(names, settings)]
    return Study(clients, base, runs, varying, _select_within(path, spec.get("select"), runs, varying))


def _seeds(path: Path, seeds: Any, settings: list[dict[str, Any]]) -> list[int]:
    """The study's `seeds`, checked: distinct integers, and no setting naming its own seed."""
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"study file {path}: seeds = {seeds!r}; expected a list of distinct integers, e.g. [0, 1, 2]")
    if any("seed" in setting for setting in settings):
        raise ConfigError(f"study file {path}: seeds runs every setting once per seed; remove `seed` from [base], "
                          "[grid] and [[runs]]")
    return seeds


def _reference_first(path: Path, reference: Any, settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings with the one `reference` names moved first: every other setting is paired against it."""
    if not isinstance(reference, dict) or not reference:
        raise ConfigError(f"study file {path}: reference = {reference!r}; expected keys naming one setting, e.g. "
                          "reference = { aggregation = \"weighted_average\" }")
    matching = [s for s in settings if all(s.get(k) == v for k, v in reference.items())]
    if len(matching) != 1:
        raise ConfigError(f"study file {path}: reference {reference} matches {len(matching)} settings; name exactly "
                          "one (seeds aside)")
    return matching + [s for s in settings if s is not matching[0]]


def _select_within(path: Path, select: Any, runs: list[PlannedRun], varying: list[str]) -> list[str] | None:
    """`[select] within`, checked: keys that vary, and runs that hold out a validation split."""
    if select is None:
        return None
    within = select.get("within") if isinstance(select, dict) else None
    if not isinstance(within, list) or set(select) != {"within"} or not all(k in varying for k in within):
        raise ConfigError(f"study file {path}: [select] takes within = [keys the study varies], e.g. within = "
                          f"[\"aggregation\"]; it varies {varying}")
    if any(RunConfig.from_flower(r.overrides).validation_fraction == 0 for r in runs):
        raise ConfigError(f"study file {path}: [select] tunes on the validation split: set validation-fraction "
                          "(e.g. 0.1) in [base]")
    return within


def execute(study: Study, out: Path, run: Callable[[str, int, Path], None]) -> list[dict[str, Any]]:
    """Run (or skip, if complete) every planned run; returns one result row per run.

    `run(run_config, clients, folder)` performs a run and raises on failure; in production it is
    `fedllm.launch.run_simulation` bound to the app folder.
    """
    rows = []
    for planned in study.runs:
        folder = out / "runs" / planned.name
        status = "skipped (complete)" if _completed(folder, planned) else "ran"
        settings = {"run": planned.name, "clients": planned.clients, **planned.overrides}
        if status == "ran":
            resume = " resume=true" if earlier_run(folder) else ""  # a run cut short continues where it stopped
            try:
                run(run_config_text(planned.overrides) + resume, planned.clients, folder)
            except Exception as error:  # noqa: BLE001 - a failed run is reported, the study goes on
                rows.append({**settings, "status": f"failed: {error}"})
                continue
        rows.append({**settings, "status": status, **_summary_fields(folder)})
    return rows


def machine() -> dict[str, Any]:
    """What a study ran on and with: written beside its results (`machine.json`)."""
    import datetime
    import os
    import platform
    import subprocess
    from importlib.metadata import version

    import psutil

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {
        "date": datetime.date.today().isoformat(), "platform": platform.platform(), "processor": platform.machine(),
        "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "gpu": _gpu_name(), "python": platform.python_version(), "fedllm_commit": commit or "unknown",
        **{package: version(package) for package in ("torch", "flwr", "peft", "transformers")},
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def pending_runs(study: Study, out: Path) -> list[PlannedRun]:
    """The runs of `study` that have no finished result in `out` yet."""
    return [planned for planned in study.runs if not _completed(out / "runs" / planned.name, planned)]


def _completed(folder: Path, planned: PlannedRun) -> bool:
    """Whether `folder` holds a finished run of exactly these settings (else it must be run)."""
    path = folder / "summary.json"
    if not path.exists():
        return False
    ran = json.loads(path.read_text())["config"]
    differing = [k for k, v in planned.overrides.items() if ran.get(k) != v and k not in SECRET_KEYS]  # never saved
    if differing:
        raise ConfigError(
            f"{folder} holds a finished run with other settings ({', '.join(differing)}); "
            "use another --out for a changed study"
        )
    return True


def _summary_fields(folder: Path) -> dict[str, Any]:
    summary, rows = json.loads((folder / "summary.json").read_text()), _metrics(folder)
    client_rounds = sum(row.get("clients", 0) for row in rows[1:])
    fields = {
        "final_accuracy": summary["final_accuracy"], "base_accuracy": summary["base_accuracy"],
        "upload_bytes": summary["upload_bytes"], "download_bytes": summary["download_bytes"],
        "upload_per_client_round": round(summary["upload_bytes"] / max(client_rounds, 1)),
        "wall_seconds": round(summary["wall_seconds"], 1),
        **_round_seconds(rows),
        **{f"acc_{task}": acc for task, acc in summary["per_task_accuracy"].items()},
    }
    if families := rows[-1].get("family_accuracy"):  # cooperation: the clients' own merged models
        fields["client_model_accuracy"] = statistics.fmean(families.values())
    for optional in ("epsilon", "base_weights", "final_validation_accuracy"):
        if summary.get(optional) is not None:
            fields[optional] = summary[optional]
    scored = [row for row in rows if ROUGE_L in row.get("metrics", {})]  # rows before fedllm recorded it lack it
    if scored:  # the free-form view of the same answers, whatever the headline metric
        fields["base_rouge_l"], fields["final_rouge_l"] = (mean_over_tasks(row["metrics"][ROUGE_L])
                                                           for row in (scored[0], scored[-1]))
    return fields


def _round_seconds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per round of a client's local training, the server's work (re-factoring,
    merging and, in cooperation, distilling and answering) and evaluation (over the rounds scored)."""
    trained, scored = rows[1:], [r for r in rows if "evaluate_seconds" in r]
    if not trained:
        return {}
    per_client = [statistics.fmean(r["client_train_seconds"].values()) for r in trained if r.get("client_train_seconds")]
    return {
        "train_seconds_round": statistics.fmean(per_client) if per_client else 0.0,
        "server_seconds_round": statistics.fmean(r.get("refactor_seconds", 0.0) + r.get("aggregate_seconds", 0.0)
                                                 + r.get("cooperation_seconds", 0.0) for r in trained),
        "evaluate_seconds_round": statistics.fmean(r["evaluate_seconds"] for r in scored) if scored else 0.0,
    }


def _setting(row: dict[str, Any], key: str) -> Any:
    """A run's value of `key`: its override, else the default (shown as such, never as None)."""
    return row[key] if key in row else RunConfig.from_flower({}).as_dict()[key]


def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def write_results(rows: list[dict[str, Any]], out: Path) -> Path:
    """`results.csv`: one row per run, every column any row has."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = out / "results.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# Student's t 0.975 quantiles by degrees of freedom (any statistics table).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def interval95(values: list[float]) -> tuple[float, float] | None:
    """The 95% confidence interval of the mean of `values` (Student's t), or None for fewer than two."""
    if len(values) < 2:
        return None
    df = len(values) - 1
    t = T_975[max(d for d in T_975 if d <= df)]  # between entries the smaller df's larger t: conservative
    half = t * statistics.stdev(values) / len(values) ** 0.5
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def mean_spread_text(values: list[float]) -> str:
    """`mean ± std [95% interval]` over seeds, or `mean (one seed)`: how every study table shows accuracy."""
    interval = interval95(values)
    if interval is None:
        return f"{statistics.fmean(values):.3f} (one seed)"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def paired_difference(members: list[dict[str, Any]], reference: list[dict[str, Any]]) -> tuple[float, tuple | None]:
    """Mean over shared seeds of (final accuracy − the reference's at the same seed), and its 95% interval."""
    theirs = {_setting(r, "seed"): r["final_accuracy"] for r in reference}
    differences = [r["final_accuracy"] - theirs[seed] for r in members if (seed := _setting(r, "seed")) in theirs]
    return (statistics.fmean(differences) if differences else float("nan")), interval95(differences)


def beyond_noise(interval: tuple[float, float] | None) -> bool:
    """Whether a paired 95% interval excludes 0."""
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def _grouped(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Completed runs by their setting (the varying keys but the seed), in the study's order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if "final_accuracy" in row:
            groups.setdefault(tuple(_setting(row, k) for k in keys), []).append(row)
    return groups


def settings_table(rows: list[dict[str, Any]], varying: list[str]) -> str:
    """Markdown: per setting, mean ± std of final accuracy over seeds with its 95% interval, the
    paired difference to the reference setting (the study's first, which `reference` names if set)
    and whether it is beyond seed noise, the mean ROUGE-L over tasks before and after (when every
    run recorded it and it is not exact match over again), the clients' own merged models' accuracy
    (in cooperation), mean upload bytes per client per round, seconds per round, mean wall time, and
    mean per-task accuracy."""
    keys = [k for k in varying if k != "seed"]
    groups = _grouped(rows, keys)
    reference = next(iter(groups), None)
    tasks = list(dict.fromkeys(k for row in rows for k in row if k.startswith("acc_")))
    runs = [r for members in groups.values() for r in members]
    # final_rouge_l comes with base_rouge_l; on one-word answers (the letter tasks') it equals exact match
    rouge = all("final_rouge_l" in r for r in runs) and not all(
        math.isclose(r[f"{when}_rouge_l"], r[f"{when}_accuracy"], abs_tol=1e-9)
        for r in runs for when in ("base", "final"))
    families = any("client_model_accuracy" in r for r in runs)  # cooperation
    header = keys + ["seeds", "base", "final accuracy: mean ± std [95% interval]", "vs reference, paired over seeds"]
    header += ["ROUGE-L: base → final"] if rouge else []
    header += ["client model accuracy"] if families else []
    header += ["upload / client / round", "s / round: client train · server · evaluation", "wall time"]
    header += [t[len("acc_"):] for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranked = sorted(groups.items(), key=lambda item: -statistics.fmean(r["final_accuracy"] for r in item[1]))
    for setting, members in ranked:
        accs = [r["final_accuracy"] for r in members]
        per_task = [f"{statistics.fmean(r[t] for r in members):.2f}" for t in tasks]
        upload = statistics.fmean(r["upload_per_client_round"] for r in members)
        wall = statistics.fmean(r["wall_seconds"] for r in members)
        base = statistics.fmean(r["base_accuracy"] for r in members)
        split = " · ".join(f"{statistics.fmean(r.get(k, 0.0) for r in members):.1f}"
                           for k in ("train_seconds_round", "server_seconds_round", "evaluate_seconds_round"))
        cells = [f"`{v}`" if v != "" else "–" for v in setting]  # '' is an unset optional key
        cells += [str(len(accs)), f"{base:.3f}", mean_spread_text(accs)]
        cells.append(_versus(members, groups[reference]) if setting != reference else "reference")
        if rouge:
            cells.append(" → ".join(f"{statistics.fmean(r[f'{when}_rouge_l'] for r in members):.3f}"
                                    for when in ("base", "final")))
        if families:
            own = [r["client_model_accuracy"] for r in members if "client_model_accuracy" in r]
            cells.append(f"{statistics.fmean(own):.3f}" if own else "–")
        cells += [_kib(upload), split, f"{wall:.0f} s"] + per_task
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versus(members: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    mean, interval = paired_difference(members, reference)
    if interval is None:
        return "–" if math.isnan(mean) else f"{mean:+.3f} (one seed)"
    verdict = "**beyond noise**" if beyond_noise(interval) else "within noise"
    return f"{mean:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}] {verdict}"


def separability(rows: list[dict[str, Any]], varying: list[str]) -> str:
    """One sentence: which settings differ from the reference beyond seed noise, and which do not."""
    keys = [k for k in varying if k != "seed"]
    groups = _grouped(rows, keys)
    if len(groups) < 2:
        return ""
    reference, *others = groups

    def label(setting: tuple) -> str:  # what differs from the reference
        return ", ".join(_assignment(k, v) for k, v, r in zip(keys, setting, reference) if v != r) or "base"

    verdicts = {setting: paired_difference(groups[setting], groups[reference]) for setting in others}
    apart = [label(s) for s, (_, interval) in verdicts.items() if beyond_noise(interval)]
    within = [label(s) for s, (_, interval) in verdicts.items() if interval is not None and not beyond_noise(interval)]
    unknown = [label(s) for s, (_, interval) in verdicts.items() if interval is None]
    named = ", ".join(_assignment(k, v) for k, v in zip(keys, reference)) or "base"
    text = [f"Against the reference ({named}), paired over seeds at 95%:",
            f"beyond seed noise: {'; '.join(apart) or 'none'}.",
            f"Not separable from noise: {'; '.join(within) or 'none'}."]
    if unknown:
        text.append(f"Fewer than two shared seeds, so not tested: {'; '.join(unknown)}.")
    return " ".join(text)


def selection_table(rows: list[dict[str, Any]], varying: list[str], within: list[str]) -> str:
    """Markdown: per value of the `within` keys, the setting of the other keys chosen by mean
    validation accuracy over seeds, and its test accuracy; beside it, the best test accuracy of any
    setting, which is what choosing on the test split would have reported."""
    keys = [k for k in varying if k != "seed"]
    tuned = [k for k in keys if k not in within]
    candidates: dict[tuple, list[tuple[tuple, list[dict[str, Any]]]]] = {}
    for setting, members in _grouped(rows, keys).items():
        if all("final_validation_accuracy" in r for r in members):
            named = dict(zip(keys, setting))
            candidates.setdefault(tuple(named[k] for k in within), []).append((setting, members))
    header = [*within, "chosen on validation", "validation", "test: mean ± std [95% interval]", "best test of any setting"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, options in candidates.items():
        chosen, members = max(options, key=lambda o: statistics.fmean(r["final_validation_accuracy"] for r in o[1]))
        named = dict(zip(keys, chosen))
        tests = [r["final_accuracy"] for r in members]
        best_test = max(statistics.fmean(r["final_accuracy"] for r in m) for _, m in options)
        cells = [f"`{v}`" for v in method]
        cells += [", ".join(_assignment(k, named[k]) for k in tuned) or "–",
                  f"{statistics.fmean(r['final_validation_accuracy'] for r in members):.3f}",
                  mean_spread_text(tests),
                  f"{best_test:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _assignment(key: str, value: Any) -> str:
    """`key=value` as the report names a setting; '' is an optional key left to its default."""
    return f"{key}={value if value != '' else 'default'}"


def _kib(size: float) -> str:
    return f"{size / 1024:,.1f} KiB"


def _clients_text(study: Study) -> str:
    counts = sorted({r.clients for r in study.runs})
    return f"{counts[0]} simulated clients each" if len(counts) == 1 else "simulated clients as in the table"


def write_report(study_file: Path, study: Study, rows: list[dict[str, Any]], out: Path) -> Path:
    failed = [r for r in rows if str(r["status"]).startswith("failed")]
    text = [f"# Study `{study_file.name}`", "",
            f"`fedllm study {study_file} --out {out}`: {len(rows)} runs, {_clients_text(study)}, "
            f"base settings `{run_config_text(study.base) or 'defaults'}`.", "",
            settings_table(rows, study.varying), "", separability(rows, study.varying), ""]
    if study.select_within is not None:
        text += ["## Chosen on the validation split", "",
                 "Each setting is chosen by its mean validation accuracy over seeds; the test split played no part.",
                 "", selection_table(rows, study.varying, study.select_within), ""]
    if failed:
        text += ["## Failed runs", ""] + [f"- `{r['run']}`: {r['status']}" for r in failed] + [""]
    text += ["![accuracy per round](accuracy_per_round.png)", "", "![accuracy against upload](accuracy_vs_upload.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    plot_study(rows, study, out / "runs", out)
    return path


def plot_study(rows: list[dict[str, Any]], study: Study, runs: Path, out: Path) -> None:
    """Mean accuracy per round per setting, and mean accuracy against cumulative upload bytes
    (from the run folders under `runs`, into `out`)."""
    keys = [k for k in study.varying if k != "seed"]
    runs_by_label: dict[str, list[list[dict[str, Any]]]] = {}
    for row in rows:
        if "final_accuracy" in row:
            label = ", ".join(_assignment(k, _setting(row, k)) for k in keys) or "base"
            runs_by_label.setdefault(label, []).append(_metrics(runs / row["run"]))
    per_round, per_byte = {}, {}
    for label, runs in sorted(runs_by_label.items()):
        length = min(map(len, runs))
        upload = list(itertools.accumulate(statistics.fmean(r[i].get("upload_bytes", 0) for r in runs)
                                           for i in range(length)))
        accuracy = {i: [r[i]["accuracy"] for r in runs] for i in range(length)
                    if all("accuracy" in r[i] for r in runs)}  # evaluate-every skips rounds
        per_round[label] = (list(accuracy), list(accuracy.values()))
        sent = [i for i in accuracy if i > 0]  # round 0 has sent nothing (no point on a log axis)
        per_byte[label] = ([upload[i] for i in sent], [accuracy[i] for i in sent])
    _plot(per_round, out / "accuracy_per_round.png", "round", "server model per round", log_x=False)
    _plot(per_byte, out / "accuracy_vs_upload.png", "cumulative upload bytes (all clients)", "accuracy against upload",
          log_x=True)


def _plot(curves: dict[str, tuple[list[float], list[list[float]]]], path: Path, xlabel: str, title: str,
          log_x: bool) -> None:
    """One line per setting at the mean over seeds, with error bars of ± one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, samples) in curves.items():
        means = [statistics.fmean(v) for v in samples]
        spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in samples]
        ax.errorbar(xs, means, yerr=spreads, marker=".", capsize=2, label=label)
    ax.set(xlabel=xlabel, ylabel="accuracy (mean ± std over seeds)", title=title)
    if log_x:
        ax.set_xscale("log")
    if curves:  # a study whose runs all failed has nothing to label
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
