"""Logits of the NNX model equal transformers' Qwen3ForCausalLM given the same weights and mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen3ForCausalLM

from conftest import random_model, tiny_config
from dirl_jax import canvas as canvas_lib
from dirl_jax import save_model


def torch_logits(model_dir, tokens, positions, mask, dtype=torch.float32) -> np.ndarray:
    """transformers forward with the dense boolean mask as a 4-D additive mask."""
    hf = Qwen3ForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype).eval()
    additive = torch.where(torch.from_numpy(np.array(mask)), 0.0, torch.finfo(dtype).min)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(np.array(tokens)).long(),
                 position_ids=torch.from_numpy(np.array(positions)).long(),
                 attention_mask=additive[:, None].to(dtype)).logits
    return out.float().numpy()


def packed_rows(rng: np.random.Generator, batch: int, block_size: int, vocab: int,
                max_segments: int = 3):
    """Rows of several packed segments of unequal lengths (not multiples of the block size),
    followed by row padding (segment -1)."""
    rows = []
    for _ in range(batch):
        lengths = rng.choice(np.arange(2, 12), size=rng.integers(1, max_segments + 1), replace=False)
        rows.append([int(n) for n in lengths if n % block_size or block_size == 1] or [block_size + 1])
    length = max(sum(r) for r in rows) + 3
    segment_ids = np.full((batch, length), -1)
    positions = np.zeros((batch, length), int)
    for b, lengths in enumerate(rows):
        start = 0
        for s, n in enumerate(lengths):
            segment_ids[b, start:start + n] = s
            positions[b, start:start + n] = np.arange(n)
            start += n
    tokens = rng.integers(0, vocab, (batch, length))
    return tokens, positions, segment_ids


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("layout", ["two_stream", "block_causal"])
def test_logits_match_transformers(tmp_path, seed, heads, kv_heads, tied, layout):
    rng = np.random.default_rng(seed)
    config = tiny_config(heads=heads, kv_heads=kv_heads, head_dim=8, hidden=24, tied=tied,
                         block_size=int(rng.choice([2, 4])))
    model = random_model(config, seed)
    save_model(model, config, tmp_path / "m", dtype="float32")
    tokens, positions, segment_ids = packed_rows(rng, 2, config.block_size, config.vocab_size)
    if layout == "two_stream":
        noisy = np.where(rng.random(tokens.shape) < 0.5, config.mask_token_id, tokens)
        canvas, _ = canvas_lib.two_stream_canvas(tokens, noisy, positions, segment_ids,
                                                 config.block_size)
    else:
        canvas = canvas_lib.block_causal_canvas(tokens, positions, segment_ids, config.block_size)
    mask = np.asarray(canvas_lib.dense_mask(canvas))
    ours = np.asarray(model(canvas=canvas))
    ours_dense = np.asarray(model(canvas.tokens, canvas.positions, mask))
    reference = torch_logits(tmp_path / "m", canvas.tokens, canvas.positions, mask)
    real = np.asarray(canvas.segment_ids) >= 0  # padding rows see nothing: HF and we differ there
    assert relative_error(ours[real], reference[real]) < 1e-4
    # The canvas path runs the block-sparse kernel, the mask path the dense reference.
    np.testing.assert_allclose(ours, ours_dense, rtol=1e-5, atol=1e-6)


def test_bf16_logits_close_to_transformers_fp32(tmp_path, seed):
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    config = tiny_config(heads=4, kv_heads=2)
    model = random_model(config, seed, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    save_model(model, config, tmp_path / "m", dtype="bfloat16")
    tokens, positions, segment_ids = packed_rows(rng, 2, config.block_size, config.vocab_size)
    canvas = canvas_lib.block_causal_canvas(tokens, positions, segment_ids, config.block_size)
    mask = np.asarray(canvas_lib.dense_mask(canvas))
    ours = np.asarray(model(canvas=canvas).astype(jnp.float32))
    reference = torch_logits(tmp_path / "m", canvas.tokens, canvas.positions, mask)
    real = np.asarray(canvas.segment_ids) >= 0
    assert relative_error(ours[real], reference[real]) < 3e-2


def test_remat_gives_same_logits_and_grads(seed):
    import jax
    from flax import nnx
    rng = np.random.default_rng(seed)
    config = tiny_config()
    plain = random_model(config, seed)
    remat = random_model(config, seed, remat=True)
    tokens, positions, segment_ids = packed_rows(rng, 2, config.block_size, config.vocab_size)
    canvas = canvas_lib.block_causal_canvas(tokens, positions, segment_ids, config.block_size)

    def loss(m):
        return (m(canvas=canvas) ** 2).mean()

    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
