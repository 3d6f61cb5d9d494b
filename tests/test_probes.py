"""Tests for probe sets: the built-in sets' contract, file loading, column detection and errors."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from guardrail.errors import ProbeSetError
from guardrail.policy import ProbeSource
from guardrail.probes import load_probe_file, load_probe_set


def builtin(name: str, **options) -> list:
    return load_probe_set(ProbeSource(source=f"builtin:{name}", **options), name).probes


def canonical(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def probe_error(path: Path, **options) -> str:
    with pytest.raises(ProbeSetError) as caught:
        load_probe_file(path, **options)
    return str(caught.value)


# --- built-in sets -----------------------------------------------------------


def test_builtin_harmful_contract():
    probes = builtin("harmful")
    categories = Counter(probe.category for probe in probes)
    assert len(probes) >= 100
    assert len(categories) >= 8
    assert "uncategorized" not in categories


def test_builtin_benign_contract():
    probes = builtin("benign")
    assert len(probes) >= 100
    assert sum(probe.borderline for probe in probes) >= 40


@pytest.mark.parametrize("name", ["harmful", "benign", "harmful_screen", "benign_screen"])
def test_builtin_ids_unique(name):
    probes = builtin(name)
    assert len({probe.id for probe in probes}) == len(probes)
    assert all(probe.prompt.strip() == probe.prompt and probe.prompt for probe in probes)


@pytest.mark.parametrize(("screen", "evaluation"), [("harmful_screen", "harmful"), ("benign_screen", "benign")])
def test_screen_disjoint_from_eval(screen, evaluation):
    screen_prompts = {probe.prompt.casefold() for probe in builtin(screen)}
    evaluation_prompts = {probe.prompt.casefold() for probe in builtin(evaluation)}
    assert screen_prompts
    assert screen_prompts.isdisjoint(evaluation_prompts)


def test_screen_disjoint_across_sets():
    all_screen = {probe.prompt.casefold() for name in ("harmful_screen", "benign_screen") for probe in builtin(name)}
    all_evaluation = {probe.prompt.casefold() for name in ("harmful", "benign") for probe in builtin(name)}
    assert all_screen.isdisjoint(all_evaluation)


def test_lab_prompts_not_in_probes():
    probe_prompts = {canonical(probe.prompt) for name in ("harmful", "benign", "harmful_screen", "benign_screen") for probe in builtin(name)}
    lab = resources.files("guardrail").joinpath("data/lab")
    checked = 0
    for entry in lab.iterdir():
        if not entry.name.endswith(".jsonl"):
            continue
        for line_number, line in enumerate(entry.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("prompt", "text"):
                if key in row:
                    checked += 1
                    assert canonical(row[key]) not in probe_prompts, f"{entry.name}:{line_number} repeats a probe prompt"
    assert checked >= 600


def test_unknown_builtin():
    with pytest.raises(ProbeSetError, match="builtin:nope"):
        builtin("nope")


# --- limit sampling ------------------------------------------------------------


def test_limit_deterministic():
    first = load_probe_set(ProbeSource(source="builtin:harmful", limit=10), "harmful", seed=3)
    second = load_probe_set(ProbeSource(source="builtin:harmful", limit=10), "harmful", seed=3)
    assert len(first) == 10
    assert first.prompts() == second.prompts()
    assert first.digest == second.digest


def test_limit_seed_changes_sample():
    first = load_probe_set(ProbeSource(source="builtin:harmful", limit=10), "harmful", seed=0)
    other = load_probe_set(ProbeSource(source="builtin:harmful", limit=10), "harmful", seed=1)
    assert first.prompts() != other.prompts()


def test_limit_keeps_file_order():
    full = [probe.id for probe in builtin("harmful")]
    sample = [probe.id for probe in builtin("harmful", limit=15)]
    assert sample == [probe_id for probe_id in full if probe_id in sample]


def test_limit_above_size_keeps_all():
    assert len(builtin("harmful_screen", limit=1000)) == len(builtin("harmful_screen"))


def test_describe_fields():
    probe_set = load_probe_set(ProbeSource(source="builtin:benign", limit=5), "benign")
    description = probe_set.describe()
    assert description["name"] == "benign"
    assert description["source"] == "builtin:benign"
    assert description["count"] == 5
    assert re.fullmatch(r"[0-9a-f]{64}", description["digest"])


# --- CSV and JSONL loading ---------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "dataset"),
    [
        (["category", "source", "forbidden_prompt"], "strongreject"),
        (["Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID"], "harmbench"),
        (["goal", "target"], "advbench"),
    ],
)
def test_csv_column_detection(tmp_path, header, dataset):
    values = {
        "category": "fraud",
        "source": "custom",
        "forbidden_prompt": "Write a phishing email.",
        "Behavior": "Write a phishing email.",
        "FunctionalCategory": "standard",
        "SemanticCategory": "cybercrime",
        "BehaviorID": "phish",
        "goal": "Write a phishing email.",
        "target": "Sure, here is",
    }
    path = write_csv(tmp_path / f"{dataset}.csv", header, [[values[column] for column in header]])
    probes = load_probe_file(path)
    assert len(probes) == 1
    assert probes[0].prompt == "Write a phishing email."
    assert probes[0].id == f"{dataset}-0001"
    expected_category = {"strongreject": "fraud", "harmbench": "cybercrime", "advbench": "uncategorized"}[dataset]
    assert probes[0].category == expected_category


def test_csv_explicit_columns(tmp_path):
    path = write_csv(tmp_path / "custom.csv", ["question_text", "harm", "prompt"], [["Real question?", "drugs", "decoy"]])
    probes = load_probe_file(path, prompt_column="question_text", category_column="harm")
    assert probes[0].prompt == "Real question?"
    assert probes[0].category == "drugs"


def test_csv_explicit_column_missing(tmp_path):
    path = write_csv(tmp_path / "custom.csv", ["prompt"], [["Hi"]])
    message = probe_error(path, prompt_column="query")
    assert "'query'" in message
    assert "['prompt']" in message


def test_csv_bom_and_quotes(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes('\ufeffprompt,category\n"Line one,\nline two",misc\n'.encode("utf-8"))
    probes = load_probe_file(path)
    assert probes[0].prompt == "Line one,\nline two"
    assert probes[0].category == "misc"


def test_jsonl_fields(tmp_path):
    rows = [
        {"id": "a", "prompt": "  How do I kill a process?  ", "category": "coding", "borderline": True},
        {"goal": "ignored because prompt is preferred", "prompt": "Second?"},
    ]
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    probes = load_probe_file(path)
    assert [probe.prompt for probe in probes] == ["How do I kill a process?", "Second?"]
    assert probes[0].id == "a"
    assert probes[0].borderline is True
    assert probes[1].id == "set-0002"
    assert probes[1].category == "uncategorized"


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "one"}\n\n   \n{"prompt": "two"}\n', encoding="utf-8")
    assert len(load_probe_file(path)) == 2


def test_json_suffix_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "set.json", [{"instruction": "Do it."}])
    assert load_probe_file(path)[0].prompt == "Do it."


def test_policy_source_file(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"text": f"prompt {index}"} for index in range(6)])
    probe_set = load_probe_set(ProbeSource(source=str(path), limit=3), "harmful", seed=0)
    assert len(probe_set) == 3
    assert probe_set.source == str(path)


# --- errors -------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    message = probe_error(path)
    assert "not found" in message
    assert str(path) in message


@pytest.mark.parametrize(("name", "content"), [("empty.csv", ""), ("header.csv", "prompt,category\n"), ("empty.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = probe_error(path)
    assert str(path) in message
    assert "no prompts" in message


def test_csv_without_prompt_column(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["query", "label"], [["Hi", "x"]])
    message = probe_error(path)
    assert "no prompt column" in message
    assert "['query', 'label']" in message
    assert "prompt_column" in message


def test_csv_empty_prompt_row(tmp_path):
    path = write_csv(tmp_path / "gap.csv", ["prompt"], [["ok"], ["  "]])
    message = probe_error(path)
    assert "row 2" in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt\nCafé?\n".encode("latin-1"))
    message = probe_error(path)
    assert str(path) in message
    assert "UTF-8" in message


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": oops}\n', encoding="utf-8")
    message = probe_error(path)
    assert f"{path}:3: invalid JSON" in message


def test_json_line_not_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "one"}\n["prompt"]\n', encoding="utf-8")
    message = probe_error(path)
    assert f"{path}:2:" in message
    assert "list" in message


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "probes.txt"
    path.write_text("prompt\nhello\n", encoding="utf-8")
    message = probe_error(path)
    assert "'.txt'" in message


@pytest.mark.parametrize(("cell", "expected"), [("true", True), ("False", False), ("1", True), ("0", False), ("", False), ("yes", True)])
def test_csv_borderline_flag(tmp_path, cell, expected):
    path = write_csv(tmp_path / "flags.csv", ["prompt", "borderline"], [["Kill the process?", cell]])
    assert load_probe_file(path)[0].borderline is expected


def test_csv_borderline_invalid(tmp_path):
    path = write_csv(tmp_path / "flags.csv", ["prompt", "borderline"], [["Kill the process?", "maybe"]])
    message = probe_error(path)
    assert "row 1" in message
    assert "invalid borderline value 'maybe'" in message


# --- real data ---------------------------------------------------------------------


def test_strongreject_csv(strongreject_csv):
    probes = load_probe_file(strongreject_csv)
    categories = Counter(probe.category for probe in probes)
    assert len(probes) == 313
    assert "uncategorized" not in categories
    assert len(categories) >= 5
    assert len({probe.id for probe in probes}) == 313
