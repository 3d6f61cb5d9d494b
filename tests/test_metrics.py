"""Tests for the Wilson score interval."""

from __future__ import annotations

import math

import pytest

from guardrail.metrics import Z_95, wilson_interval


def reference_wilson(successes: int, total: int, z: float) -> tuple[float, float]:
    """Wilson (1927) interval written out from the textbook formula, independent of the module's algebra."""
    p = successes / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    scale = 1 + z * z / total
    return (centre - spread) / scale, (centre + spread) / scale


def test_z_95_quantile():
    # Phi(1.959963984540054) = 0.975, checked through the error function.
    assert 0.5 * (1 + math.erf(Z_95 / math.sqrt(2))) == pytest.approx(0.975, abs=1e-12)


def test_published_nine_of_ten():
    low, high = wilson_interval(9, 10)
    assert low == pytest.approx(0.5958, abs=5e-4)
    assert high == pytest.approx(0.9821, abs=5e-4)


def test_published_half():
    # 50 of 100 at 95 %: (0.4038, 0.5962), a common textbook value.
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=5e-4)
    assert high == pytest.approx(0.5962, abs=5e-4)


@pytest.mark.parametrize(("successes", "total"), [(1, 3), (7, 20), (123, 130), (2, 250)])
def test_matches_formula(successes, total):
    low, high = wilson_interval(successes, total)
    expected_low, expected_high = reference_wilson(successes, total, Z_95)
    assert low == pytest.approx(expected_low, rel=1e-12)
    assert high == pytest.approx(expected_high, rel=1e-12)


def test_custom_z_narrower():
    low_90, high_90 = wilson_interval(9, 10, z=1.6448536269514722)
    low_95, high_95 = wilson_interval(9, 10)
    assert low_95 < low_90
    assert high_90 < high_95


@pytest.mark.parametrize("total", [1, 5, 10, 130, 10_000])
def test_zero_successes_in_range(total):
    low, high = wilson_interval(0, total)
    assert low == 0.0
    assert 0.0 < high <= 1.0


@pytest.mark.parametrize("total", [1, 5, 10, 130, 10_000])
def test_all_successes_in_range(total):
    low, high = wilson_interval(total, total)
    assert 0.0 <= low < 1.0
    assert high == pytest.approx(1.0, abs=1e-12)
    assert high <= 1.0


def test_zero_of_ten_known_upper():
    # The upper bound for 0/n is z^2 / (n + z^2).
    assert wilson_interval(0, 10)[1] == pytest.approx(Z_95**2 / (10 + Z_95**2), rel=1e-12)


@pytest.mark.parametrize(("successes", "total"), [(3, 10), (50, 130), (1, 2)])
def test_interval_contains_rate(successes, total):
    low, high = wilson_interval(successes, total)
    assert low <= successes / total <= high


def test_symmetry():
    low, high = wilson_interval(3, 10)
    mirrored_low, mirrored_high = wilson_interval(7, 10)
    assert low == pytest.approx(1 - mirrored_high, abs=1e-12)
    assert high == pytest.approx(1 - mirrored_low, abs=1e-12)


def test_narrows_with_sample_size():
    small = wilson_interval(9, 10)
    large = wilson_interval(90, 100)
    assert large[1] - large[0] < small[1] - small[0]


def test_empty_sample():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("successes", "total"), [(-1, 10), (11, 10), (1, 0), (0, -1)])
def test_invalid_counts_raise(successes, total):
    with pytest.raises(ValueError, match="successes must be between 0 and total"):
        wilson_interval(successes, total)
