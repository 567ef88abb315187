"""Per-token log-probabilities and entropies against a large vocabulary, a chunk at a time.

``tokens x vocab`` logits are never materialised: hidden states are scored against the output
embedding ``chunk`` tokens at a time, forward and backward (a custom VJP that recomputes each
chunk's softmax), so memory is O(chunk x vocab). Chunks with no active token are skipped. The SFT cross-entropy and the DiPO
objective both score tokens through here.

Callers put active tokens first, so at most one computed chunk is partly active: its inactive rows
are wasted work. The chunk is therefore capped at a quarter of the tokens (never below
``MIN_CHUNK`` rows), which bounds that waste by a quarter of the whole projection; a large
batch keeps the configured chunk. (Without the cap, 512 tokens of which 256 are masked, scored
with the default chunk of 1,024, cost the vocabulary projection of 1,024 rows: 4x the need.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dirl_jax.sharding import constrain

MIN_CHUNK = 128


def effective_chunk(num_tokens: int, chunk: int) -> int:
    """The chunk used for ``num_tokens`` tokens: ``chunk``, capped at a quarter of the tokens
    rounded up to a multiple of 8 (but not below ``MIN_CHUNK``)."""
    quarter = -(-num_tokens // 32) * 8
    return min(chunk, max(MIN_CHUNK, quarter))


@jax.named_scope("vocab_scores")
def chunked_token_scores(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                         active: jax.Array, *, chunk: int, temperature: float = 1.0,
                         logits_dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``log softmax(hidden @ output_embedding.T / T)[targets]`` and the softmax entropy, fp32.

    ``hidden [N, E]``, ``output_embedding [V, E]``, ``targets, active [N]``. Inactive tokens
    score 0; a chunk holding no active token is skipped, so callers put active tokens first.
    The entropy is a statistic (no gradient). ``temperature`` 0 means 1 (greedy decoding scores
    the unscaled distribution). ``logits_dtype`` is the matmul's output type: fp32 for losses,
    the model's compute dtype to reproduce the sampler's logits bit for bit.
    """
    n, dim = hidden.shape
    chunk = effective_chunk(n, chunk)
    pad = (-n) % chunk
    num_chunks = (n + pad) // chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(num_chunks, chunk, dim)
    targets = jnp.pad(targets, (0, pad)).reshape(num_chunks, chunk)
    active = jnp.pad(active, (0, pad)).reshape(num_chunks, chunk)
    logp, entropy = _scores(hidden, output_embedding, targets, active, float(temperature or 1.0),
                            jnp.dtype(logits_dtype))
    return logp.reshape(-1)[:n], entropy.reshape(-1)[:n]


def _log_probs(h: jax.Array, output_embedding: jax.Array, temperature: float,
               logits_dtype: jnp.dtype) -> jax.Array:
    """fp32 ``log softmax`` of one chunk's logits ``[chunk, V]``."""
    logits = jnp.einsum("ne,ve->nv", h, output_embedding.astype(h.dtype),
                        preferred_element_type=logits_dtype).astype(jnp.float32) / temperature
    return jax.nn.log_softmax(constrain(logits, (None, "act_vocab")), axis=-1)


def _active_chunks(active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices of the chunks holding an active token (first) and their number."""
    hit = active.any(axis=1)
    return jnp.nonzero(hit, size=hit.shape[0], fill_value=0)[0], jnp.sum(hit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _scores(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array, active: jax.Array,
            temperature: float, logits_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies ``[chunks, chunk]``; a loop over the active chunks only.

    A custom VJP: the backward pass recomputes each active chunk's softmax and forms its
    gradients ``d hidden = d logits @ E`` and ``d E += d logits^T @ hidden`` directly (the
    vocabulary projection four times in all, as a rematerialised scan), and the forward pass
    keeps nothing but its inputs. (Differentiating a scan of ``cond(active, score, skip)``
    instead makes the skipped branch return zeros for every residual of the scored one, the
    ``V x E`` output embedding among them: one zero-filled copy of it stacked per chunk.)
    """
    return _scores_fwd(hidden, output_embedding, targets, active, temperature, logits_dtype)[0]


def _scores_fwd(hidden, output_embedding, targets, active, temperature, logits_dtype):
    chunks, count = _active_chunks(active)

    def body(i: jax.Array, out: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        c = chunks[i]
        log_probs = _log_probs(hidden[c], output_embedding, temperature, logits_dtype)
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        logp = jnp.take_along_axis(log_probs, targets[c][:, None], axis=-1)[:, 0]
        a = active[c]
        return out[0].at[c].set(jnp.where(a, logp, 0.0)), out[1].at[c].set(jnp.where(a, entropy, 0.0))

    zeros = jnp.zeros(targets.shape, jnp.float32)
    out = jax.lax.fori_loop(0, count, body, (zeros, zeros))
    return out, (hidden, output_embedding, targets, active)


def _scores_bwd(temperature, logits_dtype, residuals, cotangents):
    hidden, output_embedding, targets, active = residuals
    d_logp = jnp.where(active, cotangents[0], 0.0)  # the entropy is a statistic: no gradient
    chunks, count = _active_chunks(active)

    def body(i: jax.Array, grads: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        d_hidden, d_embedding = grads
        c = chunks[i]
        h = hidden[c]
        probs = jnp.exp(_log_probs(h, output_embedding, temperature, logits_dtype))
        onehot = jax.nn.one_hot(targets[c], probs.shape[-1], dtype=jnp.float32)
        d_logits = ((onehot - probs) * (d_logp[c] / temperature)[:, None]).astype(h.dtype)
        d_h = jnp.einsum("nv,ve->ne", d_logits, output_embedding.astype(h.dtype),
                         preferred_element_type=jnp.float32)
        d_e = jnp.einsum("nv,ne->ve", d_logits, h, preferred_element_type=jnp.float32)
        return d_hidden.at[c].set(d_h.astype(hidden.dtype)), d_embedding + d_e

    init = (jnp.zeros_like(hidden), jnp.zeros(output_embedding.shape, jnp.float32))
    d_hidden, d_embedding = jax.lax.fori_loop(0, count, body, init)
    return d_hidden, d_embedding.astype(output_embedding.dtype), None, None


_scores.defvjp(_scores_fwd, _scores_bwd)
