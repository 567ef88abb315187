"""Tricky answer pairs through the reward's grader and the benchmark grader.

Left out on purpose (ambiguous, or math-verify's own call rather than our wrapper's):
``1\\,234`` vs 1234 (thin space read as a product), percentages (``50\\%`` vs 50, ``0.1`` vs
``10\\%``), ``0.3333333`` vs 1/3 (equal only within math-verify's tolerance), ``0.\\overline{3}``
vs 1/3, ``x \\ge 2`` vs ``[2, \\infty)``, the mixed number ``1\\frac{1}{2}``, degrees vs radians,
``\\text{5 cm}`` vs 5, and the multiset ``1, 2, 2`` vs ``1,2``.
"""

from __future__ import annotations

import pytest

from dirl_jax.evaluation import BENCHMARKS, grade_answer
from dirl_jax.evaluation.benchmarks import grade_answers
from dirl_jax.evaluation.benchmarks import last_number
from dirl_jax.rewards import extract_last_boxed, grade

PMATRIX = r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"

MATCH = [
    # fractions and decimals
    (r"so \boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{\dfrac{1}{2}}", "1/2"),
    (r"\boxed{\tfrac12}", "0.5"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}"),
    (r"\boxed{\frac{-1}{2}}", r"-\frac{1}{2}"),
    (r"\boxed{1.5}", r"\frac{3}{2}"),
    (r"\boxed{27.0}", "27"),
    (r"$\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    # degrees, units, text around numbers
    (r"\boxed{30^\circ}", "30"),
    (r"\boxed{30}", r"30^\circ"),
    (r"\boxed{5 \text{ cm}}", "5"),
    (r"\boxed{5\text{ cm}^2}", "5"),
    (r"\boxed{18 \text{ dollars}}", "18"),
    (r"\boxed{\$1,234.00}", "1234"),
    (r"\boxed{1,234}", "1234"),
    # intervals, sets, tuples
    (r"\boxed{[1, 2)}", "[1,2)"),
    (r"\boxed{\left[1, 2\right)}", "[1,2)"),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]"),
    (r"\boxed{\{1,2\}}", "2,1"),
    (r"\boxed{2, 1}", "1,2"),
    (r"\boxed{1,2}", r"\{1,2\}"),
    (r"\boxed{\{1, 2, 3\}}", r"\{3, 2, 1\}"),
    (r"\boxed{84, 69}", "69,84"),
    (r"\boxed{\pm 2}", "2,-2"),
    (r"\boxed{x=2 \text{ or } x=3}", "2, 3"),
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
    # matrices
    (rf"\boxed{{{PMATRIX}}}", PMATRIX),
    (r"\boxed{\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}}", PMATRIX),
    (r"\boxed{\begin{pmatrix} 0.5 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} \frac{1}{2} \\ 2 \end{pmatrix}"),
    # radicals, expressions, equations, nested braces
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
    (r"\boxed{2^{10}}", "1024"),
    (r"\boxed{x^2-1}", "(x-1)(x+1)"),
    (r"\boxed{x=2}", "2"),
    (r"\boxed{2}", "x=2"),
    (r"\boxed{y = 2x + 3}", "2x+3"),
    (r"\boxed{f(x) = 2x}", "f(x)=2 x"),
    # text answers and choices
    (r"\boxed{Evelyn}", r"\text{Evelyn}"),
    (r"\boxed{C}", r"\text{(C)}"),
    # extraction: the last box counts, the backslash is optional
    (r"First \boxed{4}, on reflection \boxed{5}.", "5"),
    ("boxed{7}", "7"),
]

NO_MATCH = [
    (r"\boxed{41}", "42"),
    (r"\boxed{2}", "1/2"),
    (r"\boxed{0.33}", r"\frac{1}{3}"),
    (r"\boxed{4.67}", r"\frac{14}{3}"),
    (r"\boxed{\sqrt{2}}", "1.414"),
    (r"\boxed{\pi}", "3.14"),
    (r"\boxed{-3}", "3"),
    (r"\boxed{2}", "-2"),
    (r"\boxed{-\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{2-\sqrt{3}}", r"\sqrt{3}-2"),
    (r"\boxed{q-p}", "p - q"),
    (r"\boxed{-\infty}", r"\infty"),
    (r"\boxed{x=2}", "3"),
    (r"\boxed{x=5}", "x=-5"),
    (r"\boxed{x^2+1}", "(x-1)(x+1)"),
    (r"\boxed{(1,2)}", "[1,2]"),
    (r"\boxed{[1,2]}", "(1,2)"),
    (r"\boxed{[1,2)}", "(1,2]"),
    (r"\boxed{(2,1)}", "(1,2)"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}"),
    (r"\boxed{\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}}", PMATRIX),
    (r"\boxed{\text{even}}", r"\text{odd}"),
    (r"\boxed{A}", r"\text{(B)}"),
    (r"First \boxed{4}, on reflection \boxed{5}.", "4"),
    ("The answer is 5.", "5"),
    (r"\boxed{5", "5"),
]

