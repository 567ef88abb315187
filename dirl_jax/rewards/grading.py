"""Grading a response against a gold answer as the original DiRL does: math-verify OR a LaTeX
equality fallback, under one hard per-call timeout (DIRL_SPEC §3.1, §8.17, §10 point 5).

A response is correct when the last ``\\boxed{}`` of its text, ``p``, and the gold answer ``g``
satisfy ``math_verify.verify(parse(g), parse(\\boxed{p}))`` OR the original's fallback
(:func:`dirl_jax.rewards.latex_equal.latex_equal`: sympy ``parse_latex`` equality, then
Minerva-normalised strings). A gold answer without "boxed" is wrapped in ``\\boxed{}`` first, as
in the original's ``equation``.

Versions: math-verify 0.9.0 with latex2sympy2_extended 1.11.0 and sympy 1.14.0
(constraints.txt); the verdict tables in tests/test_grading_original.py were produced by the
original code with math-verify 0.8.0, latex2sympy2_extended 1.10.2 and sympy 1.14.0 (the versions
in the original's pyproject.toml; its orm.py message asks for 0.5.2). sympy's ``parse_latex``
needs antlr4-python3-runtime 4.11.x, which is pinned. One version effect seen in the tables:
math-verify 0.9.0 no longer equates ``50\\%`` with ``0.5``, which 0.8.0 did.

Deliberate differences from the original:

* the gold answer goes in math-verify's gold slot; the original passes the model's answer as
  gold (§8.17). math-verify is not symmetric, so a few verdicts differ;
* a prediction identical to the gold answer (after stripping) is correct without any parsing,
  and two plain integers of at most 15 digits are compared by value in the calling process
  (both checks compare them exactly; tested against the full check);
* every call runs in a worker process with one hard timeout covering math-verify *and* the
  fallback (math-verify's own ``timeout_seconds`` gets the same budget); past it, or if the
  worker dies, the answer counts as wrong and the worker is replaced. :func:`grade_all` grades a
  batch on several workers at once, each call under its own timeout. The original gives
  ``verify`` a 30 s signal-based timeout and the fallback none: on ``9^{9^{9^{9}}}`` it gave no
  verdict within 60 s;
* an unusable sympy LaTeX parser (wrong ANTLR version) raises ImportError instead of silently
  disabling the fallback;
* ``latex_fallback=False`` turns the fallback off. That is what the original's *locked*
  environment does in effect: its uv.lock pairs sympy 1.14.0 with antlr4-python3-runtime 4.9.3
  (required by omegaconf 2.3.0), so ``parse_latex`` raises ImportError and the fallback never
  says "equal".

The original's ``MathAccuracy`` also extracts the last box before calling ``equation``, as we do;
its truncation rule lives in the reward functions, not here.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import math
import multiprocessing
import queue
import re
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from dirl_jax.rewards.extract import extract_last_boxed

DEFAULT_TIMEOUT_S = 10.0
PLAIN_INTEGER = re.compile(r"-?\d{1,15}")
STARTUP_TIMEOUT_S = 300.0  # starting a worker and loading the graders (not charged to a call)
# imported once by the fork server that grading workers are forked from
WORKER_PRELOAD = ("dirl_jax.rewards.grading", "dirl_jax.rewards.latex_equal", "math_verify",
                  "sympy.parsing.latex._parse_latex_antlr", "sympy.parsing.latex._antlr.latexparser",
                  "sympy.parsing.latex._antlr.latexlexer")


def boxed_gold(gold: str) -> str:
    """The gold answer as the original hands it to math-verify: wrapped in ``\\boxed{}`` unless
    it already contains "boxed"."""
    return gold if "boxed" in gold else f"\\boxed{{{gold}}}"


def verify_answer(gold: str, predicted: str, timeout_seconds: int = 5) -> bool:
    """math-verify equality of two LaTeX answers, gold first (runs in a worker process)."""
    from math_verify import parse, verify

    gold_parsed = parse(boxed_gold(gold))
    predicted_parsed = parse(f"\\boxed{{{predicted}}}")
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout_seconds))


def answers_match(gold: str, predicted: str, latex_fallback: bool = True,
                  timeout_seconds: int = 30) -> bool:
    """math-verify OR (with ``latex_fallback``) the original's LaTeX equality, in a worker
    process. An exception from math-verify means "wrong" without trying the fallback, as in the
    original."""
    from dirl_jax.rewards.latex_equal import latex_equal

    try:
        if verify_answer(gold, predicted, timeout_seconds):
            return True
    except Exception:  # noqa: BLE001
        return False
    return latex_fallback and latex_equal(f"\\boxed{{{predicted}}}", boxed_gold(gold))


def _warm_up_worker() -> None:
    """Imports math-verify and sympy's LaTeX parser and runs both once, so that a call's timeout
    only covers the call."""
    answers_match("1", "1")
    answers_match("2", "\\text{2 ways}")


def _start_pool() -> concurrent.futures.ProcessPoolExecutor:
    """A one-worker pool whose worker has loaded the graders. Workers are forked from a
    single-threaded fork server that has imported them once, so replacing a killed worker takes
    milliseconds instead of seconds of imports (jax, math-verify, the ANTLR parsers), and the
    trainer's own threads are never forked."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))  # used when the server first starts
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context)
    pool.submit(_warm_up_worker).result(timeout=STARTUP_TIMEOUT_S)
    return pool


