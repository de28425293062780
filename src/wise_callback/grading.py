"""Graders: answer extraction, exact / numeric / math-verify matching, and `grade_many`, which
grades in a persistent pool of worker processes with a hard per-item timeout.

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
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import math
import os
import pickle
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple, Protocol

from tqdm.auto import tqdm

__all__ = [
    "GradeResult",
    "Grader",
    "GradingError",
    "Verdict",
    "exact_match",
    "extract_answer",
    "grade_many",
    "math_verify_match",
    "normalize_answer",
    "numeric_match",
    "shutdown_workers",
]

MAX_ANSWER_CHARS = 1_000
"""An extracted answer longer than this is not an answer (a runaway generation)."""

WORKER_START_TIMEOUT_S = 120.0
"""How long a new worker may take to import its modules before `grade_many` gives up."""

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


class GradingError(RuntimeError):
    """A grader raised (or returned something that is not a Verdict) on an item."""


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
        candidate = finder(text)
        if candidate is None:
            continue
        candidate = candidate.strip().strip("$").strip().rstrip(".").strip()
        if candidate and len(candidate) <= MAX_ANSWER_CHARS:
            return candidate
    return None


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


def numeric_match(completion: str, reference: str, *, tolerance: float = 1e-6) -> Verdict:
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
    slack = Fraction(tolerance) * max(Fraction(1), abs(gold))
    return Verdict(_number_key(value), abs(value - gold) <= slack)


@functools.lru_cache(maxsize=256)
def _parse_math(latex: str, timeout: int | None) -> tuple[Any, ...]:
    """math-verify's parse of one answer (LaTeX only: its plain-expression mode runs sympy's
    parse_expr, i.e. eval, on model output)."""
    from math_verify import LatexExtractionConfig, parse

    parsed = parse(
        f"${latex}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout
    )
    return tuple(parsed)


def math_verify_match(completion: str, reference: str) -> Verdict:
    """Correct iff math-verify finds the extracted answer equal to the reference (LaTeX,
    fractions vs decimals, sets, intervals, ...). The answer key is math-verify's parsed form
    (so "\\frac12" and "\\frac{1}{2}" vote together), or the normalized text if it cannot parse.

    math-verify's own timeout uses signal.alarm, which only works in a main thread and cannot
    interrupt long C calls (huge powers): run this through `grade_many`, whose workers are killed
    on a hard timeout. Needs the `math` extra (math-verify).
    """
    from math_verify import verify

    answer = extract_answer(completion)
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


_INLINE_GRADERS = (exact_match, numeric_match)
"""Graders cheap and bounded on any input (linear-time extraction, no evaluation): `grade_many`
runs them in the calling process by default, with no process overhead."""


# ----------------------------------------------------------------------------------------------
# grade_many: persistent worker pool with a hard per-item timeout


class GradeResult(NamedTuple):
    """Verdicts in input order, and how many items did not finish: timed out, or their worker
    died (each such item is a Verdict(None, False)). Unpacks as `verdicts, timed_out`."""

    verdicts: list[Verdict]
    timed_out: int


def _warm_up() -> None:
    """Import (and run once) math-verify in a new worker, so the first item's timeout does not
    pay for sympy's and the LaTeX parser's start-up."""
    with contextlib.suppress(ImportError):
        math_verify_match("\\boxed{1}", "1")


def _main_reference() -> tuple[str, str] | None:
    """How a worker can load this process's __main__ (where a grader may be defined)."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name:
        return ("name", spec_name)
    path = getattr(main, "__file__", None)
    return ("path", os.path.abspath(path)) if path else None


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


_main_loaded = False  # in a worker: whether the parent's main module is loaded


def _load_grader(blob: bytes, sys_path: list[str], main: tuple[str, str] | None) -> Any:
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if b"__main__" in blob:
        _load_main(main)
    return pickle.loads(blob)


def _worker_main(fd: int) -> None:
    """A worker process (a fresh interpreter): receive (grader setup or None,
    [(index, completion, reference), ...]) chunks and answer (index, answer, correct, error)
    per item; None or a closed socket ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    _warm_up()
    conn.send("ready")
    grader: Any = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        setup, items = message
        error = None
        if setup is not None:
            try:
                grader = _load_grader(*setup)
            except Exception:
                error = "the grader could not be loaded in a worker:\n" + traceback.format_exc()
        for index, completion, reference in items:
            if error is not None:
                conn.send((index, None, False, error))
                continue
            try:
                verdict = grader(completion, reference)
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"grader returned {type(verdict).__name__}, not a Verdict")
                conn.send((index, verdict.answer, bool(verdict.correct), None))
            except Exception:
                conn.send((index, None, False, traceback.format_exc()))


def _worker_env() -> dict[str, str]:
    """This environment, with the folder that holds this package first on PYTHONPATH, so a
    worker imports this very wise_callback even when it is not installed."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


