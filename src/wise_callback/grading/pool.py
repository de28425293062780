"""`grade_many`: grading in a persistent pool of worker processes, with a hard per-item timeout,
a separate limit for loading the grader, and the policy for timed-out items (`check_timeouts`).

The worker side is worker.py; this is the parent's side: start, feed, time and replace workers.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from tqdm.auto import tqdm

from wise_callback.grading.matchers import INLINE_GRADERS, Grader, Verdict

LOAD_TIMEOUT_S = 120.0
"""Default limit for a worker to start, and to load a grader (import its module or script)."""

MAX_TIMED_OUT_SHARE = 0.25
"""`check_timeouts` fails an evaluation where more than this share of its items timed out."""


class GradingError(RuntimeError):
    """Grading could not be done: a grader raised (or returned something that is not a
    Verdict) on an item, could not be loaded in a worker, or too many items timed out."""


@dataclass(frozen=True)
class GradeResult:
    """Verdicts in input order, and how many items did not finish: timed out, or their worker
    died (each such item is a Verdict(None, False)), and which (`timed_out_items`, indices).
    Unpacks as `verdicts, timed_out`."""

    verdicts: list[Verdict]
    timed_out: int
    timed_out_items: tuple[int, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.verdicts, self.timed_out))


def check_timeouts(
    timed_out: int, total: int, *, max_share: float = MAX_TIMED_OUT_SHARE
) -> str | None:
    """The policy for items whose grading timed out (each is counted as wrong, so they lower
    the metrics without saying so): None when there are none; a warning message to log when
    some did; GradingError when more than `max_share` of the `total` items did, since the
    metrics would then measure the grader's speed on this machine rather than the model."""
    for name, value in (("timed_out", timed_out), ("total", total)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if timed_out > total:
        raise ValueError(f"timed_out={timed_out} is more than total={total}")
    if not (isinstance(max_share, (int, float)) and 0 <= max_share <= 1):
        raise ValueError(f"max_share must be a number in [0, 1], got {max_share!r}")
    if timed_out == 0:
        return None
    message = (
        f"{timed_out} of {total} completions ({timed_out / total:.1%}) timed out in grading "
        "and count as wrong; a slow grader or a loaded machine lowers the metrics: raise the "
        "grading timeout (grade_timeout_s) or give grading more cores"
    )
    if timed_out > max_share * total:
        raise GradingError(f"{message} (more than the {max_share:.0%} allowed)")
    return message


def _describe(grader: Any) -> str:
    """module.name of a grader (through functools.partial), for error messages."""
    inner = grader
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    module = getattr(inner, "__module__", None)
    return f"{module}.{name}" if module else name


def _main_reference() -> tuple[str, str] | None:
    """How a worker can load this process's __main__ (where a grader may be defined)."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name:
        return ("name", spec_name)
    path = getattr(main, "__file__", None)
    return ("path", os.path.abspath(path)) if path else None


def _worker_env() -> dict[str, str]:
    """This environment, with the folder that holds this package first on PYTHONPATH, so a
    worker imports this very wise_callback even when it is not installed."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


_WORKER_COMMAND = (
    "import sys; from wise_callback.grading.worker import _worker_main; "
    "_worker_main(int(sys.argv[1]))"
)


class _Worker:
    """One worker process, its socket, the grader it holds and the chunk it is working on.

    A worker is a fresh interpreter started with subprocess (fork + immediate exec: safe in a
    process that already runs torch, gloo or vLLM threads, unlike a plain fork) that imports only
    this package and math-verify, not the parent's __main__ (loaded only for a grader that lives
    there). Its phases: starting (not `ready`), `loading` a grader, grading `items`; `started`
    is when the current phase (or the current item) began."""

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
        self.loading = False
        self.started = time.monotonic()
        self.grader_blob: bytes | None = None
        self.items: deque[int] = deque()

    def send(self, blob: bytes, items: list[tuple[int, str, str]]) -> None:
        setup = None if blob == self.grader_blob else (blob, list(sys.path), _main_reference())
        self.conn.send((setup, items))
        self.grader_blob = blob
        self.loading = setup is not None
        self.items = deque(index for index, _, _ in items)
        self.started = time.monotonic()

    def deadline(self, timeout_s: float, load_timeout_s: float) -> float | None:
        """When the current phase runs out of time (None: idle)."""
        if not self.ready or self.loading:
            return self.started + load_timeout_s
        return self.started + timeout_s if self.items else None

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
        grader: Any,
        blob: bytes,
        completions: Sequence[str],
        references: Sequence[str],
        limits: tuple[float, float],
        bar: tqdm,
    ) -> GradeResult:
        """Grade every item; `limits` = (timeout_s per item, load_timeout_s)."""
        timeout_s, load_timeout_s = limits
        verdicts: list[Verdict | None] = [None] * len(completions)
        chunk = max(1, min(64, math.ceil(len(completions) / (4 * len(self.workers)))))
        todo = deque(
            list(range(i, min(i + chunk, len(completions))))
            for i in range(0, len(completions), chunk)
        )
        timed_out: list[int] = []

        def give_up_on(worker: _Worker) -> None:
            """The worker's current item (if any: an idle worker can die too) did not finish:
            mark it, requeue the rest of its chunk, replace the worker."""
            if worker.items:
                item = worker.items.popleft()
                verdicts[item] = Verdict(None, False)
                timed_out.append(item)
                bar.update(1)
            if worker.items:
                todo.appendleft(list(worker.items))
            worker.kill()
            self._replace(worker)

        def fail(worker: _Worker, what: str, detail: str = "") -> GradingError:
            """The error for a worker that could not start, or could not load the grader."""
            if not worker.ready:
                message = f"a grading worker {what} while starting"
            else:
                message = (
                    f"loading the grader {_describe(grader)} in a grading worker {what} (the "
                    "worker imports the grader's module, or the script that defines it)"
                )
            return GradingError(f"{message}:\n{detail}" if detail else message)

        while todo or any(w.items for w in self.workers):
            for worker in self.workers:
                if worker.ready and not worker.items and todo:
                    indices = todo.popleft()
                    worker.send(blob, [(i, completions[i], references[i]) for i in indices])
            now = time.monotonic()
            deadlines = [w.deadline(timeout_s, load_timeout_s) for w in self.workers]
            soonest = min((d for d in deadlines if d is not None), default=now)
            by_conn: dict[Any, _Worker] = {w.conn: w for w in self.workers}
            for conn in wait(list(by_conn), timeout=max(0.0, soonest - now)):
                worker = by_conn[conn]
                try:
                    message: Any = worker.conn.recv()
                except (EOFError, OSError):
                    if not worker.ready or worker.loading:
                        code = worker.process.wait()
                        what = f"failed: the worker died (exit code {code}; see its stderr)"
                        raise fail(worker, what) from None
                    give_up_on(worker)
                    continue
                if message[0] == "ready":
                    worker.ready = True
                    continue
                if message[0] == "loaded":
                    if message[1] is not None:
                        raise fail(worker, "failed", detail=message[1])
                    worker.loading = False
                    worker.started = time.monotonic()  # the first item's clock starts now
                    continue
                _, index, answer, correct, error = message
                if error is not None:
                    raise GradingError(
                        f"grader {_describe(grader)} raised on item {index}:\n{error}"
                    )
                verdicts[index] = Verdict(answer, correct)
                worker.items.popleft()
                worker.started = time.monotonic()
                bar.update(1)
            now = time.monotonic()
            for worker in list(self.workers):
                deadline = worker.deadline(timeout_s, load_timeout_s)
                if deadline is None or now <= deadline:
                    continue
                if not worker.ready or worker.loading:
                    raise fail(
                        worker,
                        f"took longer than load_timeout_s={load_timeout_s:g} s; raise "
                        "load_timeout_s if it is only slow to import (a busy machine)",
                    )
                give_up_on(worker)
        assert all(v is not None for v in verdicts)
        return GradeResult(verdicts, len(timed_out), tuple(sorted(timed_out)))  # type: ignore[arg-type]


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
    return any(grader is cheap for cheap in INLINE_GRADERS)


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def grade_many(
    grader: Grader,
    completions: Sequence[str],
    references: Sequence[str],
    *,
    timeout_s: float = 10.0,
    workers: int | None = None,
    progress: bool = False,
    load_timeout_s: float = LOAD_TIMEOUT_S,
) -> GradeResult:
    """Grade completions[i] against references[i] with `grader`; verdicts come back in order.

    `workers=None` (default): exact_match, numeric_match and gsm8k_match (or a
    functools.partial of them) run in this process, since they are bounded on any input; any
    other grader runs in a pool of `default_workers()` processes. `workers=0`: always in this
    process (no timeout); `workers=N`: always in a pool of N processes.

    In the pool, each item has a hard timeout of `timeout_s` seconds from the moment its worker
    starts it, with the grader loaded; an item over it is a Verdict(None, False), counted in
    `timed_out` (see `check_timeouts` for what to do with that count), and its worker is killed
    and replaced (so is a worker that dies). Loading the grader in a worker (importing its
    module, or the caller's script for a grader defined there) is limited apart, by
    `load_timeout_s`, as is a worker's start: past it, or when the load raises, GradingError
    names the grader (with the worker's traceback). The pool is started on first use (fresh
    interpreters via subprocess, never a bare fork of this possibly multi-threaded process; each
    imports only this package and math-verify, ~1-2 s, paid once), kept for later calls, resized
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
    _check_seconds("timeout_s", timeout_s)
    _check_seconds("load_timeout_s", load_timeout_s)
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
        size = workers or default_workers()
        return _run_in_pool(
            grader, blob, completions, references, (timeout_s, load_timeout_s), size, bar
        )


def _grade_inline(
    grader: Grader, completions: list[str], references: list[str], bar: tqdm
) -> list[Verdict]:
    verdicts = []
    for index, (completion, reference) in enumerate(zip(completions, references, strict=True)):
        try:
            verdict = grader(completion, reference)
        except Exception as error:
            raise GradingError(
                f"grader {_describe(grader)} raised on item {index}: {error!r}"
            ) from error
        if not isinstance(verdict, Verdict):
            raise GradingError(
                f"grader returned {type(verdict).__name__} on item {index}, not a Verdict"
            )
        verdicts.append(verdict)
        bar.update(1)
    return verdicts


def _run_in_pool(
    grader: Grader,
    blob: bytes,
    completions: list[str],
    references: list[str],
    limits: tuple[float, float],
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
            return _pool.run(grader, blob, completions, references, limits, bar)
        except BaseException:
            # Workers may be mid-chunk: stop them all rather than let stale results leak into
            # the next call; the next call starts a fresh pool.
            _pool.shutdown(kill=True)
            _pool = None
            raise
