"""Rationals, and intervals and matrices of them, are parsed without math-verify's LaTeX parser
(about 1-3 ms an answer, 20 ms and more for an interval): the result must be math-verify's own,
element for element, on every form the fast path takes (random forms, checked against
math-verify itself), and anything else must go to math-verify."""

from __future__ import annotations

import random

import pytest
import sympy

pytest.importorskip("math_verify")

from math_verify import LatexExtractionConfig, parse

from wise_callback.grading import math_verify_match
from wise_callback.grading.matchers import _parse_simple


def as_text(parsed) -> list[str]:
    return [x if isinstance(x, str) else sympy.srepr(x) for x in parsed]


def math_verify_parse(latex: str) -> list[str]:
    extraction = [LatexExtractionConfig()]
    return as_text(parse(f"${latex}$", extraction_config=extraction, parsing_timeout=None))


def rational(rng: random.Random) -> str:
    sign = rng.choice(["", "", "-"])
    if rng.random() < 0.4:
        return f"{sign}{rng.choice([0, 7, rng.randint(0, 30), rng.randint(0, 10**12)])}"
    return f"{sign}\\frac{{{rng.randint(0, 60)}}}{{{rng.randint(1, 12)}}}"


def interval(rng: random.Random) -> str:
    comma = rng.choice([", ", ",", " , ", " ,"])
    inside = rng.choice(["", " "])
    low, high = rational(rng), rational(rng)
    return f"{rng.choice('[(')}{inside}{low}{comma}{high}{inside}{rng.choice('])')}"


def matrix(rng: random.Random) -> str:
    kind = rng.choice("pb")
    rows, columns = rng.randint(1, 3), rng.randint(1, 3)
    cell = rng.choice([" & ", "&"])
    row = rng.choice([" \\\\ ", "\\\\"])
    body = row.join(cell.join(rational(rng) for _ in range(columns)) for _ in range(rows))
    pad = rng.choice(["", " "])
    return f"\\begin{{{kind}matrix}}{pad}{body}{pad}\\end{{{kind}matrix}}"


@pytest.mark.parametrize(("form", "count"), [(rational, 120), (interval, 120), (matrix, 60)])
def test_the_fast_parse_is_math_verifys_own(form, count):
    rng = random.Random(form.__name__)
    taken = 0
    for _ in range(count):
        latex = form(rng)
        fast = _parse_simple(latex)
        if fast is None:
            continue
        taken += 1
        assert as_text(fast) == math_verify_parse(latex), latex
    assert taken > count // 3  # an interval with low >= high does not take it (half of them)


@pytest.mark.parametrize(
    "latex",
    ["(3, 1)", "[2, 2]", "[1.5, 2)", "[\\dfrac{1}{2}, 1]", "[a, b]", "[1,  2]", "(-\\infty, 3)",
     "[\\sqrt{2}, 3]", "[1, 2) \\cup [3, 4]", "[\\frac{1}{0}, 2)", "\\frac{1}{0}", "0.5",
     "\\frac{-3}{4}", "--3", "\\dfrac{3}{4}", "3\\sqrt{2}", "x", "1,000",
     "\\begin{pmatrix} 1 & 2 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 1 & x \\end{pmatrix}",
     "\\begin{pmatrix} 1 \\\\ \\end{pmatrix}", "\\begin{pmatrix} 1 \\end{bmatrix}",
     "\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix}"],
)  # fmt: skip
def test_other_forms_go_to_math_verify(latex):
    assert _parse_simple(latex) is None


def test_verdicts_through_the_fast_path():
    interval = "The answer is $\\boxed{[\\frac{10}{4}, \\frac{26}{2})}$."
    assert math_verify_match(interval, "[\\frac{5}{2}, 13)").correct
    assert not math_verify_match(interval, "[\\frac{5}{2}, 13]").correct
    assert not math_verify_match(interval, "(\\frac{5}{2}, 13)").correct
    assert not math_verify_match(interval, "[\\frac{5}{2}, 12)").correct
    matrix = "So $\\boxed{\\begin{pmatrix} -\\frac{42}{4} & 2 \\end{pmatrix}}$."
    same = "\\begin{bmatrix} -\\frac{21}{2} & \\frac{4}{2} \\end{bmatrix}"
    assert math_verify_match(matrix, same).correct
    assert not math_verify_match(
        matrix, "\\begin{pmatrix} \\frac{21}{2} & 2 \\end{pmatrix}"
    ).correct
    assert math_verify_match("$\\boxed{-\\frac{140}{38}}$", "-\\frac{70}{19}").correct
