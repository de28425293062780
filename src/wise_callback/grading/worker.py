"""The worker side of `grade_many`'s pool: what runs in each worker process (a fresh
interpreter started by pool.py with `python -c "...; _worker_main(fd)"`).

Messages, parent -> worker: (setup or None, [(index, completion, reference), ...]), where setup
is (pickled grader, the parent's sys.path, how to load the parent's __main__); None or a closed
socket ends the worker. Worker -> parent: ("ready",) once started; ("loaded", None or the
traceback text) after each setup, before any item of that chunk; ("graded", index, answer,
correct, error or None) per item. The parent starts an item's clock only after "loaded", so a
grader whose module is slow to import (a training script) is timed by its own load limit.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import runpy
import signal
import sys
import traceback
import types
from multiprocessing.connection import Connection
from typing import Any

from wise_callback.grading.matchers import Verdict, math_verify_match

_main_loaded = False  # whether the parent's main module is loaded in this worker


def _warm_up() -> None:
    """Import (and run once) math-verify in a new worker, so the first item's timeout does not
    pay for sympy's and the LaTeX parser's start-up."""
    with contextlib.suppress(ImportError):
        math_verify_match("\\boxed{1}", "1")


def _load_main(reference: tuple[str, str] | None) -> None:
    """Load the parent's main module as __mp_main__ and alias it as __main__ (what spawn does),
    so graders pickled as `__main__.name` resolve; its `if __name__ == "__main__":` block does
    not run."""
    global _main_loaded
    if reference is None or _main_loaded:
        return
    kind, value = reference
    if kind == "name":
        module = importlib.import_module(value)
    else:
        module = types.ModuleType("__mp_main__")
        module.__dict__.update(runpy.run_path(value, run_name="__mp_main__"))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    _main_loaded = True


def _load_grader(blob: bytes, sys_path: list[str], main: tuple[str, str] | None) -> Any:
    """Unpickle the grader: with the parent's sys.path, importing its module (or loading the
    parent's main script, for a grader defined there)."""
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if b"__main__" in blob:
        _load_main(main)
    return pickle.loads(blob)


def _grade_one(grader: Any, completion: str, reference: str) -> tuple[Any, bool, str | None]:
    """(answer, correct, None), or (None, False, the traceback) when the grader failed."""
    try:
        verdict = grader(completion, reference)
        if not isinstance(verdict, Verdict):
            raise TypeError(f"grader returned {type(verdict).__name__}, not a Verdict")
    except Exception:
        return None, False, traceback.format_exc()
    return verdict.answer, bool(verdict.correct), None


def _worker_main(fd: int) -> None:
    """Serve the parent on socket `fd` (protocol in the module docstring) until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    _warm_up()
    conn.send(("ready",))
    grader: Any = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        setup, items = message
        if setup is not None:
            try:
                grader = _load_grader(*setup)
            except BaseException:  # SystemExit from a script too: the parent says which grader
                conn.send(("loaded", traceback.format_exc()))
                continue
            conn.send(("loaded", None))
        for index, completion, reference in items:
            conn.send(("graded", index, *_grade_one(grader, completion, reference)))
