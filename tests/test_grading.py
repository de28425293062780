"""Answer extraction, graders, and grade_many's worker pool (real processes, real math-verify)."""

from __future__ import annotations

import functools
import os
import threading
import time

import pytest

from wise_callback.grading import (
    GradingError,
    Verdict,
    boxed_match,
    exact_match,
    extract_answer,
    grade_many,
    math_verify_match,
    numeric_match,
)

WORKERS = 2  # one pool size for the whole file: the pool is reused, not restarted


# graders the workers import by reference (module level, so they pickle)


def pid_grader(completion: str, reference: str) -> Verdict:
    """The answer is the id of the process that graded: shows which worker ran the item."""
    return Verdict(str(os.getpid()), completion == reference)


def sleepy_grader(completion: str, reference: str) -> Verdict:
    if completion == "hang":
        time.sleep(600)
    return Verdict(completion, completion == reference)


def dying_grader(completion: str, reference: str) -> Verdict:
    if completion == "die":
        os._exit(3)
    return Verdict(completion, completion == reference)


def raising_grader(completion: str, reference: str) -> Verdict:
    if completion == "bad":
        raise ArithmeticError("cannot grade this")
    return Verdict(completion, True)


def not_a_verdict(completion: str, reference: str) -> bool:
    return True


# ---------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("so x = \\boxed{\\frac{1}{2}}. Also #### 7 and the answer is 9", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\boxed{7}}", "7"),
        ("\\boxed{{a}{b}} end", "{a}{b}"),
        ("\\fbox{12}", "12"),
        ("\\boxed{5} and an unclosed \\boxed{6", "5"),
        ("\\boxed{} so the answer is 8.", "8"),
        ("work...\n#### 1,234\nmore", "1,234"),
        ("The Answer Is: $x^2$. Because reasons\nand 5", "x^2"),
        ("we had 3 apples, then 4,500 and 1/2 a pear", "1/2"),
        ("we had 3 apples, then 4,500 pears", "4500"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer_order(completion, answer):
    assert extract_answer(completion) == answer


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="expected a str, got bytes"):
        extract_answer(b"\\boxed{1}")


# ---------------------------------------------------------------------------------------------
# graders


def test_exact_match_normalizes_lightly():
    assert exact_match("\\boxed{ \\dfrac{1}{2} }", "\\frac{1}{2}") == Verdict("\\frac{1}{2}", True)
    assert exact_match("#### 1,234", "1234") == Verdict("1234", True)
    assert exact_match("\\boxed{\\text{Paris}}.", "Paris").correct
    assert exact_match("\\boxed{0.5}", "1/2") == Verdict("0.5", False)
    assert exact_match("nothing", "1") == Verdict(None, False)


def test_numeric_match_tolerance_and_canonical_keys():
    assert numeric_match("The answer is 42.0", "42") == Verdict("42", True)
    assert numeric_match("\\boxed{\\frac{3}{4}}", "0.75") == Verdict("0.75", True)
    assert numeric_match("\\boxed{50\\%}", "50").correct
    assert numeric_match("#### $1,000", "1000").correct
    assert not numeric_match("\\boxed{3.1416}", "3.14159").correct
    loose = functools.partial(numeric_match, tolerance=1e-3)
    assert loose("\\boxed{3.1416}", "3.14159").correct
    assert numeric_match("\\boxed{x+1}", "2") == Verdict("x+1", False)
    assert numeric_match("\\boxed{1e999/3}", "1e999").answer.startswith("1000")
    with pytest.raises(ValueError, match="reference 'abc' is not a number"):
        numeric_match("\\boxed{1}", "abc")


@pytest.mark.parametrize(
    ("completion", "reference", "correct"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\frac{2}{4}}", "0.5", True),
        ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", True),
        ("\\boxed{[0, 1)}", "[0,1)", True),
        ("\\boxed{[0, 1]}", "[0,1)", False),
        ("#### 7", "7", True),
        ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
        ("\\boxed{3}", "4", False),
    ],
)
def test_math_verify_match(completion, reference, correct):
    verdict = math_verify_match(completion, reference)
    assert verdict.correct is correct
    assert verdict.answer is not None


def test_math_verify_keys_merge_equal_forms():
    assert (
        math_verify_match("\\boxed{\\frac12}", "1").answer
        == math_verify_match("\\boxed{\\frac{1}{2}}", "1").answer
    )


