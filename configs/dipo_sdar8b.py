"""The paper's RL recipe (DiRL §3.2): DiPO from the SFT model (`configs/sft_sdar8b.py`'s run), 128
prompts x 32 rollouts per step, responses up to 8k tokens decoded in blocks of 4 with dynamic
unmasking (threshold 0.9) at temperature 1, AdamW lr 1e-6 without weight decay, 40 steps, accuracy
reward, DAPO dynamic sampling (3x oversampling per round, as the original does for BigMath).

bf16 compute: the trainer recomputes the old log-probs (``old_logprobs="trainer"``, as the
original does) and the sampler/trainer |log ratio| guard is loose (bf16 kernels differ in
rounding). Point `data.source` at the RL prompts (question / ground_truth_answer records).
"""

from ml_collections import ConfigDict

from dirl_jax.config import dipo_defaults


def get_config() -> ConfigDict:
    config = dipo_defaults()
    config.run_dir = "runs/dipo_sdar8b"
    config.init_from = "runs/sft_sdar8b"
    config.model.remat = True
    config.mesh.update(data=0, fsdp=8, tensor=1)  # one 8-GPU node: parameters and moments over 8
    config.data.source = "data/bigmath_train.jsonl"
    config.rollout.update(prompts_per_step=128, group_size=32, strategy="low_confidence_dynamic",
                          threshold=0.9, max_new_tokens=8192, temperature=1.0, oversample=3,
                          max_prompt_tokens=1024)
    config.train.update(num_steps=40, learning_rate=1e-6, warmup_steps=10, schedule="constant",
                        weight_decay=0.0, max_grad_norm=1.0, compute_dtype="bfloat16",
                        param_dtype="float32", ppo_iterations=1, old_logprobs="trainer",
                        loss_aggregation="token_mean", kl_beta=0.0, dynamic_sampling=True,
                        max_sampling_rounds=4, canvas_rows=8, row_length=43008,
                        logprob_chunk=2048, max_log_ratio=1.0)
    config.checkpoint.update(every_steps=10, keep=2)
    config.eval.num_examples = 0              # benchmarks: `python -m dirl_jax.evaluate`
    config.export.dtype = "bfloat16"
    return config
