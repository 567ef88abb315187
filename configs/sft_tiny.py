"""Embedded default: a tiny SDAR model learns arithmetic word problems by blockwise diffusion SFT
on a CPU in a few minutes, then reports held-out exact-match accuracy of greedy decoding."""

from ml_collections import ConfigDict

from dirl_jax.config import sft_defaults


def get_config() -> ConfigDict:
    config = sft_defaults()
    config.run_dir = "runs/sft_tiny"
    config.tokenizer = "builtin:toy"
    config.data.source = "builtin:arithmetic"
    config.data.max_length = 92
    config.data.builtin_max_operand = 99
    config.model.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, block_size=4)
    config.train.update(num_steps=2000, global_batch=16, grad_accum=1, learning_rate=1e-3,
                        warmup_steps=100, schedule="constant", weight_decay=0.01,
                        compute_dtype="float32", param_dtype="float32")
    config.checkpoint.every_steps = 500
    config.eval.num_examples = 500
    return config
