"""Rates with Wilson score intervals.

The Wilson interval stays inside [0, 1] and behaves well for the small
samples and extreme rates (0 % or 100 % refusal) common in safety probes,
where the normal approximation gives nonsense.
"""

from __future__ import annotations

import math

#: Two-sided 95 % normal quantile.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval for a binomial proportion.

    Args:
        successes: Number of successes, ``0 <= successes <= total``.
        total: Number of trials; an empty sample gives ``(0.0, 1.0)``.
        z: Normal quantile of the confidence level.

    Returns:
        ``(low, high)``, both in [0, 1].

    Examples:
        >>> tuple(round(x, 3) for x in wilson_interval(9, 10))
        (0.596, 0.982)
    """
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be between 0 and total ({total}), got {successes}")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    z2 = z * z
    denominator = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)
