"""Loading instruction data sets from local JSON / JSONL / CSV files and from the Hugging Face hub.

Every record has the Alpaca fields ``instruction`` and ``output`` (required), ``input``
(optional, default "") and ``task`` (optional, default "default"); other fields are ignored.

Value rules (the same for every format):
- strings are taken as they are; ints and floats are converted with ``str()`` (e.g. an answer
  ``42``); booleans, lists, objects and non-finite numbers are rejected, naming the field;
- ``null`` (JSON) for an optional field means "absent" (its default); for a required field it is
  an error; a required field that is empty or only whitespace is an error;
- an empty ``task`` (e.g. an empty CSV cell) means "default"; task names are stripped.

Errors are ``DatasetError`` and name the file and where: ``line N`` for JSONL and CSV (CSV counts
the header as line 1; a record spanning several lines is named by its first line) and
``record N`` for JSON (N is the index in the top-level list, from 0).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from fedllm.data.example import Example

__all__ = ["DatasetError", "load_examples", "load_hf_dataset"]

_EXTENSIONS = (".json", ".jsonl", ".csv")
_FIELDS_HINT = "each record needs 'instruction' and 'output'; 'input' and 'task' are optional"


class DatasetError(ValueError):
    """A data set could not be loaded; the message says which file, where and why."""


def load_examples(path: str | Path, *, outputs: bool = True) -> list[Example]:
    """Load a local instruction data set; the format is chosen by the extension
    (.json: a top-level list of objects, .jsonl: one object per line, .csv: header row). With
    `outputs` False (prompts only, e.g. public prompts) an example's output may be missing: ''."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DatasetError(
            f"{path}: unsupported file extension {path.suffix or '(none)'!r}; "
            f"accepted: {', '.join(_EXTENSIONS)}"
        )
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file")
    try:
        # utf-8-sig: tolerate the byte-order mark spreadsheet programs write; newline="" keeps
        # line endings inside quoted CSV values as they are (the csv module's requirement)
        with path.open(encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc})") from exc
    loader = {".json": _load_json, ".jsonl": _load_jsonl, ".csv": _load_csv}[suffix]
    examples = loader(text, str(path), outputs)
    if not examples:
        raise DatasetError(f"{path}: no records found")
    return examples


def load_hf_dataset(name: str, split: str = "train") -> list[Example]:
    """Load an Alpaca-layout data set (instruction/input/output[/task]) from the Hugging Face hub."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split)
    except Exception as exc:  # no network, unknown name, bad split, ...
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(exc).__name__}: {exc}. If the hub is unreachable, pass the path of a local "
            f".json/.jsonl/.csv file instead"
        ) from exc
    where = f"{name}[{split}]"
    examples = [_to_example(row, f"{where} row {i}") for i, row in enumerate(dataset)]
    if not examples:
        raise DatasetError(f"{where}: no records found")
    return examples


# --------------------------------------------------------------------------------------------


def _load_json(text: str, name: str, outputs: bool = True) -> list[Example]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{name} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise _too_deep(name) from exc
    if not isinstance(data, list):
        raise DatasetError(
            f"{name}: expected a top-level JSON list of records, got {_kind(data)} "
            f"(use .jsonl for one object per line)"
        )
    return [_to_example(record, f"{name} record {i}", outputs) for i, record in enumerate(data)]


def _load_jsonl(text: str, name: str, outputs: bool = True) -> list[Example]:
    examples = []
    # split on "\n" only: str.splitlines would also split at U+2028, legal inside JSON strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{name} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        except RecursionError as exc:
            raise _too_deep(f"{name} line {lineno}") from exc
        examples.append(_to_example(record, f"{name} line {lineno}", outputs))
    return examples


def _too_deep(where: str) -> DatasetError:
    """The error for JSON nested deeper than Python's parser recurses (records need only one level)."""
    return DatasetError(
        f"{where}: the JSON is nested too deeply to parse; a record is one object of text fields, "
        f"so remove the nested lists or objects"
    )


def _load_csv(text: str, name: str, outputs: bool = True) -> list[Example]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    examples = []
    header: list[str] | None = None
    line = 0  # last physical line consumed; a record spanning lines is named by its first
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            if header is None:
                header = [cell.strip() for cell in row]
                duplicates = sorted({c for c in header if header.count(c) > 1})
                if duplicates:
                    raise DatasetError(f"{name} line {start}: duplicate columns {duplicates}")
                for field in ("instruction", "output") if outputs else ("instruction",):
                    if field not in header:
                        raise DatasetError(
                            f"{name} line {start}: the header has no {field!r} column "
                            f"({_FIELDS_HINT}; found columns {header})"
                        )
                continue
            if len(row) > len(header):
                raise DatasetError(
                    f"{name} line {start}: {len(row)} values but the header has "
                    f"{len(header)} columns (quote values that contain commas)"
                )
            examples.append(_to_example(dict(zip(header, row)), f"{name} line {start}", outputs))
    except csv.Error as exc:
        # raised while reading the next record, which starts on line `line + 1`
        raise DatasetError(f"{name} line {line + 1}: malformed CSV ({exc})") from exc
    return examples


def _to_example(record: Any, where: str, outputs: bool = True) -> Example:
    """Validate one record (``where`` names file and position) and build the Example."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object with named fields, got {_kind(record)}")
    values = {}
    for field, required in (("instruction", True), ("input", False), ("output", outputs), ("task", False)):
        value = record.get(field)
        if value is None:
            if required:
                if field in record:
                    message = f"field {field!r} is null"
                else:
                    message = f"missing required field {field!r}"
                raise DatasetError(f"{where}: {message} ({_FIELDS_HINT})")
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise DatasetError(f"{where}: field {field!r} must be text, got {value!r}")
            value = str(value)
        if not isinstance(value, str):
            raise DatasetError(
                f"{where}: field {field!r} must be text (a string or a number), got {_kind(value)}"
            )
        if required and not value.strip():
            raise DatasetError(f"{where}: field {field!r} is empty")
        values[field] = value
    task = values.get("task", "").strip() or "default"
    return Example(values["instruction"], values.get("input", ""), values.get("output", ""), task)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", str: "a string"}.get(
        type(value), type(value).__name__
    )
