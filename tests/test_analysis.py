"""Safety-gradient analysis on the tiny model: spectra, CER, overlaps, harmful direction, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from guardrail.analysis import analyze, cumulative_energy, safety_gradient, subspace_overlap
from guardrail.cli import app
from guardrail.errors import GuardrailError
from guardrail.loading import load_model
from guardrail.realignment import default_safety_examples


@pytest.fixture(scope="module")
def examples():
    return default_safety_examples("general")[:3]


def test_cumulative_energy_known_values():
    values = torch.tensor([3.0, 1.0, 0.0])
    cer = cumulative_energy(values, [1, 2, 64])
    assert cer["1"] == pytest.approx(0.9)
    assert cer["2"] == pytest.approx(1.0)
    assert cer["64"] == pytest.approx(1.0)


def test_subspace_overlap_bounds():
    basis = torch.linalg.qr(torch.randn(40, 8)).Q
    other = torch.linalg.qr(torch.randn(40, 8)).Q
    assert subspace_overlap(basis, basis, 8) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= subspace_overlap(basis, other, 8) < 1.0


def test_analysis_spectra_and_rank_bound(tiny_model_dir, examples):
    loaded = load_model(tiny_model_dir)
    result = analyze(loaded, examples, ks=[1, 4, 20, 64])

    assert result.summary["matrices"] == 3 * 2 * 7
    for example in result.examples:
        for matrix in example["matrices"]:
            cer = [matrix["cer"][k] for k in ("1", "4", "20", "64")]
            assert cer == sorted(cer)
            # A gradient from T tokens has rank <= T, so k >= T (or >= the matrix size) contains all the energy.
            if min(matrix["shape"]) <= 20 or example["tokens"] <= 20:
                assert matrix["cer"]["20"] == pytest.approx(1.0, abs=1e-4)
    assert len(result.overlaps) == 3
    for row in result.overlaps:
        assert 0.0 <= row["overlap"]["4"] <= 1.0 + 1e-6


def test_overlap_of_identical_examples_is_one(tiny_model_dir, examples):
    loaded = load_model(tiny_model_dir)
    twin = examples[0].model_copy(update={"id": "twin"})
    result = analyze(loaded, [examples[0], twin], ks=[4])
    assert result.overlaps[0]["overlap"]["4"] == pytest.approx(1.0, abs=1e-4)


def test_harmful_direction_points_back(tiny_model_dir, examples):
    reference = load_model(tiny_model_dir)
    candidate = load_model(tiny_model_dir)
    # Move the candidate up the safety loss (the opposite of the patch), by a small step.
    gradients, _, _ = safety_gradient(candidate, examples[0])
    with torch.no_grad():
        for name, parameter in candidate.model.named_parameters():
            if name in gradients:
                parameter.add_(1e-3 * gradients[name])
    result = analyze(candidate, [examples[0]], reference=reference, ks=[4, 20])
    direction = result.harmful_direction["per_example"][0]
    assert direction["cosine"] > 0.9
    assert direction["update_energy_in_top_k"] > direction["random_baseline"]


def test_analysis_rejects_bad_input(tiny_model_dir, examples):
    loaded = load_model(tiny_model_dir)
    with pytest.raises(GuardrailError, match="no safety examples"):
        analyze(loaded, [])
    with pytest.raises(GuardrailError, match=r"invalid k values \[0\]"):
        analyze(loaded, examples, ks=[0, 4])


def test_analyze_cli_writes_outputs(tiny_model_dir, tmp_path):
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", str(tiny_model_dir), "-e", "general-01", "-e", "specific-fraud", "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "analysis.json").read_text())
    assert [example["id"] for example in document["examples"]] == ["general-01", "specific-fraud"]
    for name in ("analysis.md", "spectrum.png", "cer.png", "overlap.png"):
        assert (out / name).stat().st_size > 0
    assert "CER(k)" in (out / "analysis.md").read_text()


def test_analyze_cli_unknown_example(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(tiny_model_dir), "-e", "general-99", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown safety example 'general-99'" in result.output
    assert "general-01" in result.output


def test_analyze_cli_bad_examples_file(tiny_model_dir, tmp_path):
    bad = tmp_path / "examples.jsonl"
    bad.write_text('{"prompt": "How do I pick a lock?"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["analyze", str(tiny_model_dir), "--examples", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "examples.jsonl:1: invalid safety example, missing field(s) response" in result.output


def test_analyze_cli_missing_reference(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(tiny_model_dir), "--reference", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "model not found" in result.output
    assert "no-such-model" in result.output
