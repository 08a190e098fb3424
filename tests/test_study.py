"""The study runner: every planned run, failures reported, reruns skip finished runs."""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from contextlib import contextmanager

import pytest

from fedllm import cli
from fedllm.cli import main as fedllm_main
from fedllm.config import ConfigError
from fedllm.launch import RunFailed
from fedllm.models import builtin_weights_digest
from fedllm import study
from fedllm.study import PlannedRun, Study, load_study, pending_runs
from tests.conftest import ONE_ACTOR_CPUS, PROJECT, client_processes_are_workers_of


def read_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def write(path, text):
    path.write_text(text)
    return path


def test_grid_and_runs_expand_to_named_runs(tmp_path):
    study = load_study(write(tmp_path / "s.toml", """
clients = 3
[base]
num-server-rounds = 2
[grid]
lora-rank = [2, 4]
seed = [0, 1, 2]
[[runs]]
aggregation = "ties"
"""))
    assert study.clients == 3 and len(study.runs) == 2 * 3 + 1
    assert study.varying == ["aggregation", "lora-rank", "seed"]
    assert study.runs[0].overrides == {"num-server-rounds": 2, "lora-rank": 2, "seed": 0}
    assert study.runs[-1].overrides == {"num-server-rounds": 2, "aggregation": "ties"}
    assert len({r.name for r in study.runs}) == len(study.runs)


def test_seeds_run_every_setting_of_the_grid_and_of_the_explicit_runs_once_per_seed(tmp_path):
    study = load_study(write(tmp_path / "s.toml", """
seeds = [0, 1, 2]
[grid]
lora-rank = [2, 4]
[[runs]]
aggregation = "ties"
"""))
    assert [(r.overrides.get("lora-rank"), r.overrides.get("aggregation"), r.overrides["seed"]) for r in study.runs] == [
        (2, None, 0), (2, None, 1), (2, None, 2), (4, None, 0), (4, None, 1), (4, None, 2),
        (None, "ties", 0), (None, "ties", 1), (None, "ties", 2)]
    assert study.varying == ["aggregation", "lora-rank", "seed"]


def test_the_setting_a_study_names_as_its_reference_runs_first_and_is_what_the_others_are_paired_against(tmp_path):
    text = 'seeds = [0, 1]\nreference = { aggregation = "weighted_average" }\n[grid]\naggregation = ["ties", "dare_ties"]\n' \
           '[[runs]]\naggregation = "weighted_average"\n'
    the_study = load_study(write(tmp_path / "s.toml", text))
    assert [r.name for r in the_study.runs[:2]] == ["aggregation=weighted_average,seed=0", "aggregation=weighted_average,seed=1"]
    rows = [summary_row(run.overrides["aggregation"], run.overrides["seed"], 0.3) for run in the_study.runs]
    assert "Against the reference (aggregation=weighted_average)" in study.separability(rows, the_study.varying)
    for reference, matches in (('{ aggregation = "median" }', 0), ('{ clients = 6 }', 3), ("{}", None)):
        with pytest.raises(ConfigError, match=f"matches {matches} settings" if matches is not None else "expected keys"):
            load_study(write(tmp_path / "bad.toml", text.replace('{ aggregation = "weighted_average" }', reference)))


def test_a_study_runs_all_its_pending_runs_inside_one_shared_ray_cluster(tmp_path, monkeypatch):
    events = []

    @contextmanager
    def recording_cluster():
        events.append("head up")
        yield None
        events.append("head down")

    def failing_run(app, run_config, clients, folder, cpus_per_client):
        events.append("run")
        raise RunFailed("no real run in this test")

    monkeypatch.setattr(cli, "shared_ray_cluster", recording_cluster)
    monkeypatch.setattr(cli, "run_simulation", failing_run)
    study_file = write(tmp_path / "two.toml", "seeds = [0, 1]\n[base]\nnum-server-rounds = 1\n")
    assert fedllm_main(["study", str(study_file), "--out", str(tmp_path / "out")]) == 1
    assert events == ["head up", "run", "run", "head down"]


@pytest.mark.parametrize("text, message", [
    ("[base]\nlora-rnak = 2", "unknown run-config key 'lora-rnak'"),
    ("[grid]\nseed = 3", r"\[grid\] seed must be a non-empty list"),
    ("[grd]\nseed = [1]", "unknown table"),
    ("clients = 0", "clients = 0; expected an integer >= 1"),
    ("[grid]\nlearning-rate = [0.1, -1.0]", "learning-rate = -1.0 is not accepted"),
    ("seeds = [0, 0]", r"seeds = \[0, 0\]; expected a list of distinct integers"),
    ("seeds = [true, false]", r"seeds = \[True, False\]; expected a list of distinct integers"),
    ("seeds = [0, 1]\n[[runs]]\nseed = 3", "remove `seed` from"),
])
def test_bad_study_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write(tmp_path / "bad.toml", text))


