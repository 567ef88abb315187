"""Blockwise masked diffusion: SFT noising and the 1/p-weighted cross-entropy (DIRL_SPEC §1.3-§1.5).

The cross-entropy never materialises ``tokens x vocab`` logits (see
:mod:`dirl_jax.token_scores`); masked positions are moved to the front first, and chunks holding
no masked token are skipped.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dirl_jax import canvas as canvas_lib
from dirl_jax.token_scores import chunked_token_scores

IGNORE = -100  # the label of a token that carries no loss (Hugging Face's ignore index)


class Noised(NamedTuple):
    noisy_tokens: jax.Array  # [B, L] with mask_token_id at masked positions
    masked: jax.Array        # bool [B, L]
    p: jax.Array             # [B, L] masking probability of each token's segment


def noise_row(key: jax.Array, tokens: jax.Array, labels: jax.Array, segment_ids: jax.Array, *,
              mask_token_id: int, eps: float = 1e-3, max_tries: int = 10) -> Noised:
    """DiRL's ``forward_add_noise_packed`` for one row ``[L]``, vectorised over tries.

    Per try, each segment draws ``t ~ U(0,1)``, ``p = (1-eps) t + eps``, and every supervised
    token (label != -100) of the segment is masked with probability ``p``. The row takes its
    first try that masks at least one token; if none of the ``max_tries`` does, one supervised
    token chosen uniformly is masked, with ``p`` of the last try. A row without supervised
    tokens stays clean.
    """
    length = tokens.shape[0]
    eligible = labels != IGNORE
    k_t, k_u, k_force = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (max_tries, length))  # one t per (try, segment id)
    segment = jnp.broadcast_to(jnp.clip(segment_ids, 0, length - 1), t.shape)
    p_tries = (1.0 - eps) * jnp.take_along_axis(t, segment, axis=-1) + eps
    mask_tries = (jax.random.uniform(k_u, t.shape) < p_tries) & eligible
    hit = mask_tries.any(axis=-1)
    found = hit.any()
    chosen = jnp.where(found, jnp.argmax(hit), max_tries - 1)
    scores = jnp.where(eligible, jax.random.uniform(k_force, (length,)), -1.0)
    forced = (jnp.arange(length) == jnp.argmax(scores)) & eligible
    masked = jnp.where(found, mask_tries[chosen], forced)
    return Noised(jnp.where(masked, mask_token_id, tokens), masked, p_tries[chosen])


@jax.named_scope("noise")
def noise_batch(keys: jax.Array, tokens: jax.Array, labels: jax.Array, segment_ids: jax.Array,
                **kwargs) -> Noised:
    """:func:`noise_row` over a batch, one key per row (so noise does not depend on how a
    global batch is split into micro-batches)."""
    return jax.vmap(functools.partial(noise_row, **kwargs))(keys, tokens, labels, segment_ids)


def chunked_weighted_cross_entropy(hidden: jax.Array, output_embedding: jax.Array,
                                   targets: jax.Array, weights: jax.Array, *,
                                   chunk: int) -> jax.Array:
    """``sum_i weights_i * CE(hidden_i @ output_embedding.T, targets_i)`` in fp32.

    ``hidden [N, E]``, ``output_embedding [V, E]``, ``targets, weights [N]``. Tokens with zero
    weight are moved to the back so that chunks of only zero weights are skipped
    (:func:`~dirl_jax.token_scores.chunked_token_scores`).
    """
    order = jnp.argsort(weights == 0, stable=True)
    weights = weights[order].astype(jnp.float32)
    logp, _ = chunked_token_scores(hidden[order], output_embedding, targets[order], weights != 0,
                                   chunk=chunk)
    return -jnp.sum(weights * logp)


class LossParts(NamedTuple):
    weighted_ce_sum: jax.Array  # sum over masked tokens of CE / p
    num_supervised: jax.Array   # tokens with label != -100 (the loss denominator)
    num_masked: jax.Array


def sft_loss_parts(model, batch: dict[str, jax.Array], row_keys: jax.Array, *, block_size: int,
                   mask_token_id: int, eps: float, chunk: int, attn_impl: str = "auto",
                   block_aligned: bool = False) -> LossParts:
    """Numerator and denominator of the SFT loss ``sum_masked CE/p / N_supervised`` for a batch
    noised with one key per row.

    The loss of a global batch split into micro-batches is the sum of numerators over the sum of
    denominators, which makes gradient accumulation exact.
    """
    noised = noise_batch(row_keys, batch["tokens"], batch["labels"], batch["segment_ids"],
                         mask_token_id=mask_token_id, eps=eps)
    return masked_loss_parts(model, batch, noised, block_size=block_size, chunk=chunk,
                             attn_impl=attn_impl, block_aligned=block_aligned)


def masked_loss_parts(model, batch: dict[str, jax.Array], noised: Noised, *, block_size: int,
                      chunk: int, attn_impl: str = "auto", block_aligned: bool = False) -> LossParts:
    """The loss parts for given masks and probabilities: a two-stream forward, then the
    1/p-weighted cross-entropy at the masked noisy positions (no label shift).

    ``block_aligned`` promises that every packed sample starts at a multiple of ``block_size``
    (the SFT packer guarantees it); the canvas is then a static
    :class:`~dirl_jax.canvas.StreamMajorLayout` and ``auto`` may run Splash on TPU.
    """
    tokens, labels = batch["tokens"], batch["labels"]
    canvas, noisy_slot = canvas_lib.two_stream_canvas(
        tokens, noised.noisy_tokens, batch["positions"], batch["segment_ids"], block_size)
    layout = None
    if block_aligned and tokens.shape[1] % block_size == 0:
        layout = canvas_lib.StreamMajorLayout(tokens.shape[1], block_size, rounds=1)
    hidden = model.hidden_states(canvas=canvas, attn_impl=attn_impl, attn_layout=layout)
    hidden_noisy = jnp.take_along_axis(hidden, noisy_slot[..., None], axis=1)
    weights = jnp.where(noised.masked, 1.0 / noised.p, 0.0)
    ce = chunked_weighted_cross_entropy(
        hidden_noisy.reshape(-1, hidden.shape[-1]), model.output_embedding(),
        tokens.reshape(-1), weights.reshape(-1), chunk=chunk)
    return LossParts(ce, jnp.sum(labels != IGNORE), jnp.sum(noised.masked))
