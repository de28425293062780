"""Argument checks shared by every public entry point: one helper per kind of value, each
raising TypeError (wrong type) or ValueError (wrong value) with a message that names the
argument. A leaf module: it imports nothing of ours."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, overload


@overload
def check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: Literal[False] = False
) -> int: ...
@overload
def check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = ...
) -> int | None: ...
def check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = False
) -> int | None:
    """An int (not a bool) >= `minimum`; None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        wanted = "an int" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@overload
def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    optional: Literal[False] = False,
) -> float: ...
@overload
def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    optional: bool = ...,
) -> float | None: ...
def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    optional: bool = False,
) -> float | None:
    """A finite real number (int or float, not a bool) in [minimum, maximum] (> 0 when
    `positive`), returned as a float; None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        wanted = "a number" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_probability(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    checked = check_float(name, value, minimum=0.0, maximum=1.0)
    assert checked is not None
    return checked


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A bool (not an int or a string that looks like one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_sequence(name: str, value: Any) -> tuple[Any, ...]:
    """A list or tuple (not a str, a number or a mapping), as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple, got {value!r} ({type(value).__name__})")
    return tuple(value)
