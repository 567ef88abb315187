"""Benchmark question sets (DIRL_SPEC §7.1) and the grading of benchmark answers.

Each benchmark reads its own record layout (the shared ``data/benchmarks/*.jsonl`` files) or DiRL's
``question`` / ``ground_truth_answer`` format, and normalises the gold answer to a string. Grading
is the training reward's: the last ``\\boxed{}`` of the response against the gold with math-verify.
GSM8K answers are often unboxed plain numbers, so there the last number of an unboxed response is
compared with the gold numerically.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import pathlib
import re
from typing import Any, Callable, Literal, Sequence

from dirl_jax.data.records import DataError, read_records
from dirl_jax.rewards import extract_last_boxed, grade_all
from dirl_jax.rewards.grading import DEFAULT_TIMEOUT_S

Grading = Literal["math", "numeric"]
DIRL_FIELDS = ("question", "ground_truth_answer")
ID_FIELDS = ("id", "unique_id", "idx")
REPO = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question with its normalised gold answer."""

    benchmark: str
    id: str
    question: str
    answer: str


def _text(value: Any) -> str:
    """A string or number as stripped text; an integral float loses its ``.0``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string or a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _as_number(text: str) -> fractions.Fraction | None:
    """The exact value of a plain number (``$`` and thousands commas allowed), else None."""
    try:
        return fractions.Fraction(text.replace(",", "").replace("$", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def math_gold(value: Any) -> str:
    """A LaTeX or numeric answer as text (``27.0`` -> ``"27"``)."""
    return _text(value)


def gsm8k_gold(value: Any) -> str:
    """The number after the last ``####`` of a GSM8K solution (or a bare number), without commas
    and ``$``."""
    text = _text(value).rsplit("####", 1)[-1].replace(",", "").replace("$", "").strip()
    if _as_number(text) is None:
        raise ValueError(f"expected a number after '####', got {text!r}")
    return text


def aime_gold(value: Any) -> str:
    """An integer answer without leading zeros (``"025"`` -> ``"25"``)."""
    text = _text(value)
    if not text.isdigit():
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return str(int(text))


def olympiad_gold(value: Any) -> str:
    """OlympiadBench's ``final_answer`` list: ``$`` delimiters stripped, answers joined by ``", "``."""
    answers = value if isinstance(value, list) else [value]
    return ", ".join(part for part in (_text(a).replace("$", "").strip() for a in answers) if part)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how to read its records."""

    file: str  # in the benchmark directory
    question_field: str
    answer_field: str
    gold: Callable[[Any], str]  # the answer field's value -> normalised gold; ValueError if unusable
    grading: Grading = "math"  # "numeric": an unboxed response's last number counts (GSM8K)
    context_field: str | None = None  # text to put before the question when present


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("math500.jsonl", "problem", "answer", math_gold),
    "gsm8k": BenchmarkSpec("gsm8k.jsonl", "question", "answer", gsm8k_gold, grading="numeric"),
    "aime24": BenchmarkSpec("aime24.jsonl", "problem", "answer", aime_gold),
    "aime25": BenchmarkSpec("aime25.jsonl", "problem", "answer", aime_gold),
    "olympiadbench": BenchmarkSpec("olympiadbench.jsonl", "question", "final_answer", olympiad_gold,
                                   context_field="context"),
    "amc23": BenchmarkSpec("amc23.jsonl", "problem", "answer", math_gold),
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def default_data_dir() -> pathlib.Path:
    """``$DIRL_BENCHMARK_DIR``, else ``$DIRL_SHARED_DIR/data/benchmarks``, else the checkout's
    ``../shared/data/benchmarks``."""
    if "DIRL_BENCHMARK_DIR" in os.environ:
        return pathlib.Path(os.environ["DIRL_BENCHMARK_DIR"])
    shared = pathlib.Path(os.environ.get("DIRL_SHARED_DIR", REPO.parent / "shared"))
    return shared / "data" / "benchmarks"


def benchmark_file(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Benchmark ``name``'s file in ``data_dir`` (default :func:`default_data_dir`)."""
    return pathlib.Path(data_dir if data_dir is not None else default_data_dir()) / benchmark_spec(name).file


def _record_id(record: dict[str, Any], index: int) -> str:
    return next((str(record[k]) for k in ID_FIELDS if record.get(k) is not None), str(index))


