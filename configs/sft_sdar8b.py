"""The paper's SFT recipe (DiRL §3.1): SDAR-8B-Chat, OpenR1-Math distilled from GLM-4.6 (reasoning
capped at 8k tokens), lr 1e-5 with cosine annealing, no weight decay, global batch 512 sequences
of 8k tokens, 100 steps, block size 4, bf16 compute with fp32 master weights.

Point `init_from` at a local copy (or hub id) of SDAR-8B-Chat and `data.source` at the SFT data
(JSONL / Parquet / HF datasets name with DiRL's `messages` records).
"""

from ml_collections import ConfigDict

from dirl_jax.config import sft_defaults


def get_config() -> ConfigDict:
    config = sft_defaults()
    config.run_dir = "runs/sft_sdar8b"
    config.init_from = "checkpoints/SDAR-8B-Chat"
    config.tokenizer = ""                       # the tokenizer files in init_from
    config.model.remat = True
    config.data.update(source="data/glm_openr1math.jsonl", max_length=8192, overlong="drop")
    config.diffusion.update(block_size=4, eps=1e-3, loss_chunk=2048)
    # docs/SCALING.md (scripts/plan_mesh.py): on 8 x H100 a 2 x 4 x 1 mesh fits 2 rows per device,
    # 512 = 2 rows x 8 devices x 32 micro-batches; on a v5p-128 slice (64 chips) data = 16 (auto)
    # x fsdp 4 with --config.train.grad_accum=4
    config.mesh.update(data=0, fsdp=4, tensor=1)
    config.train.update(num_steps=100, global_batch=512, grad_accum=32, learning_rate=1e-5,
                        warmup_steps=3, schedule="cosine", min_lr_ratio=0.0, weight_decay=0.0,
                        max_grad_norm=1.0, compute_dtype="bfloat16", param_dtype="float32",
                        log_every=1)
    config.checkpoint.update(every_steps=50, keep=2)
    config.eval.num_examples = 0                # evaluate with `python -m dirl_jax.evaluate`
    config.export.dtype = "bfloat16"
    return config
