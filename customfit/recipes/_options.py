"""What the recipe mixins share: checked constructor options, replica sums."""

from __future__ import annotations

import numbers
from typing import Any


def number(
    recipe: str, name: str, value: Any, *, minimum: float = 0.0, inclusive: bool = True
) -> float:
    """`value` as a float >= (or >) `minimum`, or a ValueError naming the fix."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = value >= minimum if inclusive else value > minimum
        ok = ok and value == value and value != float("inf")
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(
            f"{recipe}: {name} must be a finite number {bound} {minimum}; got "
            f"{value!r}. Pass e.g. {name}={_example(name)}."
        )
    return value


def integer(recipe: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, or a ValueError naming the fix."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{recipe}: {name} must be an integer >= {minimum}; got {value!r}. "
            f"Pass e.g. {name}={_example(name)}."
        )
    return int(value)


def choice(recipe: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(
            f"{recipe}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
        )
    return value


def log_name(recipe: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{recipe}: log_name must be a non-empty string (the History "
            f'column); got {value!r}. Pass e.g. log_name="grad_norm".'
        )
    return value


_EXAMPLES = {
    "rho": "0.05",
    "accumulation_steps": "4",
    "clip_norm": "1.0",
    "clip_factor": "0.01",
    "epsilon": "0.1",
    "pgd_steps": "10",
    "pgd_step_size": "0.025",
    "unit_epsilon": "1e-3",
}


def _example(name: str) -> str:
    return _EXAMPLES.get(name, "1")
