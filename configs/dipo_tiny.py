"""DiPO on the built-in arithmetic task, starting from the embedded SFT default's run directory
(`python -m dirl_jax.train --config configs/sft_tiny.py` first). About 10 minutes on a 2-core CPU;
held-out greedy accuracy goes from 0.80 to ~0.95 (docs/PERFORMANCE.md, three seeds)."""

from ml_collections import ConfigDict

from dirl_jax.config import dipo_defaults


def get_config() -> ConfigDict:
    config = dipo_defaults()
    config.run_dir = "runs/dipo_tiny"
    config.init_from = "runs/sft_tiny"
    config.data.builtin_max_operand = 99
    config.rollout.update(prompts_per_step=16, group_size=8, strategy="low_confidence_dynamic",
                          threshold=0.9, max_new_tokens=32, temperature=1.0)
    config.train.update(num_steps=100, learning_rate=1e-4, ppo_iterations=2, canvas_rows=16,
                        row_length=1024, dynamic_sampling=True, max_sampling_rounds=4)
    config.checkpoint.every_steps = 25
    config.eval.update(num_examples=500, every_steps=25)
    return config
