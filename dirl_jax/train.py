"""``python -m dirl_jax.train --config configs/<name>.py [--config.a.b=v ...]``.

``task = "sft"``: blockwise diffusion SFT with exact gradient accumulation, orbax checkpoints with
exact resume, metrics, final held-out evaluation and HF export. ``task = "dipo"``: online RL
(:mod:`dirl_jax.dipo_train`)."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import logging as absl_logging
from flax import nnx
from ml_collections import ConfigDict, config_flags

from dirl_jax import diffusion, distributed
from dirl_jax import mesh as mesh_lib
from dirl_jax.checkpoint import start_or_resume
from dirl_jax.config import check_model_block_size, validate
from dirl_jax.data import sft as sft_data
from dirl_jax.data import toy
from dirl_jax.data.tokenizer import load_tokenizer
from dirl_jax.evaluate_builtin import builtin_eval_runs, evaluate_builtin
from dirl_jax.metrics import MetricsWriter, start_run_dir, write_json_atomic
from dirl_jax.model import SDARConfig, SDARForCausalLM, load_model, save_model
from dirl_jax.model.hf_io import resolve_dtype, resolve_model_dir
from dirl_jax.optim import learning_rate_schedule, make_optimizer

BUILTIN_TOKENIZER = "builtin:toy"


# ----------------------------------------------------------------------------- set-up
def build_tokenizer(config: ConfigDict):
    if config.tokenizer == BUILTIN_TOKENIZER:
        return toy.toy_tokenizer()
    return load_tokenizer(config.tokenizer or config.init_from)


def build_records(config: ConfigDict) -> tuple[list[Any], list[dict[str, Any]]]:
    """Training records and held-out evaluation records (question / answer; built-in task only)."""
    data = config.data
    if data.source == toy.BUILTIN_TASK:
        return toy.builtin_split(data.split_seed, data.builtin_train_size, data.builtin_eval_size,
                                 data.builtin_max_operand)
    return sft_data.read_records(data.source, data.split), []


def build_model_config(config: ConfigDict, tokenizer) -> SDARConfig:
    """The architecture: ``init_from``'s config.json, or ``config.model`` for a fresh model."""
    if config.init_from:
        model_config = SDARConfig.from_pretrained(resolve_model_dir(config.init_from))
        check_model_block_size(config, model_config.block_size)
        return model_config
    m = config.model
    return SDARConfig(
        vocab_size=m.vocab_size or len(tokenizer), hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim, block_size=m.block_size, mask_token_id=tokenizer.mask_token_id,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def build_model(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh
                ) -> SDARForCausalLM:
    """The model with every parameter created (or loaded) straight into its sharding on ``mesh``."""
    dtype = resolve_dtype(config.train.compute_dtype)
    param_dtype = resolve_dtype(config.train.param_dtype)
    if config.init_from:
        model, _ = load_model(config.init_from, dtype, param_dtype=param_dtype, mesh=mesh,
                              remat=config.model.remat)
        return model
    return mesh_lib.sharded_model(
        lambda: SDARForCausalLM(model_config, rngs=nnx.Rngs(config.seed), dtype=dtype,
                                param_dtype=param_dtype, remat=config.model.remat), mesh)


# ----------------------------------------------------------------------------- the step
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

    def train_step(params, opt_state, batch, key, step):
        def accumulate(carry, inputs):
            grads, ce, supervised, masked = carry
            micro_batch, row_keys = inputs
            (value, parts), g = jax.value_and_grad(numerator, has_aux=True)(params, micro_batch, row_keys)
            return (jax.tree.map(jnp.add, grads, g), ce + value, supervised + parts.num_supervised,
                    masked + parts.num_masked), None

        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32))
        keys = jax.random.split(key, batch["tokens"].shape[0] * batch["tokens"].shape[1])
        keys = keys.reshape(batch["tokens"].shape[:2])  # one noise key per row of the global batch
        (grads, ce, supervised, masked), _ = jax.lax.scan(accumulate, zeros, (batch, keys))
        denominator = jnp.maximum(supervised, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": ce / denominator, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(step), "masked_fraction": masked / denominator,
                   "supervised_tokens": supervised}
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


def step_key(base_key: jax.Array, step: int) -> jax.Array:
    """The noise key of a step: a pure function of (seed, step), the same on every host (the
    global batch's rows then get one key each), so a resumed run, or one split over other hosts
    or devices, draws exactly the noise of an uninterrupted single-process one."""
    return jax.random.fold_in(jax.random.fold_in(base_key, step), 0)


