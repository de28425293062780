"""Matchers: answer extraction, normalisation, and the graders (exact, numeric, math-verify,
boxed, GSM8K). Pure functions of (completion, reference); `pool.py` runs them in processes.

A grader is any callable `(completion, reference) -> Verdict`. `Verdict.answer` is the canonical
answer key the votes of Maj@k are counted on (None: nothing extractable); `reference` is the gold
answer itself (e.g. "42" or "\\frac{1}{2}"), not a worked solution.

Answer extraction (`extract_answer`) tries, in this order, and takes the first that finds something:
  1. the last balanced `\\boxed{...}` (or `\\fbox{...}`), braces matched; in `\\boxed{\\boxed{x}}`
     the inner one is the last to open, so it gives "x";
  2. the GSM8K form: the text after the last "####", to the end of its line;
  3. "the answer is ..." (any case, the last one): the rest of the line, up to a sentence end;
  4. the last number in the text (thousands commas dropped, "3/4" kept as a fraction).
A candidate longer than MAX_ANSWER_CHARS is dropped (the next form is tried). Extraction is linear
in the length of the text, never evaluates anything, and removes NUL bytes and lone surrogates.
`boxed_match` and `gsm8k_match` use one form only (the last box; "####" else the last number).
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

MAX_ANSWER_CHARS = 1_000
"""An extracted answer longer than this is not an answer (a runaway generation)."""

DEFAULT_TOLERANCE = 1e-6
"""Relative tolerance of numeric comparisons (of max(1, |reference|))."""

MATH_VERIFY_TIMEOUT_S = 5
"""math-verify's own signal.alarm timeout, used only where it can work (a main thread)."""


@dataclass(frozen=True)
class Verdict:
    """A graded completion: the canonical answer key (None if none was found) and correctness."""

    answer: str | None
    correct: bool


class Grader(Protocol):
    """Any callable (completion, reference) -> Verdict. To run in `grade_many`'s worker
    processes it must be picklable: a module-level function, or functools.partial of one."""

    def __call__(self, completion: str, reference: str, /) -> Verdict: ...


# ----------------------------------------------------------------------------------------------
# extraction


