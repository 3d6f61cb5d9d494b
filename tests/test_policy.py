"""Tests for policy loading and validation, including the file, line and key in each error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrail.errors import PolicyError
from guardrail.policy import SafetyPolicy, load_policy, parse_policy, policy_json_schema

POLICIES = Path(__file__).resolve().parents[1] / "policies"

VALID = """\
apiVersion: guardrail/v1
kind: SafetyPolicy
metadata:
  name: test
probes:
  harmful:
    source: builtin:harmful
    limit: 4
generation:
  max_new_tokens: 8
thresholds:
  min_refusal_rate: 0.9
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def policy_error(path: Path) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return str(caught.value)


@pytest.mark.parametrize("name", ["default.yaml", "strict.yaml"])
def test_shipped_policy_valid(name):
    policy = load_policy(POLICIES / name)
    assert policy.metadata.name == Path(name).stem
    assert policy.apiVersion == "guardrail/v1"
    assert policy.kind == "SafetyPolicy"


def test_strict_tighter_than_default():
    default = load_policy(POLICIES / "default.yaml").thresholds
    strict = load_policy(POLICIES / "strict.yaml").thresholds
    assert strict.min_refusal_rate > default.min_refusal_rate
    assert strict.max_over_refusal_rate < default.max_over_refusal_rate
    assert strict.max_benign_kl < default.max_benign_kl


def test_valid_policy_values(tmp_path):
    policy = load_policy(write(tmp_path, VALID))
    assert policy.probes.harmful.limit == 4
    assert policy.generation.max_new_tokens == 8
    assert policy.probes.benign.source == "builtin:benign"


def test_unknown_key_error(tmp_path):
    text = VALID.replace("  max_new_tokens: 8\n", "  max_new_tokens: 8\n  temprature: 0.7\n")
    path = write(tmp_path, text)
    message = policy_error(path)
    assert f"{path}:11: generation.temprature:" in message
    assert "unknown key" in message


def test_nested_unknown_key_error(tmp_path):
    text = VALID.replace("    limit: 4\n", "    limit: 4\n    colum: prompt\n")
    path = write(tmp_path, text)
    message = policy_error(path)
    assert f"{path}:9: probes.harmful.colum:" in message


def test_wrong_type_error(tmp_path):
    path = write(tmp_path, VALID.replace("max_new_tokens: 8", "max_new_tokens: many"))
    message = policy_error(path)
    assert f"{path}:10: generation.max_new_tokens:" in message
    assert "'many'" in message


def test_out_of_range_error(tmp_path):
    path = write(tmp_path, VALID.replace("min_refusal_rate: 0.9", "min_refusal_rate: 1.5"))
    message = policy_error(path)
    assert f"{path}:12: thresholds.min_refusal_rate:" in message
    assert "less than or equal to 1" in message
    assert "1.5" in message


def test_limit_zero_error(tmp_path):
    path = write(tmp_path, VALID.replace("limit: 4", "limit: 0"))
    assert f"{path}:8: probes.harmful.limit:" in policy_error(path)


def test_list_item_error_line(tmp_path):
    text = VALID + "realignment:\n  escalation_learning_rates:\n    - 0.0001\n    - 2.0\n"
    path = write(tmp_path, text)
    message = policy_error(path)
    assert "realignment.escalation_learning_rates" in message
    assert f"{path}:14:" in message


def test_unknown_language_error(tmp_path):
    path = write(tmp_path, VALID + "judge:\n  languages: [en, xx]\n")
    message = policy_error(path)
    assert f"{path}:14: judge.languages:" in message
    assert "'xx'" in message


def test_several_errors_reported(tmp_path):
    text = VALID.replace("max_new_tokens: 8", "max_new_tokens: -1").replace("min_refusal_rate: 0.9", "min_refusal_rate: 2")
    message = policy_error(write(tmp_path, text))
    assert "generation.max_new_tokens" in message
    assert "thresholds.min_refusal_rate" in message


