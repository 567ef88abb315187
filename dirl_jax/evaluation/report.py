"""The evaluation summary: per-benchmark accuracy (mean pass@1 over k samples, with its standard
error over questions), tokens per step and output length — as JSON, a Markdown table in the layout
of the paper's Table 1, and a bar chart."""

from __future__ import annotations

import collections
import os
from typing import Any, Iterable, Sequence

import numpy as np

from dirl_jax.metrics import write_json_atomic

DISPLAY_NAMES = {"math500": "MATH500", "gsm8k": "GSM8K", "aime24": "AIME24", "aime25": "AIME25",
                 "olympiadbench": "OlympiadBench", "amc23": "AMC23"}


def summarize(records: Iterable[dict[str, Any]], benchmarks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{benchmark: {accuracy, accuracy_se, pass_at_k, tokens_per_step, avg_length,
    truncation_rate, num_questions, num_samples}}`` over the given benchmarks' records.

    ``accuracy`` is the mean correctness over every (question, sample) — DiRL's avg@k, the mean
    pass@1 over k samples; ``accuracy_se`` is the standard error of the per-question means.
    """
    by_benchmark: dict[str, dict[str, list[dict[str, Any]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for record in records:
        by_benchmark[record["benchmark"]][str(record["question_id"])].append(record)
    summary = {}
    for name in benchmarks:
        questions = by_benchmark.get(name)
        if not questions:
            continue
        samples = [r for rs in questions.values() for r in rs]
        per_question = np.array([np.mean([r["correct"] for r in rs]) for rs in questions.values()])
        se = float(per_question.std(ddof=1) / np.sqrt(len(per_question))) if len(per_question) > 1 else 0.0
        summary[name] = {
            "accuracy": float(np.mean([r["correct"] for r in samples])),
            "accuracy_se": se,
            "pass_at_k": float(np.mean([any(r["correct"] for r in rs) for rs in questions.values()])),
            "tokens_per_step": float(np.mean([r["tokens_per_step"] for r in samples])),
            "avg_length": float(np.mean([r["length"] for r in samples])),
            "truncation_rate": float(np.mean([r["finish_reason"] == "length" for r in samples])),
            "num_questions": len(questions),
            "num_samples": len(samples),
        }
    return summary


def markdown_table(summary: dict[str, dict[str, Any]], *, model: str, decoding: str) -> str:
    """Benchmarks as columns (plus the average), as in Table 1: accuracy (%) ± standard error,
    tokens per step and average output length."""
    names = list(summary)
    header = ["Model", "Decoding", "Metric", *(DISPLAY_NAMES.get(n, n) for n in names), "Avg."]

    def row(metric: str, field: str, scale: float, digits: int, with_se: bool = False) -> list[str]:
        def cell(entry: dict[str, Any]) -> str:
            text = f"{scale * entry[field]:.{digits}f}"
            return f"{text} ± {scale * entry['accuracy_se']:.{digits}f}" if with_se else text
        mean = np.mean([summary[n][field] for n in names])
        return [model, decoding, metric, *(cell(summary[n]) for n in names), f"{scale * mean:.{digits}f}"]

    rows = [row("accuracy (%)", "accuracy", 100, 1, with_se=True),
            row("tokens / step", "tokens_per_step", 1, 2),
            row("avg length", "avg_length", 1, 0)]
    counts = ", ".join(f"{DISPLAY_NAMES.get(n, n)} {summary[n]['num_questions']} questions × "
                       f"{summary[n]['num_samples'] // max(summary[n]['num_questions'], 1)} samples"
                       for n in names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nAccuracy is the mean pass@1 over the samples of each question " \
                              f"(± standard error over questions). {counts}.\n"


def bar_chart(summary: dict[str, dict[str, Any]], path: str, *, title: str) -> None:
    """Accuracy per benchmark with standard-error bars, tokens per step printed on each bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    accuracy = [100 * summary[n]["accuracy"] for n in names]
    errors = [100 * summary[n]["accuracy_se"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    bars = ax.bar([DISPLAY_NAMES.get(n, n) for n in names], accuracy, yerr=errors, capsize=4,
                  color="#4c72b0")
    for bar, name in zip(bars, names):
        ax.annotate(f"{summary[name]['tokens_per_step']:.2f} tok/step",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(summary: dict[str, dict[str, Any]], output_dir: str, *, model: str,
                 decoding: str) -> None:
    """``summary.json``, ``summary.md`` and ``summary.png`` in ``output_dir`` (each written to a
    temp path, then renamed)."""
    write_json_atomic(os.path.join(output_dir, "summary.json"), summary)
    path = os.path.join(output_dir, "summary.md")
    with open(f"{path}.tmp", "w") as f:
        f.write(markdown_table(summary, model=model, decoding=decoding))
    os.replace(f"{path}.tmp", path)
    bar_chart(summary, os.path.join(output_dir, "summary.png"), title=f"{model} ({decoding})")
