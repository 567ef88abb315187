"""The reference attention against a float64 NumPy softmax attention with repeated K/V heads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dirl_jax.attention import attention, reference_attention


def numpy_attention(q, k, v, mask):
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
    probs = np.nan_to_num(probs)  # rows with no visible key -> zeros
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2)])
def test_reference_attention_matches_float64_numpy(seed, heads, kv_heads):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 7, heads, 8))
    k = rng.standard_normal((2, 9, kv_heads, 8))
    v = rng.standard_normal((2, 9, kv_heads, 8))
    mask = rng.random((2, 7, 9)) < 0.5
    mask[0, 3] = False  # a query that sees nothing
    out = reference_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    expected = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    assert not np.asarray(out)[0, 3].any()


def test_attention_rejects_unknown_impl_and_ambiguous_masks():
    x = jnp.zeros((1, 2, 2, 4))
    mask = jnp.ones((1, 2, 2), bool)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'; available: auto, reference"):
        attention(x, x, x, mask=mask, impl="flash")
    with pytest.raises(ValueError, match="exactly one of"):
        attention(x, x, x)
