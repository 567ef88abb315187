"""The original DiRL's second equality test, OR-ed with math-verify (DIRL_SPEC §3.1, §8.17).

OpenMOSS/DiRL ``utils/math_utils.py`` (``equation`` -> ``_is_latex_equal``) counts an answer as
correct when math-verify says so *or* when this permissive check holds:

1. take the last ``boxed{...}`` of both strings (None for either -> not equal);
2. parse both with sympy's ``parse_latex`` and compare the expressions, or their ``evalf()`` values;
3. if that raised or found them different: normalise both strings the Minerva way
   (:func:`normalize_final_answer`) and compare again with sympy; when both normalised strings
   parse but differ as expressions, the normalised strings themselves are compared;
4. any exception in 3 -> not equal.

This module restates that behaviour (not the code). It accepts answers math-verify rejects, such
as ``\\text{12 ways}``, ``\\overline{7}``, ``1\\,234`` or a stray ``5)``, and some wrong ones: the
lenient ``parse_latex`` reads only the first item of a comma list (``1, 3`` equals ``1,2``), and
``evalf()`` values agree to 15 digits only (``10^{10^{10}}`` equals ``10^{10^{10}}+1``).

Parser choice: sympy's ``parse_latex`` (ANTLR backend), as the original. It refuses to run unless
``antlr4-python3-runtime`` is 4.11.x, so that version is pinned (constraints.txt); math-verify's
own parser, latex2sympy2_extended, ships generated parsers for 4.9.3, 4.11.0 and 4.13.2 and works
with it. latex2sympy2_extended was not used as the parser here: its grammar and normalisation
differ from sympy's (e.g. it reads ``\\text{...}``, units and ``\\pi`` itself), so it would give
different verdicts than the original.

Note: the original's own lock file (uv.lock: sympy 1.14.0 with antlr4-python3-runtime 4.9.3, which
omegaconf 2.3.0 requires) makes sympy's ``parse_latex`` raise ImportError on every call, so in the
original as locked this fallback never says "equal"; ``grade(..., latex_fallback=False)`` gives
that behaviour. Here such an ImportError is raised instead of read as "not equal", so a broken
environment fails at the first grading call rather than silently grading differently. The
check is pure CPU work with no time limit of its own: call it through
:func:`dirl_jax.rewards.grading.grade`, which runs it in a worker process under a hard timeout.
"""

from __future__ import annotations

import re
from typing import Any

from dirl_jax.rewards.extract import extract_last_boxed

# Minerva's answer normalisation (Lewkowycz et al. 2022, arXiv:2206.14858, appendix D), as the
# original applies it: literal replacements in this order, then literal removals in this order.
MINERVA_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
MINERVA_REMOVALS: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
# Then regex rewrites, in order (no DOTALL: "." stops at a newline, as in the original).
_MINERVA_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r".*?\$(.*?)\$.*", r"$\1$"),             # keep the first $...$ span
        (r"\\text\{(.*?)\}", r"\1"),              # unwrap \text{}, \textbf{}, \overline{}
        (r"\\textbf\{(.*?)\}", r"\1"),
        (r"\\overline\{(.*?)\}", r"\1"),
        (r"\\boxed\{(.*)\}", r"\1"),              # greedy: outermost box
        (r"frac([^{])(.)", r"frac{\1}{\2}"),      # \frac12 -> \frac{1}{2}
        (r"sqrt([^{])", r"sqrt{\1}"),             # \sqrt2 -> \sqrt{2}
    ))


def normalize_final_answer(answer: str) -> str:
    """Minerva-normalised answer string (units and words dropped, shorthand TeX expanded, a pure
    ``1,234``-style number without its commas)."""
    for old, new in MINERVA_SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for removed in MINERVA_REMOVALS:
        answer = answer.replace(removed, "")
    for pattern, replacement in _MINERVA_REWRITES:
        answer = pattern.sub(replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def _parse_and_evaluate(latex: str) -> tuple[Any, Any]:
    """sympy's ``parse_latex`` of ``latex`` and its ``evalf()`` value (either may raise)."""
    from sympy.parsing.latex import parse_latex

    expression = parse_latex(latex)
    return expression, expression.evalf()


def sympy_equal(first: str, second: str) -> bool:
    """Whether two LaTeX strings parse to the same sympy expression or the same ``evalf()``
    value. Both are parsed and evaluated before comparing, so an error in either raises."""
    first_expr, first_value = _parse_and_evaluate(first)
    second_expr, second_value = _parse_and_evaluate(second)
    return bool(first_expr == second_expr or first_value == second_value)


def latex_equal(predicted: str, gold: str) -> bool:
    """The original's fallback equality of two strings that hold a ``boxed{...}`` answer (the
    last box of each is compared). Raises only ImportError (sympy's LaTeX parser unusable), which
    the original would silently have turned into "not equal"."""
    predicted_answer, gold_answer = extract_last_boxed(predicted), extract_last_boxed(gold)
    if predicted_answer is None or gold_answer is None:
        return False
    try:
        if sympy_equal(predicted_answer, gold_answer):
            return True
    except ImportError:
        raise  # a broken environment (see the module docstring), not a property of the answer
    except Exception:  # noqa: BLE001 -- the original treats any failure as "try the normalised form"
        pass
    try:
        predicted_norm = normalize_final_answer(predicted_answer)
        gold_norm = normalize_final_answer(gold_answer)
        return sympy_equal(predicted_norm, gold_norm) or predicted_norm == gold_norm
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 -- any failure means "not equal", as in the original
        return False
