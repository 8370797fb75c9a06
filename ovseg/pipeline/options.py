"""Typed checks for stage and protocol options, each failing with one sentence that names the option.

YAML and `key=value` overrides arrive as ints, floats, bools and strings that merely look right:
`k=2.5` or `k=true` must be refused, not truncated into a result. Every check returns the value in
its canonical type.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Sequence

from ovseg.errors import ConfigError

__all__ = ["integer", "number", "boolean", "choice", "pair", "unknown_options"]


def _where(owner: str, name: str) -> str:
    return f"{owner}: {name}" if owner else name


def integer(value: Any, name: str, owner: str = "", *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (a float with an integral value is accepted: YAML writes `1e3`); never a bool."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise ConfigError(f"{_where(owner, name)} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_where(owner, name)} must be at least {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{_where(owner, name)} must be at most {maximum}, got {value!r}")
    return int(value)


def number(
    value: Any,
    name: str,
    owner: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """A finite float; `minimum`/`maximum` are inclusive bounds, `above`/`below` exclusive ones."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{_where(owner, name)} must be a finite number, got {value!r}")
    value = float(value)
    bounds = [
        (minimum is not None and value < minimum, f"at least {minimum}"),
        (maximum is not None and value > maximum, f"at most {maximum}"),
        (above is not None and value <= above, f"greater than {above}"),
        (below is not None and value >= below, f"less than {below}"),
    ]
    for failed, rule in bounds:
        if failed:
            raise ConfigError(f"{_where(owner, name)} must be {rule}, got {value!r}")
    return value


def boolean(value: Any, name: str, owner: str = "") -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(owner, name)} must be true or false, got {value!r}")
    return value


def choice(value: Any, name: str, choices: Sequence[str], owner: str = "") -> str:
    if value not in choices:
        raise ConfigError(f"{_where(owner, name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def pair(value: Any, name: str, owner: str = "", *, minimum: int = 1) -> tuple[int, int]:
    """An int or an [h, w] pair of ints, as (h, w)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, 2):
        raise ConfigError(f"{_where(owner, name)} must be an integer or an [h, w] pair, got {value!r}")
    values = [integer(v, name, owner, minimum=minimum) for v in values]
    return (values[0], values[-1])


def unknown_options(given: Iterable[str], known: Iterable[str], owner: str) -> None:
    """Raise a ConfigError naming only the unknown option(s), with the closest known name."""
    known = list(known)
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(
        f"{owner}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
        f"its options are {', '.join(sorted(known)) or '(none)'}"
    )
