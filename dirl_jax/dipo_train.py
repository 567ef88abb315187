"""The online DiPO loop: rollouts → rewards → dynamic sampling → trajectory-exact updates → weights.

Each step samples ``group_size`` responses for ``prompts_per_step`` prompts with the in-process
engine (the trainer's own parameters), grades them, keeps the groups whose accuracy is mixed
(refilling from new prompts for at most ``max_sampling_rounds`` rounds), packs every kept
trajectory into the single-pass multi-round canvas, and runs ``ppo_iterations`` AdamW updates of
the DiPO objective with the sampler's log-probs as the old policy. At the first iteration the
trainer's log-probs must equal the sampler's: ``|log ratio|`` above ``train.max_log_ratio`` stops
the run. The new parameters go to the engine without leaving the device.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import dipo
from dirl_jax.checkpoint import start_or_resume
from dirl_jax.config import validate_dipo
from dirl_jax.data import rl as rl_data
from dirl_jax.data import sft as sft_data
from dirl_jax.data import toy
from dirl_jax.data.tokenizer import load_tokenizer, stop_token_ids
from dirl_jax.evaluate_builtin import evaluate_builtin
from dirl_jax.metrics import MetricsWriter, write_json_atomic
from dirl_jax.model import load_model, save_model
from dirl_jax.model.hf_io import resolve_dtype
from dirl_jax.optim import learning_rate_schedule, make_optimizer
from dirl_jax.rewards import Response, grade, weighted_rewards
from dirl_jax.rollout.engine import InProcessEngine
from dirl_jax.rollout.sampler import SamplingConfig

log = logging.getLogger(__name__)


def _model_dir(init_from: str) -> str:
    """An SFT run directory stands for its HF export."""
    export = os.path.join(init_from, "export")
    return export if os.path.isfile(os.path.join(export, "config.json")) else init_from


def build_prompts(config: ConfigDict, tokenizer) -> tuple[list[list[int]], list[str], list[dict]]:
    """Prompt token ids and gold answers of the RL records, and held-out eval records (builtin)."""
    data = config.data
    if data.source == "builtin:arithmetic":
        records = toy.arithmetic_records(config.seed, data.builtin_train_size + data.builtin_eval_size,
                                         max_operand=data.builtin_max_operand)
        train, held_out = records[:data.builtin_train_size], records[data.builtin_train_size:]
        prompts = [sft_data.encode_prompt(r["messages"][:-1], tokenizer) for r in train]
        return prompts, [r["answer"] for r in train], held_out
    template = data.prompt_template or rl_data.DEFAULT_TEMPLATE
    records = rl_data.load_prompt_records(data.source, data.split)
    prompts = [tokenizer.encode(rl_data.render_prompt(r.question, template), add_special_tokens=False)
               for r in records]
    return prompts, [r.answer for r in records], []


def make_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ConfigDict):
    t = config.train
    loss_cfg = dipo.LossConfig(eps_low=t.eps_low, eps_high=t.eps_high,
                               log_ratio_clamp=t.log_ratio_clamp)
    schedule = learning_rate_schedule(t)

    @jax.jit
    def update(params, opt_state, batch, step):
        def objective(params):
            return dipo.dipo_objective(nnx.merge(graphdef, params), batch, loss_cfg,
                                       temperature=config.rollout.temperature,
                                       attn_impl=config.model.attention_impl)

        (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        stats = {**stats, "loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return optax.apply_updates(params, updates), opt_state, stats

    return update


def collect_groups(engine: InProcessEngine, stream, prompts: list[list[int]], answers: list[str],
                   tokenizer, sampling: SamplingConfig, config: ConfigDict, step: int
                   ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sampled, graded groups; with dynamic sampling only the informative ones (bounded refill)."""
    r, t = config.rollout, config.train
    stop_ids = set(sampling.stop_ids)
    kept, stats = [], {"rollout_s": 0.0, "reward_s": 0.0, "generated_tokens": 0, "groups_sampled": 0}
    accuracy = []
    for sampling_round in range(t.max_sampling_rounds):
        indices = next(stream)
        batch_prompts = [prompts[i] for i in indices for _ in range(r.group_size)]
        start = time.time()
        results = engine.generate(batch_prompts, sampling,
                                  seed=(config.seed * 1_000_003 + step) * 31 + sampling_round)
        stats["rollout_s"] += time.time() - start
        start = time.time()
        responses = []
        for prompt_index, result in zip(np.repeat(indices, r.group_size), results):
            text = tokenizer.decode(result["token_ids"][:result["length"]])
            correct = grade(text, answers[prompt_index], timeout=config.rewards.grade_timeout)
            responses.append(Response(text=text, correct=correct, num_tokens=len(result["token_ids"]),
                                      max_tokens=r.max_new_tokens,
                                      truncated=result["finish_reason"] == "length"
                                      and not stop_ids & set(result["token_ids"])))
        rewards = weighted_rewards(responses, list(config.rewards.names),
                                   list(config.rewards.weights) or None).reshape(-1, r.group_size)
        correct = np.array([x.correct for x in responses]).reshape(-1, r.group_size)
        stats["reward_s"] += time.time() - start
        stats["generated_tokens"] += sum(len(x["token_ids"]) for x in results)
        stats["groups_sampled"] += len(indices)
        accuracy.append(correct.mean())
        informative = dipo.informative_groups(correct) if t.dynamic_sampling else np.ones(len(indices), bool)
        advantages = dipo.group_advantages(rewards, t.advantage)
        for g in np.flatnonzero(informative):
            members = range(g * r.group_size, (g + 1) * r.group_size)
            kept.append({"prompt": prompts[indices[g]], "results": [results[i] for i in members],
                         "advantages": advantages[g], "rewards": rewards[g]})
        if len(kept) >= r.prompts_per_step:
            break
    else:
        log.warning("step %d: %d informative groups after %d sampling rounds (wanted %d)", step,
                    len(kept), t.max_sampling_rounds, r.prompts_per_step)
    stats["rollout_accuracy"] = float(np.mean(accuracy))
    stats["groups_kept"] = min(len(kept), r.prompts_per_step)
    return kept[:r.prompts_per_step], stats


