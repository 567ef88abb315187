"""Answer extraction, math-verify grading under a timeout, and the reward registry."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from dirl_jax.rewards import REWARDS, Response, extract_last_boxed, grade, grade_all, weighted_rewards
from dirl_jax.rewards.grading import run_with_timeout


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{a}{b}}", r"\frac{a}{b}"),
    ("boxed{7} without a backslash", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{unbalanced", None),
    ("no answer", None),
])
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize("response,gold,correct", [
    (r"The answer is \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{\sqrt{4}}", "2", True),
    (r"\boxed{3}", "4", False),
    (r"\boxed{}", "4", False),
    ("4 without a box", "4", False),
])
def test_grade_with_math_verify(response, gold, correct):
    assert grade(response, gold) is correct


def test_a_call_past_the_timeout_counts_as_wrong_and_the_pool_recovers():
    start = time.perf_counter()
    assert run_with_timeout(time.sleep, 30, timeout=0.5) == (False, None)
    assert time.perf_counter() - start < 10
    assert grade(r"\boxed{\frac{6}{3}}", "2")  # a fresh worker after the killed one


GRADE_CASES = [(r"The answer is \boxed{\frac{1}{2}}", "0.5", True), (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
               (r"\boxed{3}", "4", False), ("4 without a box", "4", False), (r"\boxed{ 7 }", "7", True),
               (r"\boxed{\sqrt{4}}", "2", True), (r"\boxed{\frac{6}{3}}", "3", False)]


@pytest.mark.parametrize("workers", [1, 3])
def test_grade_all_equals_grade_one_by_one(workers):
    pairs = [(text, gold) for text, gold, _ in GRADE_CASES]
    assert grade_all(pairs, workers=workers) == [grade(t, g) for t, g in pairs] == [c for *_, c in GRADE_CASES]
    with pytest.raises(ValueError, match="workers: must be >= 1, got 0"):
        grade_all(pairs, workers=0)


def test_grade_all_times_out_each_call_on_its_own_worker(monkeypatch, caplog):
    """Three calls that never finish, three workers, a 2 s timeout: about 2 s in all (one worker
    would take 6 s), each counted wrong (logged with its arguments cut: one is a 1 MB answer), and
    the workers recover for the next batch."""
    from dirl_jax.rewards import grading
    grade_all([(r"\boxed{\frac{1}{2}}", "0.5")] * 3, workers=3)  # start and warm up the workers
    monkeypatch.setattr(grading, "answers_match", slow_match)
    start = time.perf_counter()
    pairs = [(r"\boxed{" + "x" * 1_000_000 + "}", "y")] + [(r"\boxed{x}", "y")] * 2
    assert grade_all(pairs, timeout=2.0, workers=3) == [False] * 3
    assert time.perf_counter() - start < 5.0
    timeouts = [r.getMessage() for r in caplog.records if "exceeded 2.0 s" in r.getMessage()]
    assert len(timeouts) == 3 and max(map(len, timeouts)) < 400
    monkeypatch.undo()
    assert grade_all([(r"\boxed{\frac{6}{3}}", "2")] * 3, workers=3) == [True] * 3


def slow_match(*args):
    time.sleep(60)


def response(text="", correct=True, num_tokens=10, max_tokens=100, truncated=False,
             tokens_per_step=1.0, block_size=4) -> Response:
    return Response(text=text, correct=correct, num_tokens=num_tokens, max_tokens=max_tokens,
                    truncated=truncated, tokens_per_step=tokens_per_step, block_size=block_size)


def cosfn(x, horizon, a, b):
    """DIRL_SPEC §3.2's ``cosfn``: b at x = 0, a at x = horizon."""
    return b - (b - a) * (1 - math.cos(math.pi * x / horizon)) / 2


def test_reward_values():
    assert REWARDS["accuracy"](response()) == 1.0
    assert REWARDS["accuracy"](response(truncated=True)) == 0.0  # the engine's finish reason
    assert REWARDS["binary"](response(correct=False)) == -1.0
    assert REWARDS["cosine"](response(num_tokens=0)) == pytest.approx(1.0)
    assert REWARDS["cosine"](response(num_tokens=50)) == pytest.approx(0.75)
    assert REWARDS["cosine"](response(correct=False, num_tokens=0)) == pytest.approx(-0.5)
    assert REWARDS["cosine"](response(correct=False, num_tokens=50)) == pytest.approx(-0.25)
    assert REWARDS["cosine"](response(num_tokens=100)) == -0.5
    assert REWARDS["boxed"](response(text=r"\boxed{1}")) == 0.1
    assert REWARDS["repetition"](response(text="a b c a b c")) == pytest.approx(-(1 - 3 / 4))
    assert REWARDS["length"](response(num_tokens=25)) == 0.25
    assert REWARDS["format"](response(text="<think>x</think> y")) == 1.0
    assert REWARDS["format"](response(text="x</think> y")) == 0.0


def test_think_format_is_the_originals():
    """``<think>`` prepended when missing; the block must end a line (MULTILINE ``$``)."""
    think = REWARDS["think_format"]
    assert think(response(text="x</think>\n")) == 1.0
    assert think(response(text="  <think>a</think>\nThe answer is 5<|im_end|>")) == 1.0
    assert think(response(text="<think>x</think> The answer is \\boxed{5}<|im_end|>")) == 0.0
    assert think(response(text="no think block at all")) == 0.0


@pytest.mark.parametrize("num_tokens,want", [(10, 0.0), (50, 0.0), (75, -0.5), (100, -1.0)])
def test_soft_overlong(num_tokens, want):
    assert REWARDS["soft_overlong"](response(num_tokens=num_tokens)) == pytest.approx(want)


@pytest.mark.parametrize("tokens_per_step", [0.5, 1.0, 1.7, 2.5, 4.0, 6.0])
@pytest.mark.parametrize("correct,truncated", [(True, False), (False, False), (True, True)])
def test_speed_rewards_follow_the_spec(tokens_per_step, correct, truncated):
    """§3.2: x = clip(tokens/step - 1, 0, B - 1); correct cosfn(x, B-1, 1.0, 0.5), wrong (or
    truncated) cosfn(x, B-1, -0.5, 0.0); speed_penalty gives correct answers a flat 0.5."""
    r = response(correct=correct, truncated=truncated, tokens_per_step=tokens_per_step, block_size=4)
    x = min(max(tokens_per_step - 1, 0), 3)
    right = correct and not truncated
    want_speed = cosfn(x, 3, 1.0, 0.5) if right else cosfn(x, 3, -0.5, 0.0)
    assert REWARDS["speed"](r) == pytest.approx(want_speed)
    assert REWARDS["speed_penalty"](r) == pytest.approx(0.5 if right else cosfn(x, 3, -0.5, 0.0))


def test_weighted_rewards_and_errors():
    rs = [response(correct=True, num_tokens=50), response(correct=False, num_tokens=0)]
    np.testing.assert_allclose(weighted_rewards(rs, ["accuracy", "cosine"], [2.0, 1.0]),
                               [2.0 + 0.75, -0.5])
    assert weighted_rewards(rs, ["accuracy"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward 'speedy'; available: accuracy, binary"):
        weighted_rewards(rs, ["speedy"])
    with pytest.raises(ValueError, match="1 given for 2 rewards"):
        weighted_rewards(rs, ["accuracy", "boxed"], [1.0])
    assert math.isclose(REWARDS["cosine"](response(num_tokens=25)), 1.0 - 0.5 * (1 - math.cos(math.pi / 4)) / 2)
