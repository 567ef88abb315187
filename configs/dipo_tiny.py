"""DiPO on the built-in arithmetic task, starting from the embedded SFT default's run directory
(`python -m dirl_jax.train --config configs/sft_tiny.py` first) and holding out the same operand
pairs. Per step 32 prompts x 8 responses (64 prompts drawn per round: the original's
oversampling), dynamic decoding 0.9 at T = 1, two PPO iterations at lr 1e-4, 50 steps; held-out
greedy accuracy on 500 problems every 25 steps. Results over three seeds: docs/PERFORMANCE.md."""

from ml_collections import ConfigDict

from dirl_jax.config import dipo_defaults


def get_config() -> ConfigDict:
    config = dipo_defaults()
    config.run_dir = "runs/dipo_tiny"
    config.init_from = "runs/sft_tiny"
    config.data.builtin_max_operand = 99
    config.rollout.update(prompts_per_step=32, group_size=8, strategy="low_confidence_dynamic",
                          threshold=0.9, max_new_tokens=40, temperature=1.0)
    config.train.update(num_steps=50, learning_rate=1e-4, ppo_iterations=2, canvas_rows=32,
                        row_length=1024, dynamic_sampling=True, max_sampling_rounds=4)
    config.checkpoint.every_steps = 25
    config.eval.update(num_examples=500, every_steps=25)
    return config