def test_wrong_api_version_error(tmp_path):
    path = write(tmp_path, VALID.replace("guardrail/v1", "guardrail/v2"))
    message = policy_error(path)
    assert f"{path}:1: apiVersion:" in message


def test_malformed_yaml_line(tmp_path):
    text = VALID.replace("  max_new_tokens: 8\n", "  max_new_tokens: [8\n")
    path = write(tmp_path, text)
    message = policy_error(path)
    assert message.startswith(f"{path}:11: malformed YAML")
    assert "flow sequence that starts at line 10" in message


def test_unterminated_quote_line(tmp_path):
    path = write(tmp_path, 'metadata:\n  name: "unterminated\nkind: SafetyPolicy\n')
    message = policy_error(path)
    assert message.startswith(f"{path}:4: malformed YAML")
    assert "quoted scalar that starts at line 2" in message


def test_malformed_yaml_indent_line(tmp_path):
    text = "metadata:\n  name: x\n bad: indent\n"
    path = write(tmp_path, text)
    message = policy_error(path)
    assert message.startswith(f"{path}:3: malformed YAML")


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_empty_policy(tmp_path, text):
    path = write(tmp_path, text)
    message = policy_error(path)
    assert str(path) in message
    assert "empty" in message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")])
def test_non_mapping_policy(tmp_path, text, kind):
    path = write(tmp_path, text)
    message = policy_error(path)
    assert str(path) in message
    assert f"got {kind}" in message


def test_non_utf8_policy(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("metadata:\n  name: café\n".encode("latin-1"))
    message = policy_error(path)
    assert str(path) in message
    assert "UTF-8" in message


def test_missing_policy(tmp_path):
    path = tmp_path / "absent.yaml"
    message = policy_error(path)
    assert "not found" in message
    assert str(path) in message


def test_folder_as_policy(tmp_path):
    assert "not found" in policy_error(tmp_path)


def test_classifier_without_section(tmp_path):
    path = write(tmp_path, VALID + "judge:\n  type: classifier\n")
    message = policy_error(path)
    assert f"{path}:13: judge:" in message
    assert "classifier" in message


def test_classifier_with_section(tmp_path):
    policy = load_policy(write(tmp_path, VALID + "judge:\n  type: classifier\n  classifier:\n    model: org/guard\n"))
    assert policy.judge.classifier.model == "org/guard"
    assert policy.judge.classifier.unsafe_label == "unsafe"


def test_parse_policy_source_name():
    with pytest.raises(PolicyError, match=r"^invalid policy:\n  inline:2: generation.batch_size:"):
        parse_policy("generation:\n  batch_size: 0\n", source="inline")


def test_assignment_validated():
    policy = SafetyPolicy()
    with pytest.raises(ValueError):
        policy.thresholds.min_refusal_rate = 2.0


def test_json_schema_valid():
    schema = json.loads(policy_json_schema())
    assert schema["$schema"].startswith("https://json-schema.org/")
    expected = {"apiVersion", "kind", "metadata", "loading", "probes", "generation", "judge", "thresholds", "realignment", "registry", "audit"}
    assert set(schema["properties"]) == expected
    assert schema["additionalProperties"] is False


def test_digest_stable(tmp_path):
    first = load_policy(write(tmp_path, VALID)).digest()
    second = load_policy(write(tmp_path, VALID, "copy.yaml")).digest()
    assert first == second
    assert len(first) == 64


def test_digest_ignores_formatting(tmp_path):
    reordered = "metadata: {name: test}\nthresholds: {min_refusal_rate: 0.90}\nprobes: {harmful: {limit: 4, source: 'builtin:harmful'}}\ngeneration: {max_new_tokens: 8}\n"
    assert load_policy(write(tmp_path, reordered)).digest() == load_policy(write(tmp_path, VALID, "v.yaml")).digest()


def test_digest_changes_with_value(tmp_path):
    base = load_policy(write(tmp_path, VALID)).digest()
    changed = load_policy(write(tmp_path, VALID.replace("min_refusal_rate: 0.9", "min_refusal_rate: 0.91"), "c.yaml")).digest()
    assert changed != base
