"""The paper's RL recipe (DiRL §3.2): DiPO from the SFT model (`configs/sft_sdar8b.py`'s run), 128
prompts x 32 rollouts per step, responses up to 8k tokens decoded in blocks of 4 with dynamic
unmasking (threshold 0.9) at temperature 1 with top-k 50, AdamW lr 1e-6 without weight decay, 40
steps, accuracy reward, DAPO dynamic sampling (the original's oversampling: 2x per round at 32
rollouts per prompt). tests/test_dipo_train.py checks every value against DIRL_SPEC.

Differences from the original, on purpose (docs/DIPO.md): prompts over 1,024 tokens are dropped
with a warning (the original keeps them and cuts the response tail in training, which would train
on a trajectory the sampler did not produce); one optimizer update per rollout batch (§4.6).

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
                          steps=0, threshold=0.9, max_new_tokens=8192, temperature=1.0, top_k=50,
                          top_p=1.0, oversample=0, max_prompt_tokens=1024,
                          slots=64)  # in-process engine: 64 rows (9k-token caches) per host at
                                     # once; 0 would open a whole sampling round (8,192 rows)
    config.rewards.names = ("accuracy",)
    config.train.update(num_steps=40, learning_rate=1e-6, warmup_steps=10, schedule="constant",
                        weight_decay=0.0, b1=0.9, b2=0.999, adam_eps=1e-8, max_grad_norm=1.0,
                        eps_low=0.2, eps_high=0.28, log_ratio_clamp=10.0, advantage="zscore",
                        compute_dtype="bfloat16",
                        param_dtype="float32", ppo_iterations=1, old_logprobs="trainer",
                        loss_aggregation="token_mean", kl_beta=0.0, dynamic_sampling=True,
                        max_sampling_rounds=4, canvas_rows=8, row_length=43008,
                        logprob_chunk=2048, max_log_ratio=1.0)
    config.checkpoint.update(every_steps=10, keep=2)
    config.eval.num_examples = 0              # benchmarks: `python -m dirl_jax.evaluate`
    config.export.dtype = "bfloat16"
    return config
