"""Blockwise-diffusion SFT (``task = "sft"``): one compiled step per global batch with exact
gradient accumulation (:func:`dirl_jax.trainers.steps.make_train_step`), orbax checkpoints with
exact resume, metrics, the built-in held-out evaluation and the HF export. The set-up is :mod:`dirl_jax.run`'s."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import console, run
from dirl_jax import mesh as mesh_lib
from dirl_jax.checkpoint import start_or_resume
from dirl_jax.data import sft as sft_data
from dirl_jax.evaluation.builtin import builtin_eval_runs, evaluate_builtin
from dirl_jax.metrics import format_duration, write_json_atomic
from dirl_jax.optim import make_optimizer
from dirl_jax.run_lock import unlock_run_dir
from dirl_jax.trainers.steps import make_train_step


# ----------------------------------------------------------------------------- noise keys
def step_key(base_key: jax.Array, step: int) -> jax.Array:
    """The noise key of a step: a pure function of (seed, step), the same on every host (the
    global batch's rows then get one key each), so a resumed run, or one split over other hosts
    or devices, draws exactly the noise of an uninterrupted single-process one."""
    return jax.random.fold_in(jax.random.fold_in(base_key, step), 0)


# ----------------------------------------------------------------------------- the run
def run_sft(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) SFT as configured; returns the final evaluation (if any)."""
    run.validate_sft(config)
    run.check_same_split(config)
    tokenizer = run.build_tokenizer(config)
    train_records, eval_records = run.sft_records(config)
    examples, _ = sft_data.prepare_examples(
        train_records, tokenizer, block_size=config.diffusion.block_size,
        max_length=config.data.max_length, overlong=config.data.overlong, source=config.data.source)
    model_config = run.build_model_config(config, tokenizer)
    mesh = run.build_mesh(config, model_config, config.train.global_batch // config.train.grad_accum,
                          rows_field="train.global_batch")
    model = run.build_model(config, model_config, mesh)

    # Everything was validated: from here on the run directory is written.
    run_dir, tokenizer_dir = run.start_run(config, tokenizer)

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
    writer = run.metrics_writer(config, run_dir, start)
    started = time.time()
    console.start_banner("sft", run_dir, model_config, params, mesh, start=start,
                         total=train.num_steps,
                         detail=f"{len(examples)} training examples, global batch {train.global_batch}")
    pending: list[tuple[int, dict[str, jax.Array], int]] = []
    last_time = time.time()
    for step in range(start, train.num_steps):
        batch = next(data_iter)
        real_tokens = int((batch["segment_ids"] >= 0).sum()) * jax.process_count()  # ~ global
        batch = mesh_lib.global_batch({k: v.reshape(train.grad_accum, micro, -1)
                                       for k, v in batch.items()}, mesh, row_axis=1)
        with jax.set_mesh(mesh):  # Pallas attention kernels then run per device
            params, opt_state, metrics = train_step(params, opt_state, batch,
                                                    step_key(base_key, step))
        pending.append((step + 1, metrics, real_tokens))
        last = step + 1 == train.num_steps
        # rows reach metrics.jsonl before the checkpoint of their step: a resume never loses one
        if (step + 1) % train.log_every == 0 or last or checkpointer.should_save(step + 1):
            fetched = jax.device_get([m for _, m, _ in pending])
            elapsed = (time.time() - last_time) / len(pending)
            writer.write([{"step": s, **{k: float(v) for k, v in m.items()},
                           "tokens_per_s": n / elapsed}
                          for (s, _, n), m in zip(pending, fetched)])
            pending, last_time = [], time.time()
        checkpointer.save(step + 1, {"params": params, "opt_state": opt_state}, data_iter,
                          {"step": step + 1, "seed": config.seed}, force=last)
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
    run.export(config, model, model_config, run_dir, tokenizer_dir)
    run.draw_curves(run_dir)
    accuracy = f"; held-out accuracy {result['accuracy']:.3f}" if result else ""
    console.closing_lines(f"sft done: steps {start + 1}-{train.num_steps} in "
                          f"{format_duration(time.time() - started)}{accuracy}",
                          console.run_outputs(run_dir))
    unlock_run_dir(run_dir)
    return result
