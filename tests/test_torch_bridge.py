"""torch_bridge: JAX parameters loaded straight into transformers; dirl_jax never needs torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import random_model, tiny_config
from dirl_jax import canvas as canvas_lib
from torch_bridge import to_torch_state_dict


def test_state_dict_loads_strictly_into_transformers(seed):
    config = tiny_config(heads=4, kv_heads=2)
    model = random_model(config, seed)
    hf_config = Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                               if k not in ("model_type", "architectures", "torch_dtype")})
    hf = Qwen3ForCausalLM(hf_config).eval()
    hf.load_state_dict(to_torch_state_dict(model, torch.float32), strict=True)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (1, 9))
    positions = np.arange(9)[None]
    canvas = canvas_lib.block_causal_canvas(tokens, positions, np.zeros((1, 9), int), config.block_size)
    mask = np.array(canvas_lib.dense_mask(canvas))
    additive = torch.where(torch.from_numpy(mask), 0.0, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        reference = hf(input_ids=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions),
                       attention_mask=additive).logits.numpy()
    ours = np.asarray(model(canvas=canvas))
    assert np.abs(ours - reference).max() < 1e-4 * np.abs(reference).max()


def test_dirl_jax_works_without_torch(tmp_path):
    script = f"""
import sys
sys.modules['torch'] = None  # any import of torch now fails
sys.path.insert(0, {str(tmp_path)!r})
from flax import nnx
import dirl_jax
from dirl_jax.model import SDARConfig, SDARForCausalLM
c = SDARConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, head_dim=4, block_size=2, mask_token_id=10)
dirl_jax.save_model(SDARForCausalLM(c, rngs=nnx.Rngs(0)), c, {str(tmp_path / 'm')!r})
dirl_jax.load_model({str(tmp_path / 'm')!r})
assert not any(m == 'torch' or m.startswith('torch.') for m, v in sys.modules.items() if v is not None)
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
