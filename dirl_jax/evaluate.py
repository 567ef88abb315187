"""``python -m dirl_jax.evaluate --config configs/eval_<name>.py [--config.field=value ...]``:
benchmark accuracy (mean pass@1 over k samples), tokens per step and output length of a checkpoint,
as records.jsonl, summary.json, summary.md (the paper's Table 1 layout) and summary.png."""

from __future__ import annotations

from ml_collections import ConfigDict

from dirl_jax.cli import run_config_command
from dirl_jax.config import eval_defaults
from dirl_jax.evaluation.report import markdown_table
from dirl_jax.evaluation.runner import run_evaluation


def evaluate(config: ConfigDict) -> None:
    """Runs the evaluation and prints its Table-1 summary."""
    summary = run_evaluation(config)
    if summary:
        print(markdown_table(summary, model=config.model, decoding=config.decoding), flush=True)
        print(f"wrote {config.output_dir}/records.jsonl, summary.json, summary.md, summary.png")


if __name__ == "__main__":
    run_config_command(evaluate, __doc__, eval_defaults)
