"""Benchmark evaluation: question sets and the grading of benchmark answers (DIRL_SPEC §7)."""

from dirl_jax.evaluation.benchmarks import (BENCHMARKS, BenchmarkSpec, Question, grade_answer,
                                            load_benchmark)

__all__ = ["BENCHMARKS", "BenchmarkSpec", "Question", "grade_answer", "load_benchmark"]
