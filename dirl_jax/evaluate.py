"""``python -m dirl_jax.evaluate --config configs/eval_<name>.py [--config.field=value ...]``:
benchmark accuracy (mean pass@1 over k samples), tokens per step and output length of a checkpoint,
as records.jsonl, summary.json, summary.md (the paper's Table 1 layout) and summary.png."""

from __future__ import annotations

from absl import app
from absl import logging as absl_logging
from ml_collections import config_flags

from dirl_jax import distributed

from dirl_jax.evaluation.report import markdown_table
from dirl_jax.evaluation.runner import run_evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/eval_*.py file.",
                                          lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config configs/eval_<name>.py is required")
    absl_logging.set_verbosity(absl_logging.WARNING)
    distributed.initialize_from_flags()  # multi-host: before any JAX computation
    config = _CONFIG.value
    summary = run_evaluation(config)
    if summary:
        print(markdown_table(summary, model=config.model, decoding=config.decoding), flush=True)
        print(f"wrote {config.output_dir}/records.jsonl, summary.json, summary.md, summary.png")


if __name__ == "__main__":
    app.run(main)
