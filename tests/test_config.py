"""The run config: defaults match pyproject, unknown keys and bad values name the key."""

from __future__ import annotations

import tomllib

import pytest

from fedllm.config import ConfigError, RunConfig, describe
from tests.conftest import PROJECT


def app_config() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_config_parses_to_the_dataclass_defaults():
    assert RunConfig.from_flower(app_config()) == RunConfig()


def test_unknown_key_is_named_with_the_known_keys():
    with pytest.raises(ConfigError, match=r"unknown run-config key 'lora-rnak'.*lora-rank"):
        RunConfig.from_flower({"lora-rnak": 4})


@pytest.mark.parametrize("key, value, accepts", [
    ("num-server-rounds", 0, "an integer >= 1"),
    ("num-server-rounds", 2.5, "an integer >= 1"),
    ("fraction-train", 1.5, r"a number in \(0, 1\]"),
    ("learning-rate", "fast", r"'' \(the method's default\) or a number > 0"),
    ("lora-dropout", 1.0, r"a number in \[0, 1\)"),
    ("partition", "dirichlet:-1", "'iid', 'dirichlet:<alpha>'"),
    ("aggregation", "fedsum", "weighted_average, task_arithmetic, .* or trimmed_mean"),
    ("model", "  ", "'builtin:tiny'"),
])
def test_bad_values_name_the_key_and_what_it_accepts(key, value, accepts):
    with pytest.raises(ConfigError, match=rf"{key} = .* expected {accepts}"):
        RunConfig.from_flower({key: value})


@pytest.mark.parametrize("key, value, message", [
    ("num-server-rounds", float("inf"), r"num-server-rounds = inf is not accepted; expected a finite value"),
    ("learning-rate", float("nan"), r"learning-rate = nan is not accepted; expected a finite value"),
    ("seed", 2**60, r"seed = 1152921504606846976 is out of range; expected an integer in \[0, 2\^31\)"),
    ("local-steps", 10**30, r"local-steps = 1000000000000000000000000000000 is out of range"),
])
def test_values_a_type_check_would_pass_but_no_run_can_use_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({key: value})


def test_aggregation_parameters_are_checked_against_the_operator():
    cfg = RunConfig.from_flower({"aggregation": "ties", "aggregation-density": 0.3})
    assert cfg.aggregation_params() == {"density": 0.3}
    with pytest.raises(ConfigError, match="not a parameter of aggregation 'weighted_average'; it takes no parameters"):
        RunConfig.from_flower({"aggregation-density": 0.3})
    with pytest.raises(ConfigError, match="it takes aggregation-beta"):
        RunConfig.from_flower({"aggregation": "trimmed_mean", "aggregation-scale": 2.0})
    assert RunConfig.from_flower({"aggregation-density": ""}).aggregation_density is None


def test_a_validation_split_needs_the_server_to_score_it():
    assert RunConfig.from_flower({"validation-fraction": 0.1}).validation_fraction == 0.1
    with pytest.raises(ConfigError, match="validation-fraction needs the server to score the validation split"):
        RunConfig.from_flower({"validation-fraction": 0.1, "evaluation": "clients"})
    with pytest.raises(ConfigError, match=r"validation-fraction = 1.0 is not accepted; expected a number in \[0, 1\)"):
        RunConfig.from_flower({"validation-fraction": 1.0})


def test_digest_ignores_output_dir_but_not_settings():
    base = RunConfig.from_flower({})
    assert base.digest() == RunConfig.from_flower({"output-dir": "/elsewhere"}).digest()
    assert base.digest() != RunConfig.from_flower({"seed": 1}).digest()


def test_describe_lists_every_key():
    table = describe()
    for key in app_config():
        assert f"`{key}`" in table


def test_readme_documents_every_key_with_its_default():
    readme = (PROJECT / "README.md").read_text()
    for row in describe().splitlines()[2:]:
        assert row in readme, f"README.md is missing or outdated for: {row}"


def test_a_run_config_string_flower_cannot_read_is_a_config_error_not_a_traceback():
    from fedllm.launch import resolved_config

    with pytest.raises(ConfigError, match=r"--run-config 'seed=1 seed=2' cannot be read: .*a key given twice"):
        resolved_config(PROJECT, "seed=1 seed=2")


def test_every_run_config_key_is_declared_in_pyproject():
    from dataclasses import fields

    assert {f.metadata["key"] for f in fields(RunConfig)} - set(app_config()) == set()
