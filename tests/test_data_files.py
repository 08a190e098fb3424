"""Loading local instruction data sets: formats, defaults and error messages."""

from __future__ import annotations

import json

import pytest

from fedllm.data.example import Example
from fedllm.data.files import DatasetError, load_examples, load_hf_dataset

HINT = "each record needs 'instruction' and 'output'; 'input' and 'task' are optional"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- formats


def test_json_list(tmp_path):
    records = [
        {"instruction": "Add", "input": "2 3", "output": "5", "task": "add"},
        {"instruction": "Say hi", "output": "hi", "extra": [1, 2]},  # unknown field ignored
    ]
    path = write(tmp_path, "data.json", json.dumps(records))
    assert load_examples(path) == [
        Example("Add", "2 3", "5", "add"),
        Example("Say hi", "", "hi", "default"),
    ]


def test_jsonl_with_blank_lines(tmp_path):
    text = (
        '{"instruction": "a", "output": "1"}\n'
        "\n"
        "   \n"
        '{"instruction": "b", "input": "x", "output": "2", "task": "t"}\n'
        "\n"
    )
    path = write(tmp_path, "data.jsonl", text)
    assert load_examples(str(path)) == [Example("a", "", "1"), Example("b", "x", "2", "t")]


def test_jsonl_keeps_unicode_line_separator_inside_strings(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a\u2028b", "output": "c"}\n')
    assert load_examples(path) == [Example("a\u2028b", "", "c")]


def test_csv_quoted_commas_and_newlines(tmp_path):
    text = (
        "instruction,input,output,task\n"
        '"Sum, please","1,2","3",math\n'
        '"Write two lines","","line one\nline two",poem\n'
        "Echo,,ok,\n"
    )
    path = write(tmp_path, "data.csv", text)
    assert load_examples(path) == [
        Example("Sum, please", "1,2", "3", "math"),
        Example("Write two lines", "", "line one\nline two", "poem"),
        Example("Echo", "", "ok", "default"),
    ]


def test_csv_without_optional_columns_and_crlf(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfoutput,instruction\r\n"a\r\nb",q\r\n')  # BOM, CRLF
    assert load_examples(path) == [Example("q", "", "a\r\nb", "default")]


def test_numbers_converted_for_values(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([{"instruction": "n", "input": 3, "output": 4.5, "task": 7}]))
    assert load_examples(path) == [Example("n", "3", "4.5", "7")]


def test_null_optional_fields_mean_default(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "i", "input": null, "output": "o", "task": null}\n')
    assert load_examples(path) == [Example("i", "", "o", "default")]


def test_extension_case_insensitive(tmp_path):
    path = write(tmp_path, "D.JSONL", '{"instruction": "i", "output": "o"}')
    assert load_examples(path) == [Example("i", "", "o")]


# ---------------------------------------------------------------------------- errors


def error(path) -> str:
    with pytest.raises(DatasetError) as info:
        load_examples(path)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_jsonl_missing_output_names_line_and_field(tmp_path):
    lines = ['{"instruction": "a", "output": "1"}'] * 6 + ['{"instruction": "b"}']
    path = write(tmp_path, "data.jsonl", "\n".join(lines) + "\n")
    message = error(path)
    assert f"data.jsonl line 7: missing required field 'output' ({HINT})" in message


def test_jsonl_blank_lines_count_in_line_numbers(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"instruction": "a", "output": "1"}\n\n\n{"output": "1"}\n')
    assert "data.jsonl line 4: missing required field 'instruction'" in error(path)


def test_jsonl_invalid_json_names_line(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"instruction": "a", "output": "1"}\n{"instruction": "a",}\n')
    message = error(path)
    assert "data.jsonl line 2: invalid JSON" in message


def test_jsonl_line_not_an_object(tmp_path):
    path = write(tmp_path, "data.jsonl", '["instruction", "output"]\n')
    assert "data.jsonl line 1: expected an object" in error(path)


def test_json_record_index(tmp_path):
    records = [{"instruction": "a", "output": "1"}, {"instruction": "b", "output": "2"}, {"instruction": "c"}]
    path = write(tmp_path, "data.json", json.dumps(records))
    assert "data.json record 2: missing required field 'output'" in error(path)


def test_json_invalid_and_not_a_list(tmp_path):
    path = write(tmp_path, "data.json", '[\n{"instruction": "a", "output": "1"},\n{oops}\n]')
    assert "data.json line 3: invalid JSON" in error(path)
    path = write(tmp_path, "obj.json", '{"instruction": "a", "output": "1"}')
    assert "obj.json: expected a top-level JSON list of records, got an object" in error(path)


@pytest.mark.parametrize(
    ("value", "kind"),
    [([1, 2], "a list"), ({"a": 1}, "an object"), (True, "a boolean")],
)
def test_bad_value_type_names_field(tmp_path, value, kind):
    record = {"instruction": "a", "input": "x", "output": "o"}
    record["input"] = value
    path = write(tmp_path, "data.jsonl", json.dumps(record) + "\n")
    assert f"data.jsonl line 1: field 'input' must be text (a string or a number), got {kind}" in error(path)


def test_null_required_field(tmp_path):
    path = write(tmp_path, "data.json", json.dumps([{"instruction": "a", "output": None}]))
    assert f"data.json record 0: field 'output' is null ({HINT})" in error(path)


def test_empty_required_field(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"instruction": "  ", "output": "o"}\n')
    assert "data.jsonl line 1: field 'instruction' is empty" in error(path)


def test_non_finite_number(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"instruction": "a", "output": NaN}\n')
    assert "data.jsonl line 1: field 'output' must be text" in error(path)


def test_json_nested_too_deeply_is_a_dataset_error_naming_the_file(tmp_path):
    path = write(tmp_path, "data.json", "[" * 100_000 + "]" * 100_000)
    assert "data.json: the JSON is nested too deeply" in error(path)


def test_jsonl_nested_too_deeply_is_a_dataset_error_naming_the_line(tmp_path):
    deep = '{"instruction": "a", "output": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write(tmp_path, "data.jsonl", '{"instruction": "a", "output": "1"}\n' + deep + "\n")
    assert "data.jsonl line 2: the JSON is nested too deeply" in error(path)


def test_csv_error_line_counts_header_as_line_1(tmp_path):
    text = 'instruction,output\nq1,a1\n"multi\nline",a2\nq3,\n'
    path = write(tmp_path, "data.csv", text)
    # the record starting on line 5 has an empty output (a missing CSV cell is empty)
    assert "data.csv line 5: field 'output' is empty" in error(path)


def test_csv_short_row_and_long_row(tmp_path):
    path = write(tmp_path, "data.csv", "instruction,input,output\nq,i,a\nq2\n")
    assert f"data.csv line 3: missing required field 'output' ({HINT})" in error(path)
    path = write(tmp_path, "long.csv", "instruction,output\nq,a,extra\n")
    assert "long.csv line 2: 3 values but the header has 2 columns" in error(path)


def test_csv_header_without_required_column(tmp_path):
    path = write(tmp_path, "data.csv", "instruction,answer\nq,a\n")
    message = error(path)
    assert "data.csv line 1: the header has no 'output' column" in message
    assert "'answer'" in message


def test_csv_malformed_quoting(tmp_path):
    path = write(tmp_path, "data.csv", 'instruction,output\nq,a\n"unterminated,b\n')
    assert "data.csv line 3: malformed CSV" in error(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("data.json", ""), ("data.json", "[]"), ("data.jsonl", ""), ("data.jsonl", "\n\n"), ("data.csv", "")],
)
def test_empty_file(tmp_path, name, content):
    path = write(tmp_path, name, content)
    assert f"{name}: no records" in error(path)


def test_csv_header_only_is_empty(tmp_path):
    path = write(tmp_path, "data.csv", "instruction,output\n")
    assert "data.csv: no records" in error(path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "data.jsonl"
    assert f"{path}: file not found" in error(path)


def test_bad_extension_names_accepted(tmp_path):
    path = write(tmp_path, "data.txt", "x")
    message = error(path)
    assert "data.txt" in message and ".json, .jsonl, .csv" in message


def test_hf_dataset_unreachable_gives_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError) as info:
        load_hf_dataset("tatsu-lab/alpaca")
    message = str(info.value)
    assert "could not load Hugging Face dataset 'tatsu-lab/alpaca'" in message
    assert "local" in message and "hub unreachable" in message


def test_hf_dataset_rows_are_validated(monkeypatch):
    import datasets

    rows = [{"instruction": "i", "input": "", "output": "o"}, {"instruction": "j", "input": ""}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rows)
    with pytest.raises(DatasetError, match=r"me/data\[train\] row 1: missing required field 'output'"):
        load_hf_dataset("me/data")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rows[:1])
    assert load_hf_dataset("me/data") == [Example("i", "", "o")]