_BRACE = re.compile(r"[{}]")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(r"answer is\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def clean_text(text: str) -> str:
    """`text` without NUL bytes, and without lone surrogates (TypeError if not a str)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="ignore").decode("utf-8")
    return text


def _last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...}: braces scanned once from the end (lazily)."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    closes: list[int] = []  # positions of '}' not yet matched, nearest last
    last = len(text) - 1
    for match in _BRACE.finditer(text[::-1]):
        position = last - match.start()
        if match.group() == "}":
            closes.append(position)
        elif closes:
            close = closes.pop()
            if any(text.endswith(command, 0, position) for command in _BOX_COMMANDS):
                return text[position + 1 : close]
    return None


def _after_hashes(text: str) -> str | None:
    position = text.rfind("####")
    if position < 0:
        return None
    return text[position + 4 :].split("\n", 1)[0].lstrip("#")


def _after_answer_is(text: str) -> str | None:
    found = None
    for found in _ANSWER_IS.finditer(text):  # noqa: B007 -- we want the last one
        pass
    if found is None:
        return None
    rest = text[found.end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(rest)
    return rest[: end.start()] if end else rest


def _last_number(text: str) -> str | None:
    found = None
    for found in _LAST_NUMBER.finditer(text):  # noqa: B007 -- we want the last one
        pass
    return found.group().replace(",", "") if found else None


def extract_answer(completion: str) -> str | None:
    """The answer of a completion, by the order in the module docstring, stripped of spaces,
    surrounding $ and a final period; None if no form finds one."""
    text = clean_text(completion)
    for finder in (_last_boxed, _after_hashes, _after_answer_is, _last_number):
        candidate = _tidy(finder(text))
        if candidate is not None:
            return candidate
    return None


def _tidy(candidate: str | None) -> str | None:
    """A candidate answer without surrounding spaces and $ or a final period; None if that
    leaves nothing or more than MAX_ANSWER_CHARS."""
    if candidate is None:
        return None
    candidate = candidate.strip().strip("$").strip().rstrip(".").strip()
    return candidate if candidate and len(candidate) <= MAX_ANSWER_CHARS else None


# ----------------------------------------------------------------------------------------------
# graders


_LATEX_NOISE = re.compile(r"\\[,;:! ]|\\left|\\right|\s+")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d{1,3})?")
_LATEX_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}$")
_MAX_NUMBER_CHARS = 100


def normalize_answer(answer: str) -> str:
    """Light canonical form for exact matching: no spaces or LaTeX spacing, no surrounding $,
    \\text{} wrapper or final period, no thousands commas in a plain number ("1,234" -> "1234");
    \\dfrac and \\tfrac read as \\frac."""
    answer = _LATEX_NOISE.sub("", clean_text(answer)).strip("$").rstrip(".")
    if _NUMBER.fullmatch(answer):
        answer = answer.replace(",", "")
    wrapped = _TEXT_WRAPPER.match(answer)
    if wrapped:
        answer = wrapped.group(1)
    return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _parse_number(text: str) -> Fraction | None:
    """A plain number ("1,234", "-0.5", "2e3", "3/4", "\\frac{3}{4}", "$5", "50%"), exactly."""
    text = normalize_answer(text).lstrip("$").removesuffix("\\%").removesuffix("%")
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    fraction = _LATEX_FRACTION.match(text)
    if fraction:
        sign, top, bottom = fraction.groups()
        text = f"{sign}{top}/{bottom}"
    parts = text.split("/")
    if len(parts) > 2 or not all(_NUMBER.fullmatch(p) for p in parts):
        return None
    values = [Fraction(p.replace(",", "")) for p in parts]
    if len(values) == 2 and values[1] == 0:
        return None
    return values[0] / values[1] if len(values) == 2 else values[0]


def _number_key(value: Fraction) -> str:
    """One key per number for voting: "42", "-0.5", "0.3333333333333333"."""
    if value.denominator == 1:
        return str(value.numerator)
    try:
        return repr(float(value))
    except OverflowError:  # beyond float range: keep it exact
        return str(value)


def exact_match(completion: str, reference: str) -> Verdict:
    """Correct iff the extracted answer equals the reference after `normalize_answer`."""
    answer = extract_answer(completion)
    if answer is None:
        return Verdict(None, False)
    key = normalize_answer(answer)
    return Verdict(key, key == normalize_answer(reference))


def numeric_match(
    completion: str, reference: str, *, tolerance: float = DEFAULT_TOLERANCE
) -> Verdict:
    """Correct iff the extracted answer is a number within `tolerance` * max(1, |reference|) of
    the reference (a number too: ValueError otherwise). For another tolerance bind it with
    functools.partial(numeric_match, tolerance=...). The answer key is the number's canonical
    form, so "42", "42.0" and "42.00" vote together; a non-number keeps its normalized text."""
    gold = _parse_number(reference)
    if gold is None:
        raise ValueError(f"numeric_match: reference {reference[:100]!r} is not a number")
    answer = extract_answer(completion)
    if answer is None:
        return Verdict(None, False)
    value = _parse_number(answer)
    if value is None:
        return Verdict(normalize_answer(answer), False)
    return Verdict(_number_key(value), _close(value, gold, tolerance))


def _close(value: Fraction, gold: Fraction, tolerance: float) -> bool:
    """|value - gold| <= tolerance * max(1, |gold|), exactly."""
    return abs(value - gold) <= Fraction(tolerance) * max(Fraction(1), abs(gold))


@functools.lru_cache(maxsize=256)
def _parse_math(latex: str, timeout: int | None) -> tuple[Any, ...]:
    """math-verify's parse of one answer (LaTeX only: its plain-expression mode runs sympy's
    parse_expr, i.e. eval, on model output). Rationals, and intervals and matrices of them, are
    built directly: the same result as math-verify's (tested against it, element for element),
    without its LaTeX parser (about 1-3 ms an answer, 20 ms and more for an interval)."""
    simple = _parse_simple(latex)
    if simple is not None:
        return simple
    from math_verify import LatexExtractionConfig, parse

    parsed = parse(
        f"${latex}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout
    )
    return tuple(parsed)


_RATIONAL = re.compile(r"(-?)(?:([0-9]+)|\\frac\{([0-9]+)\}\{([0-9]+)\})")
_INTERVAL = re.compile(r"([\[(]) ?([^,\s]+) ?, ?([^,\s]+) ?([\])])")  # ends: `_rational`
_MATRIX = re.compile(r"\\begin\{([pb])matrix\}(.*)\\end\{\1matrix\}")


def _parse_simple(latex: str) -> tuple[Any, ...] | None:
    """math-verify's parse of an integer or \\frac{p}{q} (a sign in front), of an interval of
    two of them (low < high; brackets, one space at most around the comma), or of a
    pmatrix/bmatrix of them (rectangular); None for anything else."""
    from sympy import Interval, Matrix

    value = _rational(latex)
    if value is not None:
        return (value, latex)
    interval = _INTERVAL.fullmatch(latex)
    if interval is not None:
        left, low, high, right = interval.groups()
        ends = _rational(low), _rational(high)
        if ends[0] is None or ends[1] is None or not ends[0] < ends[1]:
            return None
        return (Interval(ends[0], ends[1], left == "(", right == ")"), latex)
    matrix = _MATRIX.fullmatch(latex)
    if matrix is not None:
        rows = [
            [_rational(cell.strip(" ")) for cell in row.split("&")]
            for row in matrix[2].split("\\\\")
        ]
        cells = [cell for row in rows for cell in row]
        if cells and None not in cells and len({len(row) for row in rows}) == 1:
            return (Matrix(rows), latex)
    return None


def _rational(text: str) -> Any:
    """The sympy Rational of an integer or \\frac{p}{q} (q > 0) with an optional sign, or None."""
    parts = _RATIONAL.fullmatch(text)
    if parts is None:
        return None
    sign, whole, numerator, denominator = parts.groups()
    if whole is None and int(denominator) == 0:
        return None
    from sympy import Rational

    value = (
        Rational(int(whole)) if whole is not None else Rational(int(numerator), int(denominator))
    )
    return -value if sign else value


def math_verify_match(completion: str, reference: str) -> Verdict:
    """Correct iff math-verify finds the extracted answer equal to the reference (LaTeX,
    fractions vs decimals, sets, intervals, ...). The answer key is math-verify's parsed form
    (so "\\frac12" and "\\frac{1}{2}" vote together), or the normalized text if it cannot parse.

    math-verify's own timeout uses signal.alarm, which only works in a main thread and cannot
    interrupt long C calls (huge powers): run this through `grade_many`, whose workers are killed
    on a hard timeout. Needs the `math` extra (math-verify).
    """
    return _math_verify_verdict(extract_answer(completion), reference)


def _math_verify_verdict(answer: str | None, reference: str) -> Verdict:
    """math-verify's verdict on an extracted answer (ImportError without math-verify, also
    when there is no answer: a grader that cannot work fails on every item alike)."""
    from math_verify import verify

    if answer is None:
        return Verdict(None, False)
    timeout = (
        MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    )
    predicted = _parse_math(answer, timeout)
    if not predicted:
        return Verdict(normalize_answer(answer), False)
    key = str(predicted[0])
    if len(key) > MAX_ANSWER_CHARS:
        key = normalize_answer(answer)
    gold = _parse_math(clean_text(reference), timeout)
    correct = bool(gold) and verify(list(gold), list(predicted), timeout_seconds=timeout)
    return Verdict(key, bool(correct))


@functools.cache
def has_math_verify() -> bool:
    """Whether math-verify can be imported here (the `math` extra)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def boxed_match(completion: str, reference: str) -> Verdict:
    """The MATH / AIME convention: the answer is the content of the completion's last
    `\\boxed{...}` (nested braces; no box: Verdict(None, False)), compared with the reference
    (itself a solution? its last box) by math-verify where it is installed, else as numbers
    when both are numbers and as `normalize_answer` text otherwise. Run it through
    `grade_many` (math-verify needs its hard timeout)."""
    answer = _tidy(_last_boxed(clean_text(completion)))
    reference = _last_boxed(clean_text(reference)) or reference
    if has_math_verify():
        return _math_verify_verdict(answer, reference)
    return _plain_verdict(answer, reference)


