"""``grade`` against the original DiRL's verdicts (OpenMOSS/DiRL utils/math_utils.py ``equation``,
DIRL_SPEC §3.1): math-verify OR the sympy / Minerva-normalised LaTeX fallback.

Every expected verdict below was produced by running the original code (``extract_last_boxed``,
then ``equation("\\boxed{" + answer + "}", gold)``, as its ``MathAccuracy`` does) in a throw-away
environment with the versions of the original's pyproject.toml (math-verify 0.8.0,
latex2sympy2_extended 1.10.2, sympy 1.14.0) and antlr4-python3-runtime 4.11.0, the one version
with which sympy's ``parse_latex``, and so the fallback, works. With the original's locked
antlr 4.9.3 the fallback never fires and exactly the FALLBACK_ONLY cases flip to False; with
math-verify 0.5.2 (which orm.py's message names) it cannot fire either (that needs antlr 4.13.2).
"""

from __future__ import annotations

import time

import pytest

from dirl_jax.rewards import extract_last_boxed, grade
from dirl_jax.rewards.grading import run_with_timeout, verify_answer
from dirl_jax.rewards.latex_equal import latex_equal, normalize_final_answer


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


# (response, gold, the original's verdict): math-verify decides, or both checks agree
ORIGINAL = [
    (boxed("42"), "42", True),
    (boxed("41"), "42", False),
    (boxed(r"\frac{1}{2}"), "0.5", True),
    (boxed("x^2+2x+1"), "(x+1)^2", True),
    (boxed(""), "4", False),
    ("4 without a box", "4", False),
    (boxed(r"2\sqrt{3}"), r"\sqrt{12}", True),
    (boxed(r"\pi"), "3.14", False),
    (boxed("0.33"), r"\frac{1}{3}", False),
    (boxed("0.3333333333333333"), r"\frac{1}{3}", True),
    (boxed("1.414"), r"\sqrt{2}", False),
    (boxed("x=2"), "2", True),
    (boxed("x=5"), "x=-5", False),
    (boxed("[1,2)"), "(1,2]", False),
    (boxed("2, 1"), "1,2", True),
    (boxed("(2, 1)"), "(1,2)", False),
    (boxed(r"12 \text{ ways}"), "12", True),
    (boxed(r"20 \mbox{ cm}"), "20", True),
    (boxed("1{,}234"), "1234", True),
    (boxed("100,000"), "100000", True),
    (boxed(r"\$18"), "18", True),
    (boxed(r"\text{(B)}"), "B", True),
    (boxed(r"\text{Tuesday}"), r"\text{Monday}", False),
    (boxed(r"\fracab"), r"\frac{a}{b}", True),
    (boxed(r"\tfrac{1}{3}"), r"\frac13", True),
    (boxed(r"\sin(\pi/6)"), r"\frac{1}{2}", True),
    (boxed(r"\binom{5}{2}"), "10", True),
    (boxed(r"\sqrt{x^2}"), "|x|", True),
    (boxed(r"\sqrt{x^2}"), "x", False),
    (boxed(r"-\infty"), r"\infty", False),
    (boxed("(5"), "5", False),
    (boxed(r"5 \text{ or } 6"), "5", False),
    (boxed(r"\text{(A) } 5"), "5", False),
    (boxed(r"\text{the answer is 5}"), "5", False),
    (boxed("1e3"), "1000", False),
    (boxed(r"30^{\circ}"), r"\frac{\pi}{6}", False),
    (boxed(r"0.\overline{3}"), r"\frac{1}{3}", False),
    (boxed(r"i"), r"\sqrt{-1}", False),
    (boxed("12."), "12", False),
    (boxed("0"), "0.0000001", False),
    (boxed(r"\frac{1}{2}"), boxed("0.5"), True),                    # a boxed gold is not re-wrapped
    (boxed("1"), boxed("1") + " and " + boxed("2"), False),         # the gold's last box counts
    (boxed("2"), "boxed 2", True),
]

# (response, gold): math-verify alone says False, the original's fallback says True
FALLBACK_ONLY = [
    (boxed(r"\text{5 students}"), "5"),
    (boxed(r"\text{12 ways}"), "12"),
    (boxed(r"\mbox{5 students}"), "5"),
    (boxed(r"\text{6 cm}"), "6"),
    (boxed(r"\overline{7}"), "7"),
    (boxed(r"\overline{AB}"), "AB"),
    (boxed(r"1\;234"), "1234"),
    (boxed(r"1\,000\,000"), "1000000"),
    (boxed(r"1\ 234"), "1234"),
    (boxed(r"2\;3"), "23"),
    (boxed("5)"), "5"),
    (boxed("12]"), "12"),
    (boxed("a)"), "a"),
    (boxed("an 8"), "8"),
    (boxed(r"1, 2, \dots"), "1,2"),
    (boxed("12.$"), "12"),
    # false positives of the original: equal evalf() values; sympy's lenient parse_latex reads only
    # the first item of a comma list
    (boxed("10^{10^{10}}"), "10^{10^{10}}+1"),
    (boxed("1, 3"), "1,2"),
    (boxed("1,2"), "1,2,3"),
    (boxed("x=1, y=2"), "x=1, y=5"),
]

