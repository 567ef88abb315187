"""What a block-diffusion decoder samples: the static decoding settings, the proposal
(greedy, or temperature with optional top-k / top-p) and the logit constraints. The decoder that
runs them is :mod:`dirl_jax.rollout.decoder`.

The confidence of a candidate is its probability under the full temperature-scaled distribution
(top-k / top-p only restrict what is proposed), and its log-probability under that distribution
is what DiPO optimises.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dirl_jax.config import DECODING_FIELDS
from dirl_jax.rollout import unmasking


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding settings (one compiled program per distinct value).

    ``temperature == 0`` is greedy (argmax proposals, confidences and log-probs under T = 1, as in
    LMDeploy). ``top_k = 0`` and ``top_p = 1`` disable those filters. ``steps`` defaults to the
    block size.
    """

    block_size: int
    mask_token_id: int
    strategy: str = "low_confidence_dynamic"
    steps: int | None = None
    threshold: float = 0.9
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0               # stop tokens are never sampled before this many tokens
    banned_ids: tuple[int, ...] = ()      # tokens never sampled (LMDeploy's bad_words)
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in unmasking.STRATEGIES:
            raise ValueError(f"strategy: unknown {self.strategy!r}; available: "
                             f"{', '.join(unmasking.STRATEGIES)}")
        checks = [("block_size", self.block_size >= 1, "must be >= 1"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature >= 0, "must be >= 0"),
                  ("top_k", self.top_k >= 0, "must be >= 0 (0 disables)"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("threshold", 0 <= self.threshold <= 1, "must be in [0, 1]"),
                  ("steps", self.steps is None or 1 <= self.steps <= self.block_size,
                   f"must be in [1, block_size = {self.block_size}]"),
                  ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens,
                   "must be in [0, max_new_tokens]")]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, block_size: int, mask_token_id: int,
                    stop_ids: Sequence[int] = (), banned_ids: Sequence[int] = (),
                    attn_impl: str = "auto") -> SamplingConfig:
        """The settings of a config section's decoding fields (``dirl_jax.config.DECODING_FIELDS``,
        the same in DiPO's ``rollout``, the built-in ``eval`` and a benchmark evaluation;
        ``steps = 0`` means the block size) for a model's block size and mask token."""
        values = {name: fields[name] for name in DECODING_FIELDS}
        return cls(block_size=block_size, mask_token_id=mask_token_id,
                   **{**values, "steps": values["steps"] or None},
                   stop_ids=tuple(int(t) for t in stop_ids),
                   banned_ids=tuple(int(t) for t in banned_ids), attn_impl=attn_impl)

    @property
    def denoising_steps(self) -> int:
        return self.block_size if self.steps is None else self.steps


def proposal_set(scaled: jax.Array, top_k: int, top_p: float) -> tuple[jax.Array, jax.Array]:
    """LMDeploy's proposal set, on a copy of ``scaled [N, vocab]`` sorted best first: the
    ``top_k`` best tokens by rank (exactly k, ties at the k-th score included in sort order; all
    when 0), then those whose probability mass before them is at most ``top_p`` (the best always
    stays). Returns the sorted logits, ``-inf`` outside the set, and their token ids."""
    if top_k and top_k < scaled.shape[-1]:
        scores, ids = jax.lax.top_k(scaled, top_k)
    else:
        ids = jnp.argsort(scaled, axis=-1, descending=True, stable=True)
        scores = jnp.take_along_axis(scaled, ids, axis=-1)
    if top_p < 1:
        probs = jax.nn.softmax(scores, axis=-1)
        beyond = (jnp.cumsum(probs, axis=-1) - probs) > top_p
        scores = jnp.where(beyond.at[..., 0].set(False), -jnp.inf, scores)
    return scores, ids


def constrain_logits(logits: jax.Array, generated_before: jax.Array, cfg: SamplingConfig
                     ) -> jax.Array:
    """``-inf`` for banned tokens everywhere, and for stop tokens while ``min_new_tokens`` is
    unmet: in every position of a block whose row had generated fewer tokens before it
    (``generated_before``, one per row of ``logits``), as LMDeploy's per-block ``num_ignore_eos``."""
    if cfg.banned_ids:
        logits = logits.at[..., jnp.asarray(cfg.banned_ids)].set(-jnp.inf)
    if cfg.min_new_tokens and cfg.stop_ids:
        early = (generated_before < cfg.min_new_tokens)[..., None]
        is_stop = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(cfg.stop_ids)].set(True)
        logits = jnp.where(early & is_stop, -jnp.inf, logits)
    return logits


def propose(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Candidates ``[N]`` for logits ``[N, vocab]`` (one key per position) and their
    log-probabilities under the full temperature-scaled distribution."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1), jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)
    scaled = logits / cfg.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if cfg.top_k or cfg.top_p < 1:
        scores, ids = proposal_set(scaled, cfg.top_k, cfg.top_p)
        ranks = jax.vmap(jax.random.categorical)(keys, scores)
        candidates = jnp.take_along_axis(ids, ranks[..., None], axis=-1)[..., 0]
    else:
        candidates = jax.vmap(jax.random.categorical)(keys, scaled)
    return candidates, jnp.take_along_axis(logp, candidates[..., None], axis=-1)[..., 0]


def response_stats(token_ids: Sequence[int], step_map: Sequence[int], stop_ids: Sequence[int]
                   ) -> dict[str, Any]:
    """``length`` (tokens up to and including the first stop id, else all), ``num_steps`` (the
    denoising steps that committed tokens) and ``tokens_per_step`` of one response."""
    stop_at = np.flatnonzero(np.isin(np.asarray(token_ids), np.asarray(stop_ids, np.int64)))
    num_steps = int(np.max(step_map, initial=0))
    return {"length": int(stop_at[0]) + 1 if len(stop_at) else len(token_ids),
            "num_steps": num_steps, "tokens_per_step": len(token_ids) / max(1, num_steps)}