# ---------------------------------------------------------------------------------------------
# hostile model output: no hang, no crash, nothing executed

PAYLOAD = "__import__('os').system('touch {marker}')"


def hostile_completions(marker: str) -> list[str]:
    code = PAYLOAD.format(marker=marker)
    return [
        "\\boxed{9^{9^{9^{9^9}}}}",
        "x" * 500_000 + " \\boxed{4} " + "y" * 500_000,  # 1 MB
        "\\boxed{" * 50_000,  # unbalanced
        "{" * 100_000 + "\\boxed{3}" + "}" * 100_000,  # deeply nested
        "}" * 100_000 + "\\boxed{" + "{" * 100_000,
        "\\boxed{\\boxed{\\boxed{2}}}",
        "\\boxed{4\x00}\x00",
        "\ud800 the answer is \udfff 5",
        f"\\boxed{{{code}}}",
        f"The answer is {code}",
        f"#### exec({code!r})",
        "9" * 200_000,
    ]


@pytest.mark.parametrize("grader", [exact_match, numeric_match], ids=["exact", "numeric"])
def test_hostile_output_inline(grader, tmp_path):
    marker = tmp_path / "pwned"
    completions = hostile_completions(str(marker))
    verdicts, timed_out = grade_many(grader, completions, ["4"] * len(completions))
    assert timed_out == 0
    assert [v.correct for v in verdicts][1:7] == [True, False, False, False, False, True]
    assert verdicts[7].answer == "5"
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("grader", "answer_is"), [(math_verify_match, "5"), (boxed_match, None)], ids=["math", "boxed"]
)
def test_hostile_output_in_workers(grader, answer_is, tmp_path):
    marker = tmp_path / "pwned"
    completions = hostile_completions(str(marker))
    verdicts, timed_out = grade_many(
        grader, completions, ["4"] * len(completions), timeout_s=3, workers=WORKERS
    )
    assert verdicts[0] == Verdict(None, False)  # the tower of powers: killed, counted
    assert timed_out >= 1
    assert verdicts[1] == Verdict("4", True)  # the 1 MB completion
    assert [v.answer for v in verdicts[2:4]] == [None, "3"]  # unbalanced; deeply nested
    assert verdicts[6].correct  # NUL bytes dropped
    assert verdicts[7].answer == answer_is  # "the answer is 5" (boxed_match wants a box)
    assert not any(v.correct for v in verdicts[8:])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# grade_many