_WORKER_COMMAND = (
    "import sys; from wise_callback.grading import _worker_main; _worker_main(int(sys.argv[1]))"
)


class _Worker:
    """One worker process, its socket, the grader it holds and the chunk it is working on.

    A worker is a fresh interpreter started with subprocess (fork + immediate exec: safe in a
    process that already runs torch, gloo or vLLM threads, unlike a plain fork) that imports only
    this module and math-verify, not the parent's __main__ (loaded only for a grader that lives
    there)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_worker_env(),
            )
        self.conn = Connection(ours.detach())
        self.ready = False
        self.started = time.monotonic()  # of the item now running (or of the start-up)
        self.grader_blob: bytes | None = None
        self.items: deque[int] = deque()

    def send(self, blob: bytes, items: list[tuple[int, str, str]]) -> None:
        setup = None if blob == self.grader_blob else (blob, list(sys.path), _main_reference())
        self.conn.send((setup, items))
        self.grader_blob = blob
        self.items = deque(index for index, _, _ in items)
        self.started = time.monotonic()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


class _Pool:
    """Worker processes kept across `grade_many` calls; killed and replaced one by one."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.workers = [_Worker() for _ in range(size)]

    def _replace(self, worker: _Worker) -> _Worker:
        fresh = _Worker()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def shutdown(self, kill: bool = False) -> None:
        for worker in self.workers:
            worker.kill() if kill else worker.stop()
        self.workers = []

    def run(
        self,
        blob: bytes,
        completions: Sequence[str],
        references: Sequence[str],
        timeout_s: float,
        bar: tqdm,
    ) -> GradeResult:
        verdicts: list[Verdict | None] = [None] * len(completions)
        chunk = max(1, min(64, math.ceil(len(completions) / (4 * len(self.workers)))))
        todo = deque(
            list(range(i, min(i + chunk, len(completions))))
            for i in range(0, len(completions), chunk)
        )
        timed_out = 0

        def give_up_on(worker: _Worker) -> None:
            """The worker's current item (if any: an idle worker can die too) did not finish:
            mark it, requeue the rest of its chunk, replace the worker."""
            nonlocal timed_out
            if worker.items:
                verdicts[worker.items.popleft()] = Verdict(None, False)
                timed_out += 1
                bar.update(1)
            if worker.items:
                todo.appendleft(list(worker.items))
            worker.kill()
            self._replace(worker)

        while todo or any(w.items for w in self.workers):
            for worker in self.workers:
                if worker.ready and not worker.items and todo:
                    indices = todo.popleft()
                    worker.send(blob, [(i, completions[i], references[i]) for i in indices])
            now = time.monotonic()
            deadlines = [
                w.started + (timeout_s if w.ready else WORKER_START_TIMEOUT_S)
                for w in self.workers
                if w.items or not w.ready
            ]
            by_conn: dict[Any, _Worker] = {w.conn: w for w in self.workers}
            for conn in wait(list(by_conn), timeout=max(0.0, min(deadlines, default=now) - now)):
                worker = by_conn[conn]
                try:
                    message: Any = worker.conn.recv()
                except (EOFError, OSError):
                    if not worker.ready:
                        raise RuntimeError(
                            f"a grading worker died while starting (exit code "
                            f"{worker.process.wait()}); its error is on stderr"
                        ) from None
                    give_up_on(worker)
                    continue
                if message == "ready":
                    worker.ready = True
                    continue
                index, answer, correct, error = message
                if error is not None:
                    raise GradingError(f"grader raised on item {index}:\n{error}")
                verdicts[index] = Verdict(answer, correct)
                worker.items.popleft()
                worker.started = time.monotonic()
                bar.update(1)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.items and now - worker.started > timeout_s:
                    give_up_on(worker)
                elif not worker.ready and now - worker.started > WORKER_START_TIMEOUT_S:
                    raise RuntimeError(
                        f"a grading worker did not start within {WORKER_START_TIMEOUT_S} s"
                    )
        assert all(v is not None for v in verdicts)
        return GradeResult(verdicts, timed_out)  # type: ignore[arg-type]


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def shutdown_workers() -> None:
    """Stop `grade_many`'s worker processes now (they are also stopped at interpreter exit);
    the next `grade_many` call starts new ones."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool.pid == os.getpid():
            _pool.shutdown()
        _pool = None


atexit.register(shutdown_workers)


def default_workers() -> int:
    """Worker processes when `workers` is not given: the usable cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _runs_inline(grader: Grader) -> bool:
    while isinstance(grader, functools.partial):
        grader = grader.func
    return any(grader is cheap for cheap in _INLINE_GRADERS)