def test_a_tiny_study_runs_reports_and_resumes(flower_env, ray_cluster, tmp_path, capsys):
    study_file = write(tmp_path / "tiny.toml", """
clients = 2
[base]
model = "builtin:micro"
num-server-rounds = 1
local-steps = 1
train-per-task = 8
test-per-task = 2
partition = "iid"
[grid]
baseline = ["centralized", "local-only"]
seed = [0, 1]
[[runs]]
model = "builtin:nonexistent"
""")
    out, one_actor = tmp_path / "out", ["--cpus-per-client", str(ONE_ACTOR_CPUS)]
    assert fedllm_main(["study", str(study_file), "--out", str(out), *one_actor]) == 1, "one run fails, so the study says so"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 5
    failed = [r for r in rows if r["status"].startswith("failed")]
    assert len(failed) == 1 and "unknown builtin" in failed[0]["status"]

    summaries = {r["run"]: json.loads((out / "runs" / r["run"] / "summary.json").read_text()) for r in rows if r not in failed}
    assert {r["base_weights"] for r in rows if r not in failed} == {builtin_weights_digest("builtin:micro")}
    report = (out / "report.md").read_text()
    for baseline in ("centralized", "local-only"):
        accs = [s["final_accuracy"] for s in summaries.values() if s["config"]["baseline"] == baseline]
        base = statistics.fmean(s["base_accuracy"] for s in summaries.values() if s["config"]["baseline"] == baseline)
        assert len(accs) == 2
        assert f"`{baseline}`" in report
        runs = [read_rows(out / "runs" / name) for name, s in summaries.items() if s["config"]["baseline"] == baseline]
        assert re.search(rf"\| 2 \| {base:.3f} \| {statistics.fmean(accs):.3f} ± {statistics.stdev(accs):.3f} "
                         rf"\[-?\d\.\d{{3}}, -?\d\.\d{{3}}\] \| [^|]+ \|", report), baseline
        rouge = [statistics.fmean(statistics.fmean(rows[i]["metrics"]["rouge-l"].values()) for rows in runs) for i in (0, -1)]
        if "ROUGE-L: base → final" in report:  # shown where some run's ROUGE-L is not its exact match (a unit test has both)
            assert re.search(rf"`{baseline}` \|.* \| {rouge[0]:.3f} → {rouge[1]:.3f} \|", report), baseline
        # seconds per round: a client's training, the server's work, evaluation
        train = statistics.fmean(statistics.fmean(statistics.fmean(r["client_train_seconds"].values()) for r in rows[1:])
                                 for rows in runs)
        evaluate = statistics.fmean(statistics.fmean(r["evaluate_seconds"] for r in rows) for rows in runs)
        assert re.search(rf"`{baseline}` \|.* \| {train:.1f} · \d+\.\d · {evaluate:.1f} \|", report), baseline
    assert "## Failed runs" in report and (out / "accuracy_per_round.png").exists()
    assert "Against the reference (baseline=centralized, model=builtin:micro), paired over seeds at 95%" in report

    for name, summary in summaries.items():
        folder, last = out / "runs" / name, read_rows(out / "runs" / name)[-1]
        assert client_processes_are_workers_of(folder, ray_cluster), "the study's runs share one Ray cluster"
        if summary["config"]["baseline"] == "centralized":  # one client, on every partition pooled
            assert last["clients"] == 1 and list(last["client_train_seconds"]) == ["0"]
            assert {n["num_examples"] for n in summary["nodes"]} == {6 * 8}, summary["nodes"]
            assert (folder / "model").is_dir()
        else:  # every client on its own; the round's accuracy is the mean of theirs
            assert last["clients"] == 2 and sorted(last["client_accuracy"]) == ["0", "1"]
            assert last["accuracy"] == pytest.approx(statistics.fmean(last["client_accuracy"].values()))
            assert not (folder / "model").exists() and summary["adapter_truncation_error"] is None

    stamps = {name: (out / "runs" / name / "summary.json").stat().st_mtime_ns for name in summaries}
    capsys.readouterr()
    fedllm_main(["study", str(study_file), "--out", str(out), *one_actor])
    rerun = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["status"] for r in rerun if r["run"] in summaries) == ["skipped (complete)"] * 4
    assert all((out / "runs" / n / "summary.json").stat().st_mtime_ns == t for n, t in stamps.items())

    # docs/RESULTS.md's section of a study is recomputed from the same summaries
    sys.path.insert(0, str(PROJECT / "simulations"))
    import results

    section = "\n".join(results.study_section(study_file, out, tmp_path / "docs"))
    assert "4 of 5 runs finished" in section and "Not run (or failed)" in section
    for baseline in ("centralized", "local-only"):
        accs = [s["final_accuracy"] for s in summaries.values() if s["config"]["baseline"] == baseline]
        assert f" | {statistics.fmean(accs):.3f} ± {statistics.stdev(accs):.3f} [" in section
    assert (tmp_path / "docs" / "results" / "tiny" / "accuracy_per_round.png").exists()