CASES = [(r, g, True) for r, g in MATCH] + [(r, g, False) for r, g in NO_MATCH]


@pytest.mark.parametrize("response,gold,correct", CASES)
def test_math_grading(response, gold, correct):
    assert grade(response, gold) is correct
    assert grade_answer("math500", response, gold) == (extract_last_boxed(response), correct)


def test_the_originals_fallback_reads_a_list_by_its_first_item():
    """A known false positive the original has too (its sympy fallback parses "1, 3" as 1):
    graded as the original with the fallback, as math-verify alone without it."""
    assert grade(r"\boxed{1, 3}", "1,2") is True
    assert grade(r"\boxed{1, 3}", "1,2", latex_fallback=False) is False


@pytest.mark.parametrize("response,gold,extracted,correct", [
    ("The answer is 1,234.", "1234", "1234", True),
    ("Janet makes 9 * 2 = $18 every day.", "18", "18", True),
    ("The temperature drops to -5 degrees.", "-5", "-5", True),
    ("A loss of -$5.", "-5", "-5", True),
    ("That is 18.00 dollars.", "18", "18.00", True),
    ("It costs $1,234.50 in total", "1234.5", "1234.50", True),
    ("5,000,000 people", "5000000", "5000000", True),
    ("So 12 - 5 = 7", "7", "7", True),
    ("The answer is 1234", "1,234", "1234", True),
    ("First 10 apples, then 20 apples.", "10", "20", False),
    ("The answer is 7.", "8", "7", False),
    ("I am not sure.", "5", None, False),
    (r"\boxed{18} although I first wrote 20", "18", "18", True),  # a box beats the last number
    (r"\boxed{20}, not 18", "18", "20", False),
    (r"\boxed{1,234}", "1234", "1,234", True),
])
def test_gsm8k_grading(response, gold, extracted, correct):
    assert grade_answer("gsm8k", response, gold) == (extracted, correct)


@pytest.mark.parametrize("text,number", [
    ("12 - 5", "5"), ("x-5", "5"), ("(3)-5", "5"), ("[-3]", "-3"), ("1, 2, 3", "3"), ("3.5.", "3.5"),
])
def test_last_number_signs_and_separators(text, number):
    assert last_number(text) == number


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_only_gsm8k_accepts_an_unboxed_number(name):
    assert grade_answer(name, "The answer is 5.", "5") == (("5", True) if name == "gsm8k" else (None, False))


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'; available: math500, gsm8k"):
        grade_answer("gsm9k", r"\boxed{1}", "1")


@pytest.mark.parametrize("predicted,gold", [
    ("050", "50"), ("7", "007"), ("-3", "3"), ("12", "13"), ("0", "-0"), ("100", "1000"),
    ("123456789012345", "123456789012345"), ("123456789012345", "123456789012346"),
])
def test_the_plain_integer_shortcut_gives_the_full_checks_verdict(predicted, gold):
    """``grade`` compares plain integers itself; math-verify OR the fallback (run here in this
    process) must say the same."""
    from dirl_jax.rewards.grading import answers_match
    assert grade(f"\\boxed{{{predicted}}}", gold) is answers_match(gold, predicted)


def test_grade_answers_on_a_pool_equals_one_by_one():
    """The batched grader (the evaluation's) gives every item the verdict of grade_answer."""
    items = ([("math500", r, g) for r, g, _ in CASES[:12]]
             + [("gsm8k", "The answer is 1,234.", "1234"), ("gsm8k", "I am not sure.", "5"),
                ("aime24", r"\boxed{033}", "33"), ("math500", "no box at all", "3")])
    assert grade_answers(items, workers=3) == [grade_answer(*item) for item in items]


def test_evaluation_grades_each_batch_on_grade_workers(monkeypatch):
    from dirl_jax.evaluation import benchmarks
    from dirl_jax.evaluation.benchmarks import Question
    from dirl_jax.evaluation.runner import graded_records
    from dirl_jax.config import eval_defaults
    calls = []
    real = benchmarks.grade_all
    monkeypatch.setattr(benchmarks, "grade_all",
                        lambda pairs, **kw: calls.append((len(pairs), kw)) or real(pairs, **kw))

    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))
    config = eval_defaults()
    config.update(grade_workers=3, grade_timeout=2.5, latex_fallback=False)
    chunk = [(Question("math500", str(i), "q", "2"), 0) for i in range(4)]
    responses = [r"\boxed{2}", r"\boxed{3}", r"\boxed{\frac{4}{2}}", "2"]
    results = [{"token_ids": [ord(c) for c in text] + [0, 0], "length": len(text),
                "tokens_per_step": 1.0, "num_steps": 1, "finish_reason": "stop"} for text in responses]
    records = graded_records(chunk, results, Chars(), config)
    assert [r["correct"] for r in records] == [True, False, True, False]
    assert [r["extracted"] for r in records] == ["2", "3", r"\frac{4}{2}", None]
    assert calls == [(4, {"timeout": 2.5, "latex_fallback": False, "workers": 3})]