def test_grade_many_checks_its_inputs_up_front():
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        grade_many(lambda c, r: Verdict(c, True), ["a"], ["a"])
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        grade_many(exact_match, ["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"completions\[1\] is a int"):
        grade_many(exact_match, ["a", 3], ["a", "b"])
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        grade_many(exact_match, ["a"], ["a"], timeout_s=0)
    with pytest.raises(ValueError, match="workers must be None or an int >= 0"):
        grade_many(exact_match, ["a"], ["a"], workers=-1)
    with pytest.raises(GradingError, match="returned bool on item 0"):
        grade_many(not_a_verdict, ["a"], ["a"], workers=0)


def test_grade_many_inline_grades_lambdas_with_workers_zero():
    verdicts, timed_out = grade_many(
        lambda c, r: Verdict(c, c == r), ["a", "b"], ["a", "a"], workers=0
    )
    assert [v.correct for v in verdicts] == [True, False] and timed_out == 0
    assert tuple(grade_many(exact_match, [], [])) == ([], 0)


def test_grade_many_pool_keeps_order_and_reuses_workers():
    completions = [f"\\boxed{{{i}}}" for i in range(40)]
    references = [str(i if i % 3 else -1) for i in range(40)]
    first = grade_many(math_verify_match, completions, references, workers=WORKERS)
    assert first.timed_out == 0
    assert [v.correct for v in first.verdicts] == [i % 3 != 0 for i in range(40)]
    assert [v.answer for v in first.verdicts] == [str(i) for i in range(40)]
    pids = {
        v.answer for v in grade_many(pid_grader, ["a"] * 40, ["a"] * 40, workers=WORKERS).verdicts
    }
    again = {
        v.answer for v in grade_many(pid_grader, ["a"] * 40, ["a"] * 40, workers=WORKERS).verdicts
    }
    assert str(os.getpid()) not in pids
    assert again <= pids  # the same processes: start-up is paid once


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_grade_many_hard_timeout_off_the_main_thread():
    """A hung item is cut at timeout_s, also when called from a non-main thread (where
    signal.alarm cannot work); its worker is replaced and the other items are unaffected."""
    completions = ["a", "hang", "b", "c", "hang", "d"] + ["e"] * 10
    result: dict = {}

    def run() -> None:
        start = time.monotonic()
        result["out"] = grade_many(
            sleepy_grader, completions, ["a"] * 16, timeout_s=1.0, workers=WORKERS
        )
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    verdicts, timed_out = result["out"]
    assert timed_out == 2
    assert verdicts[1] == verdicts[4] == Verdict(None, False)
    assert [v.answer for i, v in enumerate(verdicts) if i not in (1, 4)] == [
        c for i, c in enumerate(completions) if i not in (1, 4)
    ]
    assert result["seconds"] < 30  # two 1 s timeouts, not two 600 s sleeps
    after = grade_many(pid_grader, ["a"] * 8, ["a"] * 8, workers=WORKERS)
    assert after.timed_out == 0 and all(v.correct for v in after.verdicts)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_grade_many_survives_dying_workers_and_reports_raising_graders():
    verdicts, timed_out = grade_many(
        dying_grader, ["a", "die", "b", "die", "c"], ["a"] * 5, timeout_s=5, workers=WORKERS
    )
    assert timed_out == 2
    assert [v.answer for v in verdicts] == ["a", None, "b", None, "c"]
    with pytest.raises(GradingError, match=r"(?s)item 2.*ArithmeticError: cannot grade this"):
        grade_many(raising_grader, ["a", "b", "bad", "c"], ["a"] * 4, workers=WORKERS)
    assert grade_many(raising_grader, ["a"] * 4, ["a"] * 4, workers=WORKERS).timed_out == 0


MAIN_SCRIPT = """
import os, sys, time
from wise_callback.grading import Verdict, grade_many

if __name__ == "__mp_main__":
    time.sleep(3)  # a training script's imports, slower than the 1 s per-item limit below

def shout(completion, reference):
    return Verdict(completion.upper(), completion == reference)

print("imported as", __name__, file=sys.stderr)
if __name__ == "__main__":
    from wise_callback.grading import numeric_match
    assert grade_many(numeric_match, ["#### 3"], ["3"], workers=1).verdicts[0].correct
    print("--- a grader from __main__ now", file=sys.stderr, flush=True)
    verdicts, timed_out = grade_many(shout, ["a", "b"], ["a", "a"], workers=1, timeout_s=1)
    print([v.answer for v in verdicts], [v.correct for v in verdicts], timed_out)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_grader_defined_in_a_script_main_runs_in_workers(tmp_path):
    """Workers load the script as __mp_main__ (its main block does not run there), and only
    once a grader defined in it is used: a library grader never pays for the script's imports.
    The load (3 s here) does not count against the items' 1 s limit."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(MAIN_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, check=True
    )
    assert done.stdout.strip() == "['A', 'B'] [True, False] 0"
    before, after = done.stderr.split("--- a grader from __main__ now")
    assert before.count("imported as __main__") == 1
    assert "__mp_main__" not in before
    assert after.count("imported as __mp_main__") == 1


def grade_on_rank(rank: int, init_file: str) -> None:
    """One rank of a gloo group with torch threads running: grade, with a hung item, then
    agree on the counts over the group."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(2)
        torch.randn(256, 256) @ torch.randn(256, 256)  # intra-op threads now exist
        completions = ["\\boxed{9^{9^{9^{9^9}}}}", f"\\boxed{{{rank}}}", "#### 5"]
        verdicts, timed_out = grade_many(
            math_verify_match, completions, [str(rank)] * 3, timeout_s=2, workers=1
        )
        counts = torch.tensor([timed_out, sum(v.correct for v in verdicts)])
        dist.all_reduce(counts)
        assert counts.tolist() == [2, 2], counts
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still talks
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_grade_many_on_every_rank_of_a_gloo_group(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(grade_on_rank, args=(str(tmp_path / "init"),), nprocs=2)