def pack_groups(groups: list[dict[str, Any]], model_config, config: ConfigDict) -> dict[str, jax.Array]:
    trajectories = [dipo.Trajectory(g["prompt"], res["token_ids"], res["step_map"], res["length"],
                                    float(a))
                    for g in groups for res, a in zip(g["results"], g["advantages"])]
    results = [res for g in groups for res in g["results"]]
    packed = dipo.pack_rounds(trajectories, block_size=model_config.block_size,
                              mask_token_id=model_config.mask_token_id,
                              row_length=config.train.row_length)
    position = packed.canvas.positions[packed.score_row, packed.score_slot]
    old = np.array([results[i]["logprobs"][p - len(trajectories[i].prompt)]
                    for i, p in zip(packed.score_trajectory, position)], np.float32)
    t = config.train
    try:
        arrays = dipo.batch_arrays(packed, trajectories, old, rows=t.canvas_rows,
                                   num_scored=t.canvas_rows * t.row_length)
    except ValueError as e:
        raise ValueError(f"{e}: raise config.train.canvas_rows or config.train.row_length") from e
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def run_dipo(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) DiPO as configured; returns the last held-out evaluation (if any)."""
    validate_dipo(config)
    model_dir = _model_dir(config.init_from)
    tokenizer = load_tokenizer(config.tokenizer or model_dir)
    t, r = config.train, config.rollout
    model, model_config = load_model(model_dir, resolve_dtype(t.compute_dtype),
                                     param_dtype=resolve_dtype(t.param_dtype), remat=config.model.remat)
    prompts, answers, held_out = build_prompts(config, tokenizer)

    run_dir = os.path.abspath(config.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "config.json"), config.to_dict())
    stop_ids = stop_token_ids(tokenizer)
    sampling = SamplingConfig(block_size=model_config.block_size,
                              mask_token_id=model_config.mask_token_id, strategy=r.strategy,
                              steps=r.steps or None, threshold=r.threshold,
                              max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_k=r.top_k, top_p=r.top_p, stop_ids=stop_ids,
                              attn_impl=config.model.attention_impl)
    engine = InProcessEngine(model, pad_token_id=tokenizer.pad_token_id or 0)
    stream = iter(rl_data.prompt_batches(len(prompts), prompts_per_step=r.prompts_per_step,
                                         seed=config.seed, process_index=jax.process_index(),
                                         process_count=jax.process_count()))
    tx = make_optimizer(t)
    graphdef, params, opt_state, checkpointer, start = start_or_resume(
        model, tx, run_dir, config.checkpoint, stream)
    if start:
        engine.update_weights(params)
    update = make_update(graphdef, tx, config)
    writer = MetricsWriter(run_dir, resume_step=start, total_steps=t.num_steps,
                           enabled=jax.process_index() == 0)

    def evaluate(step: int) -> dict[str, Any]:
        if not held_out or config.eval.num_examples <= 0:
            return {}
        result = evaluate_builtin(engine.model, model_config, tokenizer, held_out, config)
        return {"eval_accuracy": result["accuracy"], "eval_tokens_per_step": result["tokens_per_step"]}

    result: dict[str, Any] = {}
    if start == 0:
        result = evaluate(0)
        if result:
            writer.write([{"step": 0, "loss": 0.0, "lr": 0.0, "grad_norm": 0.0, "tokens_per_s": 0.0,
                           **result}])
    for step in range(start, t.num_steps):
        groups, stats = collect_groups(engine, stream, prompts, answers, tokenizer, sampling,
                                       config, step)
        row: dict[str, Any] = {"step": step + 1, **stats,
                               "tokens_per_s": stats["generated_tokens"] / max(stats["rollout_s"], 1e-9)}
        if groups:
            start_time = time.time()
            batch = pack_groups(groups, model_config, config)
            for iteration in range(t.ppo_iterations):
                params, opt_state, metrics = update(params, opt_state, batch, step)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if iteration == 0:
                    row["log_ratio_abs_max"] = metrics["log_ratio_abs_max"]
                    if metrics["log_ratio_abs_max"] > t.max_log_ratio:
                        raise RuntimeError(
                            f"step {step + 1}: trainer and sampler log-probs disagree (max |log ratio| "
                            f"{metrics['log_ratio_abs_max']:.3g} > train.max_log_ratio "
                            f"{t.max_log_ratio}); check dtypes, temperature and the attention impl")
            row.update(metrics, train_s=time.time() - start_time,
                       reward_mean=float(np.mean([g["rewards"] for g in groups])))
            start_time = time.time()
            engine.update_weights(params)
            row["weight_sync_s"] = time.time() - start_time
        else:
            row.update(loss=0.0, lr=0.0, grad_norm=0.0, skipped=1)
        checkpointer.save(step + 1, {"params": params, "opt_state": opt_state}, stream,
                          {"step": step + 1, "seed": config.seed}, force=step + 1 == t.num_steps)
        if (step + 1) % config.eval.every_steps == 0 or step + 1 == t.num_steps:
            result = evaluate(step + 1)
            row.update(result)
        writer.write([row])
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if result and jax.process_index() == 0:
        write_json_atomic(os.path.join(run_dir, "eval.json"), result)
    if config.export.enabled:
        save_model(engine.model, model_config, os.path.join(run_dir, "export"), tokenizer_dir=model_dir,
                   dtype=config.export.dtype, overwrite=True)
    return result