def test_results_page_keeps_the_sections_of_studies_not_rerun(tmp_path, monkeypatch):
    """With no study folder and no --bench, regenerating docs/RESULTS.md changes nothing in it."""
    sys.path.insert(0, str(PROJECT / "simulations"))
    import results

    docs, shipped = tmp_path / "docs", (PROJECT / "docs" / "RESULTS.md").read_text()
    docs.mkdir()
    (docs / "RESULTS.md").write_text(shipped)
    monkeypatch.setattr(sys, "argv", ["results.py", "--studies", str(tmp_path / "none"), "--docs", str(docs)])
    results.main()
    assert (docs / "RESULTS.md").read_text() == shipped
    kept = results.previous_sections(docs / "RESULTS.md")
    assert {"operators", "privacy", results.BENCH_HEADING} <= set(kept), "sections with results were kept"
    not_run = [line[3:] for line in shipped.splitlines() if line.startswith("## ") and line[3:] not in kept]
    assert all(f"## {name}\n\nNot run yet" in shipped for name in not_run)


def test_the_results_page_names_the_studies_with_fewer_than_three_seeds_per_setting():
    sys.path.insert(0, str(PROJECT / "simulations"))
    import results

    def section(*seeds):
        return ["## s", "", "| aggregation | seeds | final accuracy |", "|---|---|---|",
                *(f"| `x{i}` | {n} | 0.5 |" for i, n in enumerate(seeds)), "", "| other | table |"]

    assert results.fewest_seeds(section(3, 1, 4)) == 1
    fresh = section(3, 2)  # a section just written holds its table as one multi-line item
    assert results.fewest_seeds([*fresh[:2], "\n".join(fresh[2:6]), *fresh[6:]]) == 2
    assert results.fewest_seeds(["## s", "", "Not run yet."]) is None
    overview = results.seeds_overview({"a": section(3, 3), "b": section(3, 2), "c": ["Not run yet."]})[0]
    assert "the fewest in each study): a 3, b 2." in overview and "fewer than 3 (b)" in overview


def test_a_finished_run_counts_as_done_although_its_secret_seed_was_never_saved(tmp_path):
    """Outputs leave secret-seed out, so a study that sets it must not take that for a change."""
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "summary.json").write_text(json.dumps({"config": {"dp": "central", "seed": 0}}))

    def pending(overrides: dict) -> list:
        return pending_runs(Study(clients=3, base={}, runs=[PlannedRun("r", overrides, 3)]), tmp_path)

    assert pending({"dp": "central", "secret-seed": 0}) == []
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        pending({"seed": 1})


def summary_row(setting: str, seed: int, accuracy: float) -> dict:
    return {"run": f"{setting}-{seed}", "aggregation": setting, "seed": seed, "final_accuracy": accuracy,
            "base_accuracy": 0.0, "upload_per_client_round": 1024, "wall_seconds": 10.0}


def test_a_study_table_gives_each_setting_its_spread_interval_and_paired_verdict_against_the_reference():
    accuracies = {"weighted_average": [0.30, 0.34, 0.32], "ties": [0.20, 0.25, 0.21], "median": [0.28, 0.37, 0.33]}
    rows = [summary_row(setting, seed, acc) for setting, accs in accuracies.items() for seed, acc in enumerate(accs)]
    table = study.settings_table(rows, ["aggregation", "seed"])
    # mean 0.32, std 0.02, 95% interval 0.32 ± 4.303 · 0.02 / √3
    assert "| `weighted_average` | 3 | 0.000 | 0.320 ± 0.020 [0.270, 0.370] | reference |" in table
    # ties: differences -0.10, -0.09, -0.11, always below the reference: beyond noise
    assert "| `ties` | 3 | 0.000 | 0.220 ± 0.026 [0.154, 0.286] | -0.100 [-0.125, -0.075] **beyond noise** |" in table
    assert "`median` | 3 | 0.000 | 0.327 ± 0.045" in table and "+0.007 [-0.056, +0.069] within noise" in table
    sentence = study.separability(rows, ["aggregation", "seed"])
    assert "beyond seed noise: aggregation=ties." in sentence and "Not separable from noise: aggregation=median." in sentence




