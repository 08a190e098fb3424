"""Run settings as key tables: each subsystem declares its run-config keys in a frozen dataclass of
its own, with a `check` for the combinations it cannot take; `fedllm.config.RunConfig` composes
them. A key is a `setting`: its hyphenated name, default, value check, what it accepts and what it
means (the README's key table is generated from these).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

LARGEST_INT = 2**31 - 1  # every integer setting is below this: seeds and counts derived from it stay in range


class ConfigError(ValueError):
    """A run-config key is unknown or has a bad value."""


def setting(key: str, default: Any, check: Callable[[Any], bool], accepts: str, doc: str) -> Any:
    """A dataclass field declaring run-config `key`."""
    return field(default=default, metadata={"check": check, "accepts": accepts, "doc": doc, "key": key})


def choice(key: str, default: str, names: Collection[str], doc: str) -> Any:
    """A key whose value is one of `names`: a registry (read when checking, so later entries count)
    or a tuple of words."""
    return setting(key, default, lambda v: v in names, one_of(names), doc)


def one_of(names: Iterable[str]) -> str:
    """'a, b or c': what a key naming a registry entry accepts, from the registry itself."""
    *rest, last = list(names)
    return f"{', '.join(rest)} or {last}" if rest else last


def positive(value: Any) -> bool:
    return value > 0


def anything(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Settings:
    """A subsystem's settings. `check` refuses combinations of its keys (and of the keys of other
    subsystems it depends on) with a `ConfigError` that says what to change."""

    def check(self) -> None:
        """Nothing to refuse by default."""


def toml_value(value: Any) -> Any:
    """None (an unset optional key) is written as '' as in pyproject.toml."""
    return "" if value is None else value


def coerce(key: str, raw: Any, kind: str | type, accepts: str) -> Any:
    """Convert a TOML/CLI value to the field's type without silent truncation ('' = unset)."""
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind.endswith(" | None"):
        if raw == "":
            return None
        kind = kind[: -len(" | None")]
    bad = ConfigError(f"run-config {key} = {raw!r} is not accepted; expected {accepts}")
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if number and not math.isfinite(raw):
        raise ConfigError(f"run-config {key} = {raw!r} is not accepted; expected a finite value: {accepts}")
    if kind == "int":
        if not number or (isinstance(raw, float) and not raw.is_integer()):
            raise bad
        if abs(int(raw)) > LARGEST_INT:
            raise ConfigError(f"run-config {key} = {raw!r} is out of range; expected {accepts}, below 2^31")
        return int(raw)
    if kind == "float":
        if not number:
            raise bad
        return float(raw)
    if kind == "float | str":  # a number, or a word the field's check accepts (e.g. 'auto')
        if isinstance(raw, str):
            return raw
        if not number:
            raise bad
        return float(raw)
    if kind == "str":
        if not isinstance(raw, str):
            raise bad
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            raise bad
        return raw
    raise bad
