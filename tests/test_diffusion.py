"""SFT noising and the diffusion loss against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_model, tiny_config
from dirl_jax import canvas as canvas_lib
from dirl_jax import diffusion
from dirl_jax.diffusion import IGNORE


def test_chunked_cross_entropy_and_grads_match_float64(seed):
    rng = np.random.default_rng(seed)
    n, dim, vocab = 37, 8, 29
    hidden = rng.standard_normal((n, dim))
    embedding = rng.standard_normal((vocab, dim))
    targets = rng.integers(0, vocab, n)
    weights = np.where(rng.random(n) < 0.4, 1.0 / rng.uniform(0.05, 1.0, n), 0.0)

    logits = hidden @ embedding.T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = np.sum(weights * (lse - logits[np.arange(n), targets]))
    f = lambda h, e: diffusion.chunked_weighted_cross_entropy(  # noqa: E731
        h, e, jnp.asarray(targets), jnp.asarray(weights, jnp.float32), chunk=8)
    value, (g_h, g_e) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(hidden, jnp.float32),
                                                              jnp.asarray(embedding, jnp.float32))
    assert abs(float(value) - expected) <= 1e-5 * abs(expected)
    # Analytic float64 gradients: d/dlogits = w * (softmax - onehot).
    probs = np.exp(logits - lse[:, None])
    probs[np.arange(n), targets] -= 1.0
    d_logits = weights[:, None] * probs
    np.testing.assert_allclose(g_h, d_logits @ embedding, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_e, d_logits.T @ hidden, rtol=1e-4, atol=1e-5)


def numpy_sft_loss(logits_canvas, tokens, labels, masked, p):
    """Σ_masked CE/p ÷ N_sup; token i's noisy copy sits at canvas slot i (noisy copies first)."""
    loss = 0.0
    for i in np.flatnonzero(masked):
        row = logits_canvas[i].astype(np.float64)
        lse = np.log(np.exp(row - row.max()).sum()) + row.max()
        loss += (lse - row[tokens[i]]) / p[i]
    return loss / np.sum(labels != IGNORE)


def test_sft_loss_matches_float64_reference_on_fixed_masks(seed):
    rng = np.random.default_rng(seed)
    config = tiny_config(block_size=4)
    model = random_model(config, seed)
    lengths, pad = [9, 6], 3
    length = sum(lengths) + pad
    segment_ids = np.concatenate([np.full(n, s) for s, n in enumerate(lengths)] + [np.full(pad, -1)])
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])
    tokens = rng.integers(0, config.vocab_size - 1, length)
    labels = np.where((positions >= 3) & (segment_ids >= 0), tokens, IGNORE)
    masked = (labels != IGNORE) & (rng.random(length) < 0.6)
    p = np.where(segment_ids == 0, 0.3, 0.8)
    batch = {k: jnp.asarray(v)[None] for k, v in dict(tokens=tokens, labels=labels, positions=positions,
                                                        segment_ids=segment_ids).items()}
    noised = diffusion.Noised(jnp.where(masked, config.mask_token_id, tokens)[None],
                              jnp.asarray(masked)[None], jnp.asarray(p, jnp.float32)[None])
    parts = diffusion.masked_loss_parts(model, batch, noised, block_size=4, chunk=8)
    canvas, _ = canvas_lib.two_stream_canvas(batch["tokens"], noised.noisy_tokens, batch["positions"],
                                             batch["segment_ids"], 4)
    logits = np.asarray(model(canvas=canvas))[0]
    expected = numpy_sft_loss(logits, tokens, labels, masked, p)
    actual = float(parts.weighted_ce_sum) / float(parts.num_supervised)
    assert abs(actual - expected) <= 1e-5 * abs(expected)
    assert int(parts.num_masked) == masked.sum()


def test_noising_statistics(seed):
    rows, length = 4000, 24
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50, (rows, length))
    segment_ids = np.repeat(np.array([[0] * 12 + [1] * 8 + [-1] * 4]), rows, axis=0)
    labels = np.where((np.arange(length) % 12 >= 4) & (segment_ids >= 0), tokens, IGNORE)
    labels[:5] = IGNORE  # rows without any supervised token
    keys = jax.random.split(jax.random.key(seed), rows)
    noised = jax.device_get(diffusion.noise_batch(keys, jnp.asarray(tokens), jnp.asarray(labels),
                                                  jnp.asarray(segment_ids), mask_token_id=99))
    masked, p = noised.masked, noised.p
    eligible = labels != IGNORE
    assert not masked[~eligible].any()                       # prompts and padding never masked
    assert not masked[:5].any()
    assert masked[5:].any(axis=1).all()                      # at least one per row
    np.testing.assert_array_equal(noised.noisy_tokens, np.where(masked, 99, tokens))
    for seg in (0, 1):                                       # one p per segment
        cols = segment_ids[0] == seg
        assert (p[:, cols] == p[:, cols][:, :1]).all()
    assert np.mean(p[:, 0] != p[:, 12]) > 0.99               # segments draw independently
    # masked fraction of a segment's supervised tokens is ≈ p (binned by p); p ≈ U(eps, 1)
    frac = (masked[5:, :12] & eligible[5:, :12]).sum(1) / eligible[5:, :12].sum(1)
    p0 = p[5:, 0]
    for lo in (0.2, 0.5, 0.8):
        sel = (p0 >= lo) & (p0 < lo + 0.1)
        assert abs(frac[sel].mean() - p0[sel].mean()) < 0.03
    assert abs(p0.mean() - 0.5) < 0.03


def test_a_row_that_never_masks_forces_one_token():
    tokens = jnp.arange(8)[None]
    labels = jnp.where(jnp.arange(8) == 5, 5, IGNORE)[None]
    keys = jax.random.split(jax.random.key(0), 1)
    noised = diffusion.noise_batch(keys, tokens, labels, jnp.zeros((1, 8), jnp.int32),
                                   mask_token_id=99, eps=1e-9, max_tries=1)
    # With one eligible token, p≈t; whatever the draw, exactly that token ends up masked.
    np.testing.assert_array_equal(noised.masked[0], np.arange(8) == 5)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunk_size_does_not_change_the_loss(seed, chunk):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((20, 4)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 7, 20))
    w = jnp.asarray(np.where(rng.random(20) < 0.5, 2.0, 0.0), jnp.float32)
    a = diffusion.chunked_weighted_cross_entropy(hidden, emb, y, w, chunk=chunk)
    b = diffusion.chunked_weighted_cross_entropy(hidden, emb, y, w, chunk=20)
    np.testing.assert_allclose(a, b, rtol=1e-6)
