"""The paper's evaluation (DIRL_SPEC §7.1, Table 1): MATH500, GSM8K, AIME24, AIME25 and
OlympiadBench, 16 samples per question, up to 8,192 new tokens, block 4, dynamic unmasking at
threshold 0.9 (`--config.decoding=dirl_static` for one token per step), T = 1, top-k 50.

`--config.model` takes a HF SDAR directory (or hub id) or a training run directory.
"""

from ml_collections import ConfigDict

from dirl_jax.config import eval_defaults


def get_config() -> ConfigDict:
    config = eval_defaults()
    config.model = "runs/dipo_sdar8b"
    config.output_dir = "runs/eval_sdar8b"
    config.samples_per_question = 16
    config.max_new_tokens = 8192
    config.decoding = "dirl_dynamic"
    config.compute_dtype = "bfloat16"
    config.batch_size = 256
    return config