# (response, gold, the original's verdict, ours, why they differ)
SWAP = "we pass the gold answer in math-verify's gold slot; the original swaps them (§8.17)"
EXACT = "an answer identical to the gold one is correct without parsing"
VERSION = "math-verify 0.9.0 reads percentages differently from 0.8.0"
DIFFERENCES = [
    (boxed("x > 2"), r"(2, \infty)", True, False, SWAP),
    (boxed(r"(2, \infty)"), "x > 2", False, True, SWAP),
    (boxed(r"x \geq 2"), r"[2, \infty)", True, False, SWAP),
    (boxed("1 < x < 2"), "(1,2)", True, False, SWAP),
    (boxed(r"\pm 2"), "x^2=4", False, True, SWAP),
    (boxed(r"\$"), r"\$", False, True, EXACT),
    (boxed(""), "", False, True, EXACT),
    (boxed(r"50\%"), "0.5", True, False, VERSION),
    (boxed("0.5"), r"50\%", True, False, VERSION),
]

# (response, gold): the original answers nothing within 60 s (or False after many seconds)
ADVERSARIAL = {
    "power-tower": (boxed("9^{9^{9^{9}}}"), "1"),                   # original: no answer in 60 s
    "power-tower-2": (boxed("2^{2^{2^{2^{2^{2}}}}}"), "3"),         # original: no answer in 60 s
    "huge-factorial": (boxed("(10^{100})!"), "2"),                  # original: no answer in 60 s
    "long-sum": (boxed("1+" * 20_000 + "1"), "3"),                  # original: no answer in 60 s
    "1MB-answer": (boxed("x" * 1_000_000), "1"),                    # original: no answer in 60 s
    "nested-braces": (boxed("{" * 2000 + "1" + "}" * 2000), "2"),   # original: False after 12 s
    "nested-fracs": (boxed(r"\frac{" * 300 + "1" + "}{2}" * 300), "2"),  # original: False after 8 s
    "1MB-response": ("a" * 1_000_000 + boxed("1"), "2"),            # original: False after 1 s
}
ADVERSARIAL_TIMEOUT_S = 2.0
RESTART_SLACK_S = 8.0  # replacing a killed worker (forked from the preloaded server) on busy cores


def short_id(value) -> str:
    return value[:30] if isinstance(value, str) else str(value)


@pytest.mark.parametrize("response,gold,expected", ORIGINAL, ids=short_id)
def test_verdicts_of_the_original(response, gold, expected):
    assert grade(response, gold) is expected


@pytest.mark.parametrize("response,gold", FALLBACK_ONLY, ids=short_id)
def test_cases_only_the_fallback_accepts(response, gold):
    predicted = extract_last_boxed(response)
    assert run_with_timeout(verify_answer, gold, predicted, timeout=30) == (True, False)
    assert grade(response, gold, latex_fallback=False) is False
    assert grade(response, gold) is True


@pytest.mark.parametrize("response,gold,original,ours,reason", DIFFERENCES, ids=short_id)
def test_deliberate_differences(response, gold, original, ours, reason):
    assert original is not ours, reason
    assert grade(response, gold) is ours, reason


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_answers_are_wrong_within_the_timeout(name):
    response, gold = ADVERSARIAL[name]
    assert grade(boxed("1"), "1.0")  # a warm worker, so the clock times this call only
    start = time.perf_counter()
    assert grade(response, gold, timeout=ADVERSARIAL_TIMEOUT_S) is False
    assert time.perf_counter() - start < ADVERSARIAL_TIMEOUT_S + RESTART_SLACK_S


@pytest.mark.parametrize("answer,normalized", [
    (r"5 \text{ students}", "5"),
    (r"\text{12 ways}", "12"),
    (r"20 \mbox{ cm}", "20"),
    (r"\overline{AB}", "AB"),
    (r"\textbf{(C)}", "(C)"),
    (r"1{,}000{,}000", "1000000"),
    ("100,000", "100000"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\sqrt3", r"\sqrt{3}"),
    (r"the answer is $x = 3$.", "x=3"),
    (r"30^\circ", "30"),
    (r"1, 2, \dots", "12"),  # spaces and \dots go, then the commas of a pure number
])
def test_minerva_normalization(answer, normalized):
    assert normalize_final_answer(answer) == normalized


def test_fallback_in_process():
    assert latex_equal(boxed(r"\text{12 ways}"), boxed("12"))
    assert latex_equal(boxed("0.5"), boxed(r"\frac{1}{2}"))
    assert not latex_equal(boxed("3"), boxed("4"))
    assert not latex_equal("no box", boxed("4"))
    assert not latex_equal(boxed(r"\text{(A) } 5"), boxed("5"))  # unparseable after normalising


def test_an_unusable_latex_parser_is_an_error_not_a_wrong_answer(monkeypatch):
    """The original's locked environment (ANTLR 4.9.3) silently disabled its fallback this way."""
    from sympy.parsing.latex import _parse_latex_antlr

    monkeypatch.setattr(_parse_latex_antlr, "version", lambda package: "4.9.3")
    with pytest.raises(ImportError, match="version 4.11"):
        latex_equal(boxed(r"\text{12 ways}"), boxed("12"))