def to_question(name: str, record: Any, index: int, where: str) -> Question:
    """The ``Question`` of one record; a ``DataError`` at ``where`` names the fields expected."""
    spec = benchmark_spec(name)
    expected = (f"expected non-empty '{spec.question_field}' and '{spec.answer_field}' fields "
                f"(or DiRL's '{DIRL_FIELDS[0]}' and '{DIRL_FIELDS[1]}')")
    if not isinstance(record, dict):
        raise DataError(f"{where}: {expected}, got a {type(record).__name__}")
    dirl_format = DIRL_FIELDS[1] in record
    question_field, answer_field = DIRL_FIELDS if dirl_format else (spec.question_field, spec.answer_field)
    question = record.get(question_field)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty '{question_field}'; {expected}")
    if record.get(answer_field) is None:
        raise DataError(f"{where}: missing '{answer_field}'; {expected}")
    try:
        answer = spec.gold(record[answer_field])
    except ValueError as e:
        raise DataError(f"{where}: field '{answer_field}': {e}") from e
    if not answer:
        raise DataError(f"{where}: empty '{answer_field}'; {expected}")
    context = record.get(spec.context_field) if spec.context_field else None
    if isinstance(context, str) and context.strip():
        question = f"{context.strip()}\n\n{question}"
    return Question(benchmark=name, id=_record_id(record, index), question=question, answer=answer)


def load_benchmark(name: str, source: str | os.PathLike | None = None, *,
                   data_dir: str | os.PathLike | None = None, limit: int | None = None,
                   split: str = "") -> list[Question]:
    """The first ``limit`` (default all) questions of benchmark ``name``.

    ``source`` is a JSONL / JSON / Parquet file or a HF datasets name (``split`` applies to the
    latter: by default its ``test`` split, else its only one); by default the benchmark's file in
    ``data_dir`` (default :func:`default_data_dir`).
    """
    benchmark_spec(name)  # an unknown name fails before any file is read
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}")
    if source is None:
        source = benchmark_file(name, data_dir)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: {name} benchmark file not found (set DIRL_BENCHMARK_DIR "
                                    "or pass data_dir or source)")
    source = os.fspath(source)
    records = read_records(source, split)
    if not records:
        raise DataError(f"{source}: no records")
    questions = [to_question(name, record, i, f"{source}: record {i}")
                 for i, record in enumerate(records[:limit])]
    first_of: dict[str, int] = {}
    for i, question in enumerate(questions):  # results are keyed by id: two questions, one id, one result
        if first_of.setdefault(question.id, i) != i:
            raise DataError(f"{source}: records {first_of[question.id]} and {i} share the id "
                            f"{question.id!r}; expected one id per question")
    return questions


# A number as GSM8K responses write it: an optional sign and $, thousands commas, decimals. A minus
# right after a word, digit or bracket (or a digit or bracket and a space) is a subtraction, and a
# sentence's final period is not a decimal point.
NUMBER = re.compile(r"(?:(?<![\w)\]}])(?<![\d)\]}] )-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text`` without ``$`` and commas (``"$1,234."`` -> ``"1234"``), or None."""
    numbers = NUMBER.findall(text)
    return numbers[-1].replace("$", "").replace(",", "") if numbers else None


def numbers_equal(predicted: str, gold: str) -> bool:
    """Exact numeric equality of two plain numbers (``"18.00"`` == ``"18"``); False if either is not one."""
    a, b = _as_number(predicted), _as_number(gold)
    return a is not None and a == b


def grade_answer(benchmark: str, response: str, gold: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 latex_fallback: bool = True) -> tuple[str | None, bool]:
    """``(extracted answer, correct)``: the last ``\\boxed{}`` graded by :func:`grade`; for "numeric"
    benchmarks an unboxed response's last number, compared numerically. None if nothing found."""
    [verdict] = grade_answers([(benchmark, response, gold)], timeout=timeout,
                              latex_fallback=latex_fallback, workers=1)
    return verdict


def grade_answers(items: Sequence[tuple[str, str, str]], *, timeout: float = DEFAULT_TIMEOUT_S,
                  latex_fallback: bool = True, workers: int = 4) -> list[tuple[str | None, bool]]:
    """:func:`grade_answer` of every ``(benchmark, response, gold)``; the boxed answers are graded
    by :func:`dirl_jax.rewards.grade_all` on up to ``workers`` processes, each call timed out."""
    verdicts: list[tuple[str | None, bool] | None] = []
    boxed_items = []
    for i, (benchmark, response, gold) in enumerate(items):
        spec = benchmark_spec(benchmark)
        boxed = extract_last_boxed(response)
        if boxed is None and spec.grading == "numeric":
            number = last_number(response)
            verdicts.append((number, number is not None and numbers_equal(number, gold)))
        else:
            verdicts.append(None)
            boxed_items.append((i, boxed, response, gold))
    graded = grade_all([(response, gold) for _, _, response, gold in boxed_items], timeout=timeout,
                       latex_fallback=latex_fallback, workers=workers)
    for (i, boxed, _, _), correct in zip(boxed_items, graded):
        verdicts[i] = (boxed, correct)
    return verdicts  # type: ignore[return-value]
