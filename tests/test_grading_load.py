"""Loading a grader in the pool's workers (real processes, real modules written by the tests):
an item's clock starts only once the grader is loaded; a slow or failing load is a clear error;
the timed-out policy; graders checked up front (a real failing import of math-verify)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from wise_callback.grading import (
    MAX_TIMED_OUT_SHARE,
    GradingError,
    check_grader,
    check_timeouts,
    exact_match,
    grade_many,
    math_verify_match,
)

WORKERS = 2


def grader_module(tmp_path, monkeypatch, body: str):
    """A module `mod_<random>` in tmp_path (on sys.path here, hence in the workers too) that
    runs `body` at import in any process but this one (the workers), then defines `grade`.
    A fresh name per test: workers outlive a test and keep what they imported."""
    name = f"mod_{uuid.uuid4().hex[:12]}"
    source = f"""
        import os, time
        from wise_callback.grading import Verdict

        if os.getpid() != {os.getpid()}:
            {body}

        def grade(completion, reference):
            return Verdict(completion, completion == reference)
    """
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    return name, module.grade


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_slow_to_import_grader_gets_its_items_full_time(tmp_path, monkeypatch):
    """Importing the grader's module takes 3 s in each worker, the per-item limit is 1 s: every
    item is graded (the old pool timed them all out, replacing worker after worker)."""
    _, grade = grader_module(tmp_path, monkeypatch, "time.sleep(3)")
    completions = [str(i) for i in range(12)]
    references = [str(i if i % 4 else -1) for i in range(12)]
    verdicts, timed_out = grade_many(grade, completions, references, timeout_s=1.0, workers=WORKERS)
    assert timed_out == 0
    assert [v.answer for v in verdicts] == completions
    assert [v.correct for v in verdicts] == [i % 4 != 0 for i in range(12)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_load_over_load_timeout_is_a_clear_error_soon(tmp_path, monkeypatch):
    name, grade = grader_module(tmp_path, monkeypatch, "time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(GradingError) as caught:
        grade_many(grade, ["a", "b"], ["a", "b"], workers=WORKERS, load_timeout_s=2.0)
    message = str(caught.value)
    assert f"loading the grader {name}.grade" in message
    assert "took longer than load_timeout_s=2 s" in message
    assert time.monotonic() - start < 30  # worker start-up (~2 s) + 2 s, not 600 s
    after = grade_many(math_verify_match, ["\\boxed{2}"], ["2"], workers=WORKERS)
    assert after.verdicts[0].correct  # the next call gets a fresh pool


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_load_that_raises_is_a_clear_error_with_the_traceback(tmp_path, monkeypatch):
    name, grade = grader_module(
        tmp_path, monkeypatch, "raise RuntimeError('needs a GPU to import')"
    )
    with pytest.raises(GradingError) as caught:
        grade_many(grade, ["a"], ["a"], workers=WORKERS)
    message = str(caught.value)
    assert f"loading the grader {name}.grade" in message and "failed" in message
    assert "Traceback (most recent call last)" in message
    assert "RuntimeError: needs a GPU to import" in message


# ---------------------------------------------------------------------------------------------
# what to do with timed-out items


def test_check_timeouts_warns_then_fails_over_the_share():
    assert check_timeouts(0, 100) is None
    assert check_timeouts(0, 0) is None
    warning = check_timeouts(3, 100)
    assert warning is not None and "3 of 100 completions (3.0%) timed out" in warning
    allowed = int(100 * MAX_TIMED_OUT_SHARE)
    assert check_timeouts(allowed, 100) is not None  # at the share: a warning
    with pytest.raises(GradingError, match=f"{allowed + 1} of 100 completions"):
        check_timeouts(allowed + 1, 100)
    with pytest.raises(GradingError, match="more than the 10% allowed"):
        check_timeouts(2, 10, max_share=0.1)
    for bad in [(-1, 5), (1.5, 5), (True, 5), (6, 5)]:
        with pytest.raises(ValueError, match="timed_out"):
            check_timeouts(*bad)
    with pytest.raises(ValueError, match="max_share"):
        check_timeouts(1, 5, max_share=2)


# ---------------------------------------------------------------------------------------------
# check_grader


def test_check_grader_refuses_what_is_not_callable():
    with pytest.raises(TypeError, match=r"grader must be a callable.*got 'exact' \(str\)"):
        check_grader("exact")
    check_grader(exact_match)
    check_grader(math_verify_match)  # math-verify is installed here
    check_grader(functools.partial(math_verify_match))


WITHOUT_MATH_VERIFY = """
import functools, json, sys
sys.modules["math_verify"] = None  # `import math_verify` now raises ImportError
from wise_callback.grading import (
    boxed_match, check_grader, exact_match, grader_for_layout, math_verify_match
)
out = {}
for name, grader in [("plain", math_verify_match),
                     ("partial", functools.partial(math_verify_match))]:
    try:
        check_grader(grader)
        out[name] = None
    except ImportError as error:
        out[name] = str(error)
check_grader(boxed_match)  # falls back to plain matching: accepted
out["boxed"] = [boxed_match(c, r).correct for c, r in [
    ("\\\\boxed{\\\\frac{1}{2}}", "0.5"), ("\\\\boxed{x + 1}", "x+1"), ("\\\\boxed{3}", "4")]]
out["auto_is_exact"] = grader_for_layout("prompt_answer") is exact_match
from wise_callback import WiSEFTCallback
try:
    WiSEFTCallback([{"prompt": "1+1=", "answer": "2"}], grader="math")
except ImportError as error:
    out["callback"] = str(error)
print(json.dumps(out))
"""


@pytest.mark.timeout(150)
def test_check_grader_without_math_verify_in_a_real_process():
    """A fresh interpreter where importing math-verify really fails."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATH_VERIFY],
        capture_output=True,
        text=True,
        timeout=140,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out = json.loads(done.stdout)
    for name in ("plain", "partial"):
        assert "math_verify_match needs math-verify" in out[name]
        assert "pip install math-verify" in out[name]
    assert out["boxed"] == [True, True, False]
    assert out["auto_is_exact"]
    assert "math_verify_match needs math-verify" in out["callback"]  # the callback's constructor