class _Lane:
    """One grading worker process that runs one call at a time, each under its own timeout; a
    call past it (or one that kills the worker) loses the worker, and the next call starts a
    fresh one."""

    def __init__(self) -> None:
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> tuple[bool, Any]:
        if self.pool is None:
            self.pool = _start_pool()
        future = self.pool.submit(fn, *args)
        try:
            return True, future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            logging.warning("grading call %s%.200r exceeded %.1f s; counted as wrong", fn.__name__, args,
                            timeout)
        except BrokenProcessPool:
            logging.warning("grading call %s%.200r killed its worker; counted as wrong", fn.__name__, args)
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None
        return False, None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


_lanes: list[_Lane] = []  # _lanes[0] serves run_with_timeout; grade_all uses as many as it needs


def _lane_pool(count: int) -> list[_Lane]:
    while len(_lanes) < count:
        _lanes.append(_Lane())
    return _lanes[:count]


@atexit.register
def _shutdown_lanes() -> None:
    """Stops the workers before the interpreter tears down the modules they need."""
    for lane in _lanes:
        lane.close()


def run_with_timeout(fn: Callable[..., Any], *args: Any, timeout: float) -> tuple[bool, Any]:
    """``(finished, result)`` of ``fn(*args)`` in a grading worker. A timeout, or a worker that
    dies (e.g. a C stack overflow), gives ``(False, None)`` and a fresh worker next time."""
    return _lane_pool(1)[0].run(fn, *args, timeout=timeout)


def grade(response_text: str, gold_answer: str, *, timeout: float = DEFAULT_TIMEOUT_S,
          latex_fallback: bool = True) -> bool:
    """Whether the last ``\\boxed{}`` of ``response_text`` equals ``gold_answer``: math-verify OR
    (with ``latex_fallback``) the original's LaTeX equality, ``False`` past ``timeout`` seconds."""
    verdict, predicted = _quick_verdict(response_text, gold_answer)
    if verdict is not None:
        return verdict
    finished, result = run_with_timeout(answers_match, gold_answer, predicted, latex_fallback,
                                        max(1, math.ceil(timeout)), timeout=timeout)
    return finished and bool(result)


def _quick_verdict(response_text: str, gold_answer: str) -> tuple[bool | None, str | None]:
    """``(verdict, None)`` when no worker is needed, else ``(None, the predicted answer)``."""
    predicted = extract_last_boxed(response_text)
    if predicted is None:
        return False, None
    if predicted.strip() == gold_answer.strip():
        return True, None
    if PLAIN_INTEGER.fullmatch(predicted.strip()) and PLAIN_INTEGER.fullmatch(gold_answer.strip()):
        # both checks compare such integers by value (exactly, below 16 digits): no worker needed
        return int(predicted) == int(gold_answer), None
    return None, predicted


def grade_all(pairs: Sequence[tuple[str, str]], *, timeout: float = DEFAULT_TIMEOUT_S,
              latex_fallback: bool = True, workers: int = 4) -> list[bool]:
    """:func:`grade` of every ``(response_text, gold_answer)`` pair, on up to ``workers`` worker
    processes at once, each call under its own ``timeout`` (so pathological answers cost about
    ``timeout`` per ``workers`` of them, not each)."""
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    verdicts: list[bool | None] = []
    work = []
    for i, (text, gold) in enumerate(pairs):
        verdict, predicted = _quick_verdict(text, gold)
        verdicts.append(verdict)
        if verdict is None:
            work.append((i, gold, predicted))
    if not work:
        return [bool(v) for v in verdicts]
    free: queue.Queue[_Lane] = queue.Queue()
    for lane in _lane_pool(min(workers, len(work))):
        free.put(lane)

    def one(gold: str, predicted: str) -> bool:
        lane = free.get()
        try:
            finished, result = lane.run(answers_match, gold, predicted, latex_fallback,
                                        max(1, math.ceil(timeout)), timeout=timeout)
        finally:
            free.put(lane)
        return finished and bool(result)

    with concurrent.futures.ThreadPoolExecutor(max_workers=free.qsize()) as threads:
        for (i, _, _), verdict in zip(work, threads.map(lambda w: one(w[1], w[2]), work)):
            verdicts[i] = verdict
    return [bool(v) for v in verdicts]
