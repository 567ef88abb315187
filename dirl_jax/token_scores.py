"""Per-token log-probabilities and entropies against a large vocabulary, a chunk at a time.

``tokens x vocab`` logits are never materialised: hidden states are scored against the output
embedding ``chunk`` tokens at a time inside a rematerialised scan, so forward and backward memory
is O(chunk x vocab). Chunks with no active token are skipped. The SFT cross-entropy and the DiPO
objective both score tokens through here.

Callers put active tokens first, so at most one computed chunk is partly active: its inactive rows
are wasted work. The chunk is therefore capped at a quarter of the tokens (never below
``MIN_CHUNK`` rows), which bounds that waste by a quarter of the whole projection; a large
batch keeps the configured chunk. (Without the cap, 512 tokens of which 256 are masked, scored
with the default chunk of 1,024, cost the vocabulary projection of 1,024 rows: 4x the need.)
"""

from __future__ import annotations

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
    temperature = temperature or 1.0

    @jax.checkpoint
    def score(h: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = jnp.einsum("ne,ve->nv", h, output_embedding.astype(h.dtype),
                            preferred_element_type=logits_dtype).astype(jnp.float32) / temperature
        logits = constrain(logits, (None, "act_vocab"))
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        return jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0], jax.lax.stop_gradient(entropy)

    def skipped(h: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros(y.shape, jnp.float32)
        return zeros, zeros

    def body(xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, y, a = xs
        logp, entropy = jax.lax.cond(jnp.any(a), score, skipped, h, y)
        return jnp.where(a, logp, 0.0), jnp.where(a, entropy, 0.0)

    logp, entropy = jax.lax.map(body, (hidden, targets, active))
    return logp.reshape(-1)[:n], entropy.reshape(-1)[:n]
