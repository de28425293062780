"""Grading: matchers (answer extraction, exact / numeric / math-verify / boxed / GSM8K graders),
choosing a grader (by name, by dataset layout, checked up front), and `grade_many`, which
grades in a persistent pool of worker processes with a hard per-item timeout.

A grader is any callable `(completion, reference) -> Verdict`; see matchers.py for the answer
extraction rules, pool.py for the pool and the policy for timed-out items.
"""

from wise_callback.grading.choose import (
    AUTO,
    GRADERS,
    LAYOUTS,
    check_grader,
    grader_for_layout,
    graders_for,
)
from wise_callback.grading.matchers import (
    MAX_ANSWER_CHARS,
    Grader,
    Verdict,
    boxed_match,
    clean_text,
    exact_match,
    extract_answer,
    gsm8k_match,
    has_math_verify,
    math_verify_match,
    normalize_answer,
    numeric_match,
)
from wise_callback.grading.pool import (
    LOAD_TIMEOUT_S,
    MAX_TIMED_OUT_SHARE,
    GradeResult,
    GradingError,
    check_timeouts,
    default_workers,
    grade_many,
    shutdown_workers,
)

__all__ = [
    "AUTO",
    "GRADERS",
    "LAYOUTS",
    "LOAD_TIMEOUT_S",
    "MAX_ANSWER_CHARS",
    "MAX_TIMED_OUT_SHARE",
    "GradeResult",
    "Grader",
    "GradingError",
    "Verdict",
    "boxed_match",
    "check_grader",
    "check_timeouts",
    "clean_text",
    "default_workers",
    "exact_match",
    "extract_answer",
    "grade_many",
    "grader_for_layout",
    "graders_for",
    "gsm8k_match",
    "has_math_verify",
    "math_verify_match",
    "normalize_answer",
    "numeric_match",
    "shutdown_workers",
]
