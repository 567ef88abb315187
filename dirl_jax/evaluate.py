"""``python -m dirl_jax.evaluate --config configs/eval_<name>.py [--config.field=value ...]``:
benchmark accuracy (mean pass@1 over k samples), tokens per step and output length of a checkpoint,
as records.jsonl, summary.json, summary.md (the paper's Table 1 layout) and summary.png."""

from __future__ import annotations

import os
import time

from ml_collections import ConfigDict

from dirl_jax import console
from dirl_jax.cli import run_config_command
from dirl_jax.config import eval_defaults
from dirl_jax.evaluation.report import markdown_table
from dirl_jax.evaluation.runner import run_evaluation
from dirl_jax.metrics import format_duration


def evaluate(config: ConfigDict) -> None:
    """Runs the evaluation and prints its Table-1 summary."""
    started = time.time()
    summary = run_evaluation(config)
    if summary:
        print(markdown_table(summary, model=config.model, decoding=config.decoding), flush=True)
        out = os.path.abspath(config.output_dir)
        console.closing_lines(f"evaluate done in {format_duration(time.time() - started)}", [
            ("records", os.path.join(out, "records.jsonl"), "every sample: response, answer, verdict"),
            ("summary", os.path.join(out, "summary.json"), "accuracy, tokens per step, length"),
            ("table", os.path.join(out, "summary.md"), "the paper's Table 1 layout"),
            ("chart", os.path.join(out, "summary.png"), "")])


if __name__ == "__main__":
    run_config_command(evaluate, __doc__, eval_defaults)
