"""Numbers as reports show them: percent rounded like mmseg, blanks for missing values, plain means."""

from __future__ import annotations

from typing import Iterable


def pct(fraction: float | None) -> float | None:
    """Fraction to percent rounded like mmseg's `np.round(x * 100, 2)` (rint is half-to-even)."""
    if fraction is None:
        return None
    return round(fraction * 100 * 100) / 100


def fmt(value: float | None, signed: bool = False) -> str:
    """Two decimals (with a sign for deltas); a blank cell for a missing value, never 'None' or 'nan'."""
    if value is None:
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def mean_of(values: Iterable[float]) -> float | None:
    """The plain arithmetic mean, or None for no values (a mean over nothing is not 0)."""
    values = list(values)
    return sum(values) / len(values) if values else None
