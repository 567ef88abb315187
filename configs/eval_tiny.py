"""Benchmark evaluation of the embedded default's SFT model (runs/sft_tiny) on 20-question slices
— a quick end-to-end check of the harness; the tiny arithmetic model scores ~0 on these."""

from ml_collections import ConfigDict

from dirl_jax.config import eval_defaults


def get_config() -> ConfigDict:
    config = eval_defaults()
    config.model = "runs/sft_tiny"
    config.output_dir = "runs/eval_tiny"
    config.benchmarks = "math500,gsm8k,aime24,aime25,olympiadbench,amc23"
    config.limit = 20
    config.samples_per_question = 2
    config.max_new_tokens = 64
    config.min_new_tokens = 0
    config.compute_dtype = "float32"
    config.batch_size = 64
    return config