def _plain_verdict(answer: str | None, reference: str) -> Verdict:
    """Without math-verify: numbers compared as numbers (like `numeric_match`), anything else
    as `normalize_answer` text."""
    if answer is None:
        return Verdict(None, False)
    value, gold = _parse_number(answer), _parse_number(reference)
    if value is not None and gold is not None:
        return Verdict(_number_key(value), _close(value, gold, DEFAULT_TOLERANCE))
    key = normalize_answer(answer)
    return Verdict(key, key == normalize_answer(reference))


_GSM8K_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
"""lm-evaluation-harness's GSM8K "flexible-extract" pattern."""


def _gsm8k_numbers(text: str) -> list[str]:
    """The flexible-extract matches that hold a digit, without "$", commas and final periods."""
    found = (match.group() for match in _GSM8K_NUMBER.finditer(text))
    cleaned = (n.replace("$", "").replace(",", "").rstrip(".") for n in found)
    return [n for n in cleaned if any(c.isdigit() for c in n)]


def _gsm8k_answer(text: str) -> str | None:
    """The first number after the last "####" (the GSM8K format), else the last number in the
    text (lm-evaluation-harness's flexible-extract); units and words around it are dropped."""
    position = text.rfind("####")
    after = _gsm8k_numbers(text[position + 4 :].split("\n", 1)[0]) if position >= 0 else []
    numbers = after[:1] or _gsm8k_numbers(text)[-1:]
    return numbers[0] if numbers and len(numbers[0]) <= MAX_ANSWER_CHARS else None


def gsm8k_match(completion: str, reference: str) -> Verdict:
    """The GSM8K convention: the answer after the last "####", else the last number (commas,
    "$", units and a final period dropped: "The answer is $1,234." -> 1234), compared as a
    number with the reference (a number, or a GSM8K solution ending "#### 72"; ValueError
    otherwise). The answer key is the number's canonical form, as in `numeric_match`."""
    gold_text = reference[reference.rfind("####") + 4 :] if "####" in reference else reference
    gold = _parse_number(gold_text)
    if gold is None:
        raise ValueError(f"gsm8k_match: reference {reference[:100]!r} is not a number")
    answer = _gsm8k_answer(clean_text(completion))
    if answer is None:
        return Verdict(None, False)
    value = _parse_number(answer)
    if value is None:
        return Verdict(answer, False)
    return Verdict(_number_key(value), _close(value, gold, DEFAULT_TOLERANCE))


INLINE_GRADERS = (exact_match, numeric_match, gsm8k_match)
"""Graders cheap and bounded on any input (linear-time extraction, no evaluation): `grade_many`
runs them in the calling process by default, with no process overhead."""
