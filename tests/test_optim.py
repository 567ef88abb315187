"""The learning-rate schedule, counted in optimizer updates, and the rate the trainers log."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_model, tiny_config
from dirl_jax.config import dipo_defaults
from dirl_jax.mesh import make_mesh
from dirl_jax.optim import learning_rate_schedule, make_optimizer, updates_so_far
from dirl_jax.trainers.steps import Updater


def train_config(**fields):
    train = dipo_defaults().train
    train.update(learning_rate=1.0, weight_decay=0.0, **fields)
    return train


def test_warmup_reaches_the_peak_at_update_warmup_steps():
    """The first update already moves (DIRL_SPEC §8.5), the peak comes at update ``warmup_steps``."""
    schedule = learning_rate_schedule(train_config(warmup_steps=4, schedule="constant"))
    np.testing.assert_allclose([float(schedule(k)) for k in range(6)], [0.25, 0.5, 0.75, 1, 1, 1])


def test_the_cosine_horizon_counts_every_ppo_iteration():
    """``num_steps x ppo_iterations`` updates: halfway at update 5 of 5 x 2, the floor at 10."""
    schedule = learning_rate_schedule(train_config(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1,
                                                   num_steps=5, ppo_iterations=2))
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(5)) == pytest.approx(0.1 + 0.9 * 0.5)
    assert float(schedule(10)) == pytest.approx(0.1)


def test_the_update_counter_is_the_optimizers_own():
    """With constant gradients Adam moves every weight by exactly the rate it applies: the
    schedule at :func:`updates_so_far` of the state before each update."""
    train = train_config(warmup_steps=3, schedule="constant")
    tx, schedule = make_optimizer(train), learning_rate_schedule(train)
    params = {"w": jnp.zeros(8)}
    state = tx.init(params)
    for k in range(5):
        assert int(updates_so_far(state)) == k
        updates, state = tx.update({"w": jnp.ones(8)}, state, params)
        np.testing.assert_allclose(np.abs(np.asarray(updates["w"])), float(schedule(k)), rtol=1e-5)
    with pytest.raises(ValueError, match="no update counter"):
        updates_so_far(())


def test_dipo_logs_the_rate_each_update_applies(seed):
    """The Updater's logged ``lr`` equals the step Adam takes under constant gradients, update
    after update (an RL-step-based log ran one warmup step ahead)."""
    config = dipo_defaults()
    config.train.update(learning_rate=1e-3, weight_decay=0.0, warmup_steps=3, schedule="constant")
    graphdef, params = nnx.split(random_model(tiny_config(block_size=4), seed), nnx.Param)
    tx = make_optimizer(config.train)
    updater = Updater(graphdef, tx, config, make_mesh((1, 1, 1), jax.devices()[:1]))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)  # under the clipping norm
    logged = []
    for _ in range(4):
        before = np.asarray(jax.tree.leaves(params)[0])
        params, opt_state, stats = updater._apply(params, opt_state, grads)
        step = np.abs(np.asarray(jax.tree.leaves(params)[0]) - before).max()
        assert float(stats["lr"]) == pytest.approx(step, rel=1e-3)
        logged.append(float(stats["lr"]))
    np.testing.assert_allclose(logged, [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rtol=1e-6)