# ----------------------------------------------------------------------------- the run
def run_sft(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) SFT as configured; returns the final evaluation (if any)."""
    validate(config)
    tokenizer = build_tokenizer(config)
    train_records, eval_records = build_records(config)
    examples, _ = sft_data.prepare_examples(
        train_records, tokenizer, block_size=config.diffusion.block_size,
        max_length=config.data.max_length, overlong=config.data.overlong, source=config.data.source)
    model_config = build_model_config(config, tokenizer)
    shape = mesh_lib.mesh_shape(config.mesh, jax.device_count())
    mesh_lib.check_mesh_fits(shape, model_config, config.train.global_batch // config.train.grad_accum)
    mesh = mesh_lib.make_mesh(shape)
    model = build_model(config, model_config, mesh)

    # Everything was validated: from here on the run directory is written.
    run_dir = start_run_dir(config.run_dir, config.to_dict())
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if jax.process_index() == 0 and not os.path.isdir(tokenizer_dir):
        tokenizer.save_pretrained(tokenizer_dir + ".tmp")
        os.replace(tokenizer_dir + ".tmp", tokenizer_dir)

    train = config.train
    rows_per_host = train.global_batch // jax.process_count()
    micro = rows_per_host // train.grad_accum
    data_iter = iter(sft_data.packed_batches(
        examples, seq_len=config.data.max_length, rows=train.global_batch, seed=config.seed,
        pad_id=tokenizer.pad_token_id, process_index=jax.process_index(),
        process_count=jax.process_count(), packing_bins=config.data.packing_bins))
    tx = make_optimizer(train)
    graphdef, params, opt_state, checkpointer, start = start_or_resume(
        model, tx, run_dir, config.checkpoint, data_iter, mesh=mesh)
    train_step = make_train_step(graphdef, tx, config, model_config)
    base_key = jax.random.key(config.seed)
    writer = MetricsWriter(run_dir, resume_step=start, total_steps=train.num_steps,
                           enabled=jax.process_index() == 0)
    pending: list[tuple[int, dict[str, jax.Array], int]] = []
    last_time = time.time()
    for step in range(start, train.num_steps):
        batch = next(data_iter)
        real_tokens = int((batch["segment_ids"] >= 0).sum()) * jax.process_count()  # ~ global
        batch = mesh_lib.global_batch({k: v.reshape(train.grad_accum, micro, -1)
                                       for k, v in batch.items()}, mesh, row_axis=1)
        with jax.set_mesh(mesh):  # Pallas attention kernels then run per device
            params, opt_state, metrics = train_step(params, opt_state, batch,
                                                    step_key(base_key, step), step)
        pending.append((step + 1, metrics, real_tokens))
        checkpointer.save(step + 1, {"params": params, "opt_state": opt_state}, data_iter,
                          {"step": step + 1, "seed": config.seed}, force=step + 1 == train.num_steps)
        if (step + 1) % train.log_every == 0 or step + 1 == train.num_steps:
            fetched = jax.device_get([m for _, m, _ in pending])
            elapsed = (time.time() - last_time) / len(pending)
            writer.write([{"step": s, **{k: float(v) for k, v in m.items()},
                           "tokens_per_s": n / elapsed}
                          for (s, _, n), m in zip(pending, fetched)])
            pending, last_time = [], time.time()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    model = nnx.merge(graphdef, params)
    result: dict[str, Any] = {}
    if builtin_eval_runs(eval_records, config):
        result = evaluate_builtin(model, model_config, tokenizer, eval_records, config, run_dir)
        print(f"held-out accuracy {result['accuracy']:.3f} on {result['num_examples']} examples "
              f"({result['strategy']}, {result['tokens_per_step']:.2f} tokens/step)", flush=True)
        if jax.process_index() == 0:
            write_json_atomic(os.path.join(run_dir, "eval.json"), result)
    if config.export.enabled:
        save_model(model, model_config, os.path.join(run_dir, "export"), tokenizer_dir=tokenizer_dir,
                   dtype=config.export.dtype, overwrite=True)
    return result


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config configs/<name>.py is required")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    distributed.initialize_from_flags()  # multi-host: before any JAX computation
    if _CONFIG.value.task == "dipo":
        from dirl_jax.dipo_train import run_dipo
        run_dipo(_CONFIG.value)
    else:
        run_sft(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
