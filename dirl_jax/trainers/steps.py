"""The compiled update steps of both trainers, free of the run machinery (data pipelines,
checkpoints, evaluation): the SFT step (:func:`make_train_step`) and the DiPO update
(:class:`Updater`). Benchmarks and ``scripts/accelerator_check.py`` time exactly these."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import diffusion, dipo
from dirl_jax import mesh as mesh_lib
from dirl_jax.model import SDARConfig
from dirl_jax.optim import learning_rate_schedule, updates_so_far
from dirl_jax.sharding import named_shardings


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ConfigDict,
                    model_config: SDARConfig):
    """One optimizer update per global batch ``[grad_accum, micro_batch, L]``: gradients of the
    loss numerators are summed over micro-batches and divided by the global number of
    supervised tokens, so any split of the batch gives the same update."""
    loss_parts = functools.partial(
        diffusion.sft_loss_parts, block_size=config.diffusion.block_size,
        mask_token_id=model_config.mask_token_id, eps=config.diffusion.eps,
        chunk=config.diffusion.loss_chunk, attn_impl=config.model.attention_impl,
        block_aligned=True)  # samples are padded to whole blocks before packing
    schedule = learning_rate_schedule(config.train)

    def numerator(params, micro_batch, row_keys):
        parts = loss_parts(nnx.merge(graphdef, params), micro_batch, row_keys)
        return parts.weighted_ce_sum, parts

    def micro_step(params, micro_batch, row_keys):
        """Gradient of one micro-batch's loss numerator, the numerator and the token counts."""
        (value, parts), grads = jax.value_and_grad(numerator, has_aux=True)(params, micro_batch, row_keys)
        return grads, value, parts.num_supervised, parts.num_masked

    def train_step(params, opt_state, batch, key):
        keys = jax.random.split(key, batch["tokens"].shape[0] * batch["tokens"].shape[1])
        keys = keys.reshape(batch["tokens"].shape[:2])  # one noise key per row of the global batch
        if batch["tokens"].shape[0] == 1:  # no accumulator: a zero-filled copy of the gradients saved
            grads, ce, supervised, masked = micro_step(params, jax.tree.map(lambda x: x[0], batch),
                                                       keys[0])
        else:
            def accumulate(carry, inputs):
                return jax.tree.map(jnp.add, carry, micro_step(params, *inputs)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros((), jnp.int32),
                     jnp.zeros((), jnp.int32))
            (grads, ce, supervised, masked), _ = jax.lax.scan(accumulate, zeros, (batch, keys))
        denominator = jnp.maximum(supervised, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        lr = schedule(updates_so_far(opt_state))  # the rate this update applies
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        metrics = {"loss": ce / denominator, "grad_norm": optax.tree.norm(grads),
                   "lr": lr, "masked_fraction": masked / denominator,
                   "supervised_tokens": supervised}
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


class Updater:
    """The jitted pieces of one DiPO update: per-micro-batch gradients (summed, since the loss
    weights are normalised over the whole rollout batch), one AdamW step per PPO iteration, and
    log-prob scoring for the frozen reference and trainer-side old log-probs."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ConfigDict,
                 mesh: jax.sharding.Mesh):
        self.mesh = mesh
        t = config.train
        self.loss_cfg = dipo.LossConfig(eps_low=t.eps_low, eps_high=t.eps_high,
                                        log_ratio_clamp=t.log_ratio_clamp, beta=t.kl_beta)
        score_kwargs = dict(temperature=config.rollout.temperature,
                            attn_impl=config.model.attention_impl, chunk=t.logprob_chunk)
        schedule = learning_rate_schedule(t)

        def objective(params, batch):
            return dipo.dipo_objective(nnx.merge(graphdef, params), batch, self.loss_cfg,
                                       **score_kwargs)

        @jax.jit
        def gradients(params, batch):
            (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
            # sharded as the parameters: left to XLA, the gradients came back replicated
            # (8B on v5p-64: 28.5 GiB per chip instead of 3.8 GiB)
            grads = jax.lax.with_sharding_constraint(grads, named_shardings(params, mesh))
            return grads, {**stats, "loss": loss}

        @functools.partial(jax.jit, donate_argnums=0)
        def accumulate(total, grads):
            return jax.tree.map(jnp.add, total, grads)

        @functools.partial(jax.jit, donate_argnums=1)  # params stay: the engine shares them
        def apply(params, opt_state, grads):
            stats = {"grad_norm": optax.tree.norm(grads), "lr": schedule(updates_so_far(opt_state))}
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, stats

        @jax.jit
        def score(params, batch):
            return dipo.score_tokens(nnx.merge(graphdef, params), batch, **score_kwargs)[0]

        self._gradients, self._accumulate, self._apply, self._score = gradients, accumulate, apply, score
        # the compiled programs of an update, by name (dirl_jax.sizing compiles them ahead of time)
        self.programs = {"dipo_gradients": gradients, "dipo_apply": apply, "dipo_score": score}

    def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A micro-batch (the same on every host) on the mesh: canvas rows over
        ``data x fsdp``, scored tokens replicated (they index the rows)."""
        return {k: mesh_lib.from_host_copy(v, mesh_lib.batch_sharding(self.mesh, 2, 0) if v.ndim == 2
                                           else mesh_lib.replicated(self.mesh))
                for k, v in batch.items()}

    def score(self, params, batch: dict[str, jax.Array]) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._score(params, batch)

    def step(self, params, opt_state, micro_batches: list[dict[str, jax.Array]]):
        """One optimizer update over every micro-batch of the rollout batch."""
        total, per_batch = None, []
        with jax.set_mesh(self.mesh):  # Pallas attention kernels then run per device
            for batch in micro_batches:  # no host sync inside: statistics are fetched once
                grads, stats = self._gradients(params, batch)
                total = grads if total is None else self._accumulate(total, grads)
                per_batch.append(stats)
            params, opt_state, stats = self._apply(params, opt_state, total)
        per_batch, stats = jax.device_get((per_batch, stats))
        per_batch = [{k: float(v) for k, v in s.items()} for s in per_batch]
        stats = {**dipo.reduce_stats(per_batch), "loss": sum(s["loss"] for s in per_batch),
                 **{k: float(v) for k, v in stats.items()}}
        return params, opt_state, stats
