"""Grading a response against a gold answer with math-verify, under a hard per-call timeout.

math-verify (sympy) can take unbounded time on pathological expressions, and its own timeouts
rely on signals that only work in a main thread. Every grading call therefore runs in a worker
process; a call that overruns the timeout is answered ``False`` and the pool is replaced, so one
bad expression cannot hang training. Unlike the original (DIRL_SPEC §8.17) the gold answer goes in
math-verify's gold slot.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import multiprocessing
from typing import Any, Callable

from dirl_jax.rewards.extract import extract_last_boxed

DEFAULT_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 300.0  # starting a worker and importing math-verify (not charged to a call)
_pool: concurrent.futures.ProcessPoolExecutor | None = None


def verify_answer(gold: str, predicted: str) -> bool:
    """math-verify equality of two LaTeX answers (runs in a worker process)."""
    from math_verify import parse, verify

    gold_parsed = parse(gold if "boxed" in gold else f"\\boxed{{{gold}}}")
    predicted_parsed = parse(f"\\boxed{{{predicted}}}")
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed))


def _import_math_verify() -> None:
    import math_verify  # noqa: F401


def _start_pool() -> concurrent.futures.ProcessPoolExecutor:
    """A one-worker pool whose worker has imported math-verify, so that a call's timeout only
    covers the call."""
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                  mp_context=multiprocessing.get_context("spawn"))
    pool.submit(_import_math_verify).result(timeout=STARTUP_TIMEOUT_S)
    return pool


@atexit.register
def _shutdown_pool() -> None:
    """Stops the worker before the interpreter tears down the modules it needs."""
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)


def run_with_timeout(fn: Callable[..., Any], *args: Any, timeout: float) -> tuple[bool, Any]:
    """``(finished, result)`` of ``fn(*args)`` in the worker pool; a timeout kills the pool."""
    global _pool
    if _pool is None:
        _pool = _start_pool()
    future = _pool.submit(fn, *args)
    try:
        return True, future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        logging.warning("grading call %s%r exceeded %.1f s; counted as wrong", fn.__name__, args, timeout)
        for process in list(getattr(_pool, "_processes", {}).values()):
            process.kill()
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
        return False, None


def grade(response_text: str, gold_answer: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the last ``\\boxed{}`` of ``response_text`` equals ``gold_answer`` (math-verify)."""
    predicted = extract_last_boxed(response_text)
    if predicted is None:
        return False
    if predicted.strip() == gold_answer.strip():
        return True
    finished, result = run_with_timeout(verify_answer, gold_answer, predicted, timeout=timeout)
    return finished and bool(result)