def grade_many(
    grader: Grader,
    completions: Sequence[str],
    references: Sequence[str],
    *,
    timeout_s: float = 10.0,
    workers: int | None = None,
    progress: bool = False,
) -> GradeResult:
    """Grade completions[i] against references[i] with `grader`; verdicts come back in order.

    `workers=None` (default): exact_match and numeric_match (or a functools.partial of them)
    run in this process, since they are bounded on any input; any other grader runs in a pool
    of `default_workers()` processes. `workers=0`: always in this process (no timeout);
    `workers=N`: always in a pool of N processes.

    In the pool, each item has a hard timeout of `timeout_s` seconds from the moment its worker
    starts it; an item over it is a Verdict(None, False), counted in `timed_out`, and its worker is
    killed and replaced (so is a worker that dies). The pool is started on first use (fresh
    interpreters via subprocess, never a bare fork of this possibly multi-threaded process; each
    imports only this module and math-verify, ~1-2 s, paid once), kept for later calls, resized
    when `workers` changes, and stopped at interpreter exit or by `shutdown_workers()`. Calls
    from several threads are serialised. Workers load the caller's main script only for a grader
    defined there (then its `if __name__ == "__main__":` guard matters, as with spawn).

    The grader must be picklable for the pool (a module-level function, or functools.partial of
    one): a lambda or nested function is refused up front with TypeError. A grader that raises
    raises GradingError here, naming the item.
    """
    if not callable(grader):
        raise TypeError(f"grader must be callable, got {type(grader).__name__}")
    completions, references = list(completions), list(references)
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    for name, texts in (("completions", completions), ("references", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{index}] is a {type(text).__name__}, not a str")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 0
    ):
        raise ValueError(f"workers must be None or an int >= 0, got {workers!r}")
    inline = workers == 0 or (workers is None and _runs_inline(grader))
    bar = tqdm(
        total=len(completions), desc="grading", unit="item", disable=not progress, leave=False
    )
    with bar:
        if inline:
            return GradeResult(_grade_inline(grader, completions, references, bar), 0)
        try:
            blob = pickle.dumps(grader)
        except Exception as error:
            raise TypeError(
                f"grader {grader!r} cannot be sent to worker processes ({error}). Define it at "
                "module level (not a lambda or a nested function), bind options with "
                "functools.partial, or pass workers=0 to grade in this process without a timeout."
            ) from None
        if not completions:
            return GradeResult([], 0)
        return _run_in_pool(
            blob, completions, references, timeout_s, workers or default_workers(), bar
        )


def _grade_inline(
    grader: Grader, completions: list[str], references: list[str], bar: tqdm
) -> list[Verdict]:
    verdicts = []
    for index, (completion, reference) in enumerate(zip(completions, references, strict=True)):
        try:
            verdict = grader(completion, reference)
        except Exception as error:
            raise GradingError(f"grader raised on item {index}: {error!r}") from error
        if not isinstance(verdict, Verdict):
            raise GradingError(
                f"grader returned {type(verdict).__name__} on item {index}, not a Verdict"
            )
        verdicts.append(verdict)
        bar.update(1)
    return verdicts


def _run_in_pool(
    blob: bytes,
    completions: list[str],
    references: list[str],
    timeout_s: float,
    size: int,
    bar: tqdm,
) -> GradeResult:
    global _pool
    with _pool_lock:
        if _pool is not None and (_pool.pid != os.getpid() or len(_pool.workers) != size):
            if _pool.pid == os.getpid():
                _pool.shutdown()
            _pool = None  # a pool inherited through fork belongs to the parent
        if _pool is None:
            _pool = _Pool(size)
        try:
            return _pool.run(blob, completions, references, timeout_s, bar)
        except BaseException:
            # Workers may be mid-chunk: stop them all rather than let stale results leak into
            # the next call; the next call starts a fresh pool.
            _pool.shutdown(kill=True)
            _pool = None
            raise
