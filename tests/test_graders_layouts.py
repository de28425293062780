"""The dataset-convention graders (boxed_match, gsm8k_match) on real-looking answers with real
math-verify, the per-layout choice (`auto`), the names the CLI and YAML use, and hostile output."""

from __future__ import annotations

import pytest

from test_grading import hostile_completions
from wise_callback.grading import (
    GRADERS,
    LAYOUTS,
    Verdict,
    boxed_match,
    check_grader,
    exact_match,
    grade_many,
    grader_for_layout,
    gsm8k_match,
    math_verify_match,
    numeric_match,
)

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    ("completion", "reference", "verdict"),
    [
        ("The answer is $1,234.", "1234", Verdict("1234", True)),
        ("#### 1,234", "1234", Verdict("1234", True)),
        ("She picked 72 apples", "72", Verdict("72", True)),
        ("72 apples", "72", Verdict("72", True)),
        ("#### 72 apples.", "72", Verdict("72", True)),
        ("48/2 = 24, so 48 + 24 = 72 in all.", "72", Verdict("72", True)),
        ("Half of 48 is 24.\n#### 72\nCheck: 100 - 28 = 5", "72", Verdict("72", True)),
        ("It costs $3.50 per box.", "3.5", Verdict("3.5", True)),
        ("It is -5 degrees...", "-5", Verdict("-5", True)),
        ("The answer is 72.0", "72", Verdict("72", True)),
        ("The answer is 1,234,567.", "1234567", Verdict("1234567", True)),
        ("So 50% of them.", "50", Verdict("50", True)),
        ("#### 73", "72", Verdict("73", False)),
        ("#### 72", GSM8K_SOLUTION, Verdict("72", True)),
        ("version 1.2.3", "1", Verdict("1.2.3", False)),
        ("I do not know.", "72", Verdict(None, False)),
    ],
)
def test_gsm8k_match(completion, reference, verdict):
    assert gsm8k_match(completion, reference) == verdict


def test_gsm8k_match_refuses_a_reference_that_is_not_a_number():
    with pytest.raises(ValueError, match="reference 'seventy-two' is not a number"):
        gsm8k_match("#### 72", "seventy-two")


MATH_SOLUTION = "Multiplying, we get $x = \\boxed{\\dfrac{1}{2}}$."


@pytest.mark.parametrize(
    ("completion", "reference", "correct"),
    [
        ("so the ratio is $\\boxed{\\frac{a}{b}}$.", "\\frac{a}{b}", True),
        ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt3}{2}", True),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt2}{2}", False),
        ("first \\boxed{3}, but wait: \\boxed{4}", "4", True),
        ("first \\boxed{4}, but wait: \\boxed{3}", "4", False),
        ("\\boxed{[0, 1)}", "[0,1)", True),
        ("\\boxed{[0, 1]}", "[0,1)", False),
        ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", True),
        ("\\boxed{50\\%}", "50", True),
        ("\\boxed{50}", "50\\%", True),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
        ("\\boxed{\\tfrac34}", "0.75", True),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
        (
            "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}",
            "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
            True,
        ),
        ("\\boxed{033}", "33", True),  # AIME: zero-padded integers
        ("\\boxed{34}", "33", False),
        ("\\boxed{\\frac12}", MATH_SOLUTION, True),  # a reference given as a solution
    ],
)
def test_boxed_match_with_math_verify(completion, reference, correct):
    verdict = boxed_match(completion, reference)
    assert verdict.correct is correct
    assert verdict.answer is not None


@pytest.mark.parametrize(
    "completion",
    ["The answer is 4.", "#### 4", "\\boxed{}", "\\boxed{4", "so 4. \\boxed{ $ $ }"],
)
def test_boxed_match_without_a_box_has_no_answer(completion):
    assert boxed_match(completion, "4") == Verdict(None, False)


def test_boxed_match_keys_merge_equal_forms():
    keys = {boxed_match(c, "1").answer for c in ("\\boxed{\\dfrac{1}{2}}", "\\boxed{0.5}")}
    assert len(keys) == 1


@pytest.mark.parametrize(
    ("layout", "source", "grader"),
    [
        ("prompt_answer", None, math_verify_match),  # math-verify is installed here
        ("gsm8k", None, gsm8k_match),
        ("math", "math500", boxed_match),
        ("aime", "aime24", boxed_match),
        ("verl", "openai/gsm8k", gsm8k_match),
        ("verl", "GSM8K-test", gsm8k_match),
        ("verl", "DigitalLearningGmbH/MATH-lighteval", boxed_match),
        ("verl", None, boxed_match),
    ],
)
def test_grader_for_layout(layout, source, grader):
    assert grader_for_layout(layout, source) is grader


def test_every_layout_the_loader_detects_has_a_grader():
    from wise_callback.problem_layouts import _LAYOUTS

    assert {layout.name for layout in _LAYOUTS} == set(LAYOUTS)


def test_grader_for_layout_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match="unknown problem layout 'mmlu'; known: prompt_answer"):
        grader_for_layout("mmlu")
    with pytest.raises(TypeError, match="source must be a str"):
        grader_for_layout("verl", 3)
    assert set(LAYOUTS) == {"prompt_answer", "gsm8k", "math", "aime", "verl"}


def test_graders_by_name():
    assert {
        "exact": exact_match,
        "numeric": numeric_match,
        "math": math_verify_match,
        "boxed": boxed_match,
        "gsm8k": gsm8k_match,
    } == GRADERS
    for grader in GRADERS.values():
        check_grader(grader)


# ---------------------------------------------------------------------------------------------
# hostile model output: no hang, no crash, nothing executed


def test_hostile_output_gsm8k_inline(tmp_path):
    marker = tmp_path / "pwned"
    completions = hostile_completions(str(marker))
    verdicts, timed_out = grade_many(gsm8k_match, completions, ["4"] * len(completions))
    assert timed_out == 0
    assert verdicts[0] == Verdict("9", False)  # the tower of powers: its last number, unread
    assert verdicts[1] == Verdict("4", True)  # the 1 MB completion
    assert verdicts[7] == Verdict("5", False)  # lone surrogates dropped
    assert verdicts[11] == Verdict(None, False)  # 200,000 digits: not an answer
    assert not marker.exists()
