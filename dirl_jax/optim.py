"""Optimizer: AdamW with a weight-decay mask, warmup + cosine/constant schedule, clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(train: ConfigDict) -> optax.Schedule:
    """Linear warmup reaching the peak at update ``warmup_steps`` then cosine decay to
    ``min_lr_ratio * peak`` (or constant), counted in optimizer updates (DIRL_SPEC §4.7's logical
    steps): ``num_steps x ppo_iterations`` of them in DiPO. The first update already has a
    non-zero rate (the original's warmup starts at 0 and wastes its first update — §8.5)."""
    peak, warmup = train.learning_rate, train.warmup_steps
    total = train.num_steps * train.get("ppo_iterations", 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup else 1.0
        if train.schedule == "constant":
            return peak * warm
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return peak * warm * cosine

    return schedule


_UPDATE_COUNTERS = (optax.ScaleByScheduleState, optax.ScaleByAdamState)


def updates_so_far(opt_state: Any) -> jax.Array:
    """The optimizer's own update counter, the step its learning-rate schedule is at (0 before
    the first update; steps skipped without an update do not count)."""
    def is_counter(x: Any) -> bool:
        return isinstance(x, _UPDATE_COUNTERS)
    counters = [s for s in jax.tree.leaves(opt_state, is_leaf=is_counter) if is_counter(s)]
    if not counters:
        raise ValueError("the optimizer state has no update counter (an optax schedule or Adam state)")
    return counters[0].count


def decay_mask(params: Any, decay_norms: bool) -> Any:
    """True for parameters that get weight decay: everything but norm scales unless configured."""
    def keep(path: tuple[Any, ...], _: Any) -> bool:
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        return decay_norms or "norm" not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train: ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.adam_eps,
                    weight_decay=train.weight_decay,
                    mask=lambda params: decay_mask(params, train.decay_norms)),
    )