def test_rouge_l_is_shown_only_where_it_is_not_exact_match_over_again():
    rows = [{**summary_row("lora", seed, 0.3), "base_rouge_l": 0.0, "final_rouge_l": 0.3} for seed in range(2)]
    assert "ROUGE-L" not in study.settings_table(rows, ["aggregation", "seed"])  # one-word answers: the same numbers
    rows[1]["final_rouge_l"] = 0.45  # a free-form task scores partly right answers
    assert "| 0.000 → 0.375 |" in study.settings_table(rows, ["aggregation", "seed"])

def test_a_setting_of_one_seed_says_so_instead_of_a_zero_spread():
    table = study.settings_table([summary_row("weighted_average", 0, 0.3), summary_row("ties", 0, 0.2)],
                                 ["aggregation", "seed"])
    assert "| `weighted_average` | 1 | 0.000 | 0.300 (one seed) | reference |" in table
    assert "| `ties` | 1 | 0.000 | 0.200 (one seed) | -0.100 (one seed) |" in table and "± 0.000" not in table

def test_settings_are_chosen_on_validation_and_reported_on_test():
    """Per operator, the density with the best mean validation accuracy is chosen, and its test
    accuracy reported, even where another density scores better on the test split."""
    results = {  # (aggregation, density): per seed (validation, test)
        ("ties", 0.2): [(0.40, 0.30), (0.42, 0.31), (0.41, 0.29)],
        ("ties", 0.5): [(0.35, 0.36), (0.36, 0.38), (0.34, 0.37)],  # better on test, worse on validation
        ("dare_ties", 0.2): [(0.20, 0.21), (0.22, 0.20), (0.21, 0.22)],
        ("dare_ties", 0.5): [(0.30, 0.25), (0.31, 0.27), (0.29, 0.26)],
    }
    rows = [{**summary_row(operator, seed, test), "aggregation-density": density, "final_validation_accuracy": validation}
            for (operator, density), runs in results.items() for seed, (validation, test) in enumerate(runs)]
    table = study.selection_table(rows, ["aggregation", "aggregation-density", "seed"], ["aggregation"])
    assert "| `ties` | aggregation-density=0.2 | 0.410 | 0.300 ± 0.010 [0.275, 0.325] | 0.370 |" in table
    assert "| `dare_ties` | aggregation-density=0.5 | 0.300 | 0.260 ± 0.010 [0.235, 0.285] | 0.260 |" in table


def test_selection_needs_a_validation_split_and_keys_the_study_varies(tmp_path):
    grid = "[grid]\naggregation = [\"ties\", \"dare_ties\"]\naggregation-density = [0.2, 0.5]\n"
    with pytest.raises(ConfigError, match="set validation-fraction"):
        load_study(write(tmp_path / "a.toml", grid + "[select]\nwithin = [\"aggregation\"]\n"))
    with pytest.raises(ConfigError, match=r"\[select\] takes within = \[keys the study varies\]"):
        load_study(write(tmp_path / "b.toml", "[base]\nvalidation-fraction = 0.1\n" + grid + "[select]\nwithin = [\"lora-rank\"]\n"))
    chosen = load_study(write(tmp_path / "c.toml", "[base]\nvalidation-fraction = 0.1\n" + grid + "[select]\nwithin = [\"aggregation\"]\n"))
    assert chosen.select_within == ["aggregation"]


def test_plots_show_only_the_rounds_a_study_evaluated(tmp_path, monkeypatch):
    """With evaluate-every = 2 the rounds between carry no accuracy: the curves skip them."""
    the_study = load_study(write(tmp_path / "s.toml", "seeds = [0, 1]\n[base]\nnum-server-rounds = 4\nevaluate-every = 2\n"))
    rows = []
    for run in the_study.runs:
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        metrics = [{"round": i, "upload_bytes": 100 * i, **({"accuracy": 0.1 * i} if i % 2 == 0 else {})} for i in range(5)]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))
        rows.append({**run.overrides, "run": run.name, "final_accuracy": 0.4})
    curves = {}
    monkeypatch.setattr(study, "_plot", lambda points, path, *args, **kwargs: curves.update({path.name: points}))
    study.plot_study(rows, the_study, tmp_path / "runs", tmp_path)
    assert curves["accuracy_per_round.png"] == {"base": ([0, 2, 4], [[0.0, 0.0], [0.2, 0.2], [0.4, 0.4]])}
    assert curves["accuracy_vs_upload.png"] == {"base": ([300, 1000], [[0.2, 0.2], [0.4, 0.4]])}
