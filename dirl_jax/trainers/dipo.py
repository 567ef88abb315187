"""The online DiPO loop (``task = "dipo"``): rollouts → rewards → dynamic sampling → trajectory-exact updates → weights.

Each step samples ``group_size`` responses for ``prompts_per_step`` prompts with the in-process
engine (the trainer's own parameters), grades them, keeps the groups whose accuracy is mixed
(refilling from new prompts for at most ``max_sampling_rounds`` rounds), packs every kept
trajectory into the single-pass multi-round canvas, and runs ``ppo_iterations`` AdamW updates of
the DiPO objective with the sampler's log-probs as the old policy. At the first iteration the
trainer's log-probs must equal the sampler's: ``|log ratio|`` above ``train.max_log_ratio`` stops
the run. The new parameters go to the engine without leaving the device.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import console, dipo, distributed, run
from dirl_jax.checkpoint import start_or_resume
from dirl_jax.config import check
from dirl_jax.data import rl as rl_data
from dirl_jax.data.tokenizer import stop_token_ids
from dirl_jax.evaluation.builtin import builtin_eval_runs, evaluate_builtin
from dirl_jax.metrics import format_duration, read_metrics, write_json_atomic
from dirl_jax.optim import make_optimizer
from dirl_jax.rewards import REWARDS, Response, grade_all, weighted_rewards
from dirl_jax.rollout.engine import RolloutEngine, make_engine
from dirl_jax.rollout.sampler import SamplingConfig
from dirl_jax.run_lock import unlock_run_dir
from dirl_jax.trainers.steps import Updater

log = logging.getLogger(__name__)


def generate_and_grade(engine: RolloutEngine, prompts: list[list[int]], answers: list[str],
                       tokenizer, sampling: SamplingConfig, config: ConfigDict, seed: int
                       ) -> tuple[list[dict[str, Any]], list[Response], dict[str, float]]:
    """Samples and grades one response per prompt. Each host decodes and grades its share of the
    rows (row ``i`` on host ``i % process_count``, sampled with row seed ``i``, so the result does
    not depend on the number of hosts); every host gets every row back, in order, and its own
    decoding and grading times."""
    rank, count = jax.process_index(), jax.process_count()
    mine = list(range(rank, len(prompts), count))
    start = time.time()
    results = engine.generate([prompts[i] for i in mine], sampling, seed=seed,
                              row_seeds=mine) if mine else []
    times = {"rollout_s": time.time() - start}
    start = time.time()
    stop_ids = set(sampling.stop_ids)
    texts = [tokenizer.decode(result["token_ids"][:result["length"]]) for result in results]
    correct = grade_all([(text, answers[i]) for i, text in zip(mine, texts)],
                        timeout=config.rewards.grade_timeout, latex_fallback=config.rewards.latex_fallback,
                        workers=config.rewards.grade_workers)
    graded = [Response(text=text, correct=ok, num_tokens=result["length"],
                       max_tokens=config.rollout.max_new_tokens,
                       truncated=result["finish_reason"] == "length" and not stop_ids & set(result["token_ids"]),
                       tokens_per_step=result["tokens_per_step"], block_size=sampling.block_size)
              for text, ok, result in zip(texts, correct, results)]
    times["reward_s"] = time.time() - start
    merged: list[Any] = [None] * len(prompts)
    for host, part in enumerate(distributed.allgather_objects(list(zip(results, graded)))):
        merged[host::count] = part
    return [m[0] for m in merged], [m[1] for m in merged], times


def collect_groups(engine: RolloutEngine, stream, prompts: list[list[int]], answers: list[str],
                   tokenizer, sampling: SamplingConfig, config: ConfigDict, step: int
                   ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sampled, graded groups; with dynamic sampling only those whose rewards differ, drawn in
    rounds of ``oversample x prompts_per_step`` prompts until ``prompts_per_step`` are kept (at
    most ``train.max_sampling_rounds`` rounds), then shuffled and truncated as the original does
    (DIRL_SPEC §2.5). Every host makes the same decisions from the same gathered rollouts."""
    r, t = config.rollout, config.train
    oversample = dipo.oversample_factor(r.oversample, dynamic_sampling=t.dynamic_sampling,
                                        group_size=r.group_size, source=config.data.source)
    kept, stats = [], {"rollout_s": 0.0, "reward_s": 0.0, "generated_tokens": 0, "groups_sampled": 0}
    accuracy = []
    for sampling_round in range(t.max_sampling_rounds):
        indices = np.concatenate([next(stream) for _ in range(oversample)])
        rows = np.repeat(indices, r.group_size)
        results, responses, times = generate_and_grade(
            engine, [prompts[i] for i in rows], [answers[i] for i in rows], tokenizer, sampling,
            config, seed=(config.seed * 1_000_003 + step) * 31 + sampling_round)
        for name, seconds in times.items():
            stats[name] += seconds
        rewards = weighted_rewards(responses, list(config.rewards.names),
                                   list(config.rewards.weights) or None).reshape(-1, r.group_size)
        stats["generated_tokens"] += sum(len(x["token_ids"]) for x in results)
        stats["groups_sampled"] += len(indices)
        accuracy.extend(REWARDS["accuracy"](x) for x in responses)  # truncation zeroed
        informative = (dipo.informative_groups(rewards) if t.dynamic_sampling
                       else np.ones(len(indices), bool))
        advantages = dipo.group_advantages(rewards, t.advantage)
        for g in np.flatnonzero(informative):
            members = range(g * r.group_size, (g + 1) * r.group_size)
            kept.append({"prompt": prompts[indices[g]], "results": [results[i] for i in members],
                         "advantages": advantages[g], "rewards": rewards[g]})
        if len(kept) >= r.prompts_per_step:
            break
    else:  # a short batch is normal once most groups are all right (groups_kept says it);
        # a step with nothing to learn from is skipped, and that is worth a warning
        log.log(logging.INFO if kept else logging.WARNING,
                "step %d: %d informative groups after %d sampling rounds (wanted %d)%s", step,
                len(kept), t.max_sampling_rounds, r.prompts_per_step,
                "" if kept else "; the step is skipped")
    if len(kept) > r.prompts_per_step:  # a seeded shuffle: the same on every host
        order = np.random.default_rng([config.seed, step]).permutation(len(kept))
        kept = [kept[i] for i in order[:r.prompts_per_step]]
    stats["rollout_accuracy"] = float(np.mean(accuracy))
    stats["sampling_rounds"] = sampling_round + 1
    stats["groups_kept"] = len(kept)
    return kept, stats


def pack_groups(groups: list[dict[str, Any]], model_config, config: ConfigDict
                ) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    """The kept groups as host micro-batches of the single-pass canvas (sampler log-probs as the
    old policy)."""
    trajectories = [dipo.Trajectory(g["prompt"], res["token_ids"], res["step_map"], res["length"],
                                    float(a))
                    for g in groups for res, a in zip(g["results"], g["advantages"])]
    results = [res for g in groups for res in g["results"]]
    t = config.train
    packed = dipo.pack_rounds(trajectories, block_size=model_config.block_size,
                              mask_token_id=model_config.mask_token_id, row_length=t.row_length)
    position = packed.canvas.positions[packed.score_row, packed.score_slot]
    old = np.array([results[i]["logprobs"][p - len(trajectories[i].prompt)]
                    if results[i]["logprobs"] is not None else np.nan  # engines without log-probs
                    for i, p in zip(packed.score_trajectory, position)], np.float32)
    batches = dipo.micro_batches(packed, trajectories, old, rows=t.canvas_rows,
                                 scored_per_row=t.row_length,
                                 aggregation=t.loss_aggregation)
    stats = {"canvas_rows": packed.canvas.shape[0], "micro_batches": len(batches),
             "canvas_tokens_per_trajectory": float(np.mean(packed.tokens_per_trajectory))}
    return batches, stats


def check_canvas_fits(config: ConfigDict, block_size: int) -> None:
    """With a prompt cap, one canvas row must hold any trajectory's single-pass layout
    (:func:`dirl_jax.dipo.max_trajectory_canvas_tokens`: one token committed per step)."""
    r = config.rollout
    if not r.max_prompt_tokens:
        return
    need = dipo.max_trajectory_canvas_tokens(r.max_prompt_tokens, r.max_new_tokens, block_size)
    check(config.train.row_length >= need, "train.row_length",
          f"({config.train.row_length}) cannot hold a trajectory of up to {r.max_prompt_tokens} "
          f"prompt + {r.max_new_tokens} new tokens (to the end of their block) decoded one token "
          f"per step ({need} canvas slots)")


def check_log_ratio(value: float, limit: float, step: int) -> None:
    """Stops the run when the trainer's log-probs of the sampled tokens differ from the sampler's."""
    if value > limit:
        raise RuntimeError(
            f"step {step}: trainer and sampler log-probs disagree (max |log ratio| {value:.3g} > "
            f"train.max_log_ratio {limit}); check dtypes, temperature and the attention impl")


def train_on_groups(updater: Updater, params, opt_state, reference, groups, model_config,
                    config: ConfigDict, step: int):
    """Packs the kept groups, scores the frozen reference (and the trainer's old policy) once,
    then runs ``train.ppo_iterations`` updates; returns the new state and the step's metrics."""
    t = config.train
    batches, row = pack_groups(groups, model_config, config)
    batches = [updater.place(b) for b in batches]
    if reference is not None:
        batches = [{**b, "ref_logp": updater.score(reference, b)} for b in batches]
    if t.old_logprobs == "trainer":
        old = [updater.score(params, b) for b in batches]
        gaps = [jnp.where(b["loss_mask"] > 0, o - b["old_logp"], 0.0) for b, o in zip(batches, old)]
        if not any(bool(jnp.isnan(g).any()) for g in gaps):  # the engine returned log-probs
            row["log_ratio_abs_max"] = max(float(jnp.max(jnp.abs(g))) for g in gaps)
            check_log_ratio(row["log_ratio_abs_max"], t.max_log_ratio, step)
        batches = [{**b, "old_logp": o} for b, o in zip(batches, old)]
    for iteration in range(t.ppo_iterations):
        params, opt_state, stats = updater.step(params, opt_state, batches)
        if iteration == 0 and t.old_logprobs == "sampler":
            row["log_ratio_abs_max"] = stats["log_ratio_abs_max"]
            check_log_ratio(row["log_ratio_abs_max"], t.max_log_ratio, step)
    stats["last_log_ratio_abs_max"] = stats.pop("log_ratio_abs_max")
    return params, opt_state, {**row, **stats}


def run_dipo(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) DiPO as configured; returns the last held-out evaluation (if any)."""
    run.validate_dipo(config)
    run.check_same_split(config)
    check(jax.process_count() == 1 or config.rollout.engine == "jax", "rollout.engine",
          f"a multi-host run decodes with the in-process engine ('jax'), got "
          f"{config.rollout.engine!r}; serve LMDeploy to a one-host trainer")
    model_dir = run.init_model_dir(config)
    tokenizer = run.build_tokenizer(config)
    t, r = config.train, config.rollout
    model_config = run.build_model_config(config, tokenizer)
    check_canvas_fits(config, model_config.block_size)
    mesh = run.build_mesh(config, model_config, t.canvas_rows, rows_field="train.canvas_rows")
    model = run.build_model(config, model_config, mesh)
    prompts, answers, held_out = run.rl_prompts(config, tokenizer)

    run_dir, tokenizer_dir = run.start_run(config, tokenizer)
    sampling = SamplingConfig.from_fields(
        r, block_size=model_config.block_size, mask_token_id=model_config.mask_token_id,
        stop_ids=stop_token_ids(tokenizer), attn_impl=config.model.attention_impl)
    options = {k: v for k, v in r.engine_options.items() if v}  # used by external engines only
    options.setdefault("model_dir", model_dir)
    engine = make_engine(r.engine, model, sampling, pad_token_id=tokenizer.pad_token_id or 0,
                         tokenizer=config.tokenizer or model_dir, options=options, mesh=mesh,
                         slots=r.slots, commit=r.commit)
    # the same global prompt order on every host (and so for any host count)
    stream = iter(rl_data.prompt_batches(len(prompts), prompts_per_step=r.prompts_per_step,
                                         seed=config.seed))
    tx = make_optimizer(t)
    # the frozen k3 reference is the policy DiPO starts from (init_from, also on resume)
    reference = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)) if t.kl_beta > 0 else None
    graphdef, params, opt_state, checkpointer, start = start_or_resume(
        model, tx, run_dir, config.checkpoint, stream, mesh=mesh)
    if start:
        engine.update_weights(params)
    updater = Updater(graphdef, tx, config, mesh)
    writer = run.metrics_writer(config, run_dir, start)
    started = time.time()
    console.start_banner("dipo", run_dir, model_config, params, mesh, start=start, total=t.num_steps,
                         detail=f"{len(prompts)} training prompts x {r.group_size} rollouts, "
                                f"{r.prompts_per_step} prompts per step, engine {r.engine}")

    evaluates = builtin_eval_runs(held_out, config)

    def evaluate() -> dict[str, Any]:
        if not evaluates:
            return {}
        return evaluate_builtin(nnx.merge(graphdef, params), model_config, tokenizer, held_out,
                                config, run_dir)

    def eval_metrics(result: dict[str, Any]) -> dict[str, float]:
        return {"eval_accuracy": result["accuracy"],
                "eval_tokens_per_step": result["tokens_per_step"]} if result else {}

    result: dict[str, Any] = {}
    if start == 0:
        result = evaluate()
        if result:
            if jax.process_index() == 0:  # the policy DiPO starts from, on the same problems
                write_json_atomic(os.path.join(run_dir, "eval_initial.json"), result)
            writer.write([{"step": 0, "loss": 0.0, "lr": 0.0, "grad_norm": 0.0, "tokens_per_s": 0.0,
                           **eval_metrics(result)}])
    for step in range(start, t.num_steps):
        groups, stats = collect_groups(engine, stream, prompts, answers, tokenizer, sampling,
                                       config, step)
        row: dict[str, Any] = {"step": step + 1, **stats,
                               "tokens_per_s": stats["generated_tokens"] / max(stats["rollout_s"], 1e-9)}
        if groups:
            start_time = time.time()
            params, opt_state, metrics = train_on_groups(updater, params, opt_state, reference,
                                                         groups, model_config, config, step + 1)
            row.update(metrics, train_s=time.time() - start_time,
                       reward_mean=float(np.mean([g["rewards"] for g in groups])))
            start_time = time.time()
            engine.update_weights(params)
            row["weight_sync_s"] = time.time() - start_time
        else:
            row.update(loss=0.0, lr=0.0, grad_norm=0.0, skipped=1)
        if (step + 1) % config.eval.every_steps == 0 or step + 1 == t.num_steps:
            result = evaluate()
            row.update(eval_metrics(result))
        writer.write([row])  # before the checkpoint of its step: a resume never loses a row
        checkpointer.save(step + 1, {"params": params, "opt_state": opt_state}, stream,
                          {"step": step + 1, "seed": config.seed}, force=step + 1 == t.num_steps)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if result and jax.process_index() == 0:
        write_json_atomic(os.path.join(run_dir, "eval.json"), result)
    run.export(config, nnx.merge(graphdef, params), model_config, run_dir, tokenizer_dir)
    run.draw_curves(run_dir)
    console.closing_lines(dipo_summary(run_dir, start, t.num_steps, time.time() - started, result),
                          [("initial eval", os.path.join(run_dir, "eval_initial.json"),
                            "the starting policy on the same held-out problems"),
                           *console.run_outputs(run_dir)])
    unlock_run_dir(run_dir)
    return result


def dipo_summary(run_dir: str, start: int, total: int, seconds: float, final: dict[str, Any]) -> str:
    """One line: the steps run, held-out accuracy before -> after, and where the time went
    (summed over this run's rows of ``metrics.jsonl``)."""
    rows = read_metrics(run_dir) if jax.process_index() == 0 else []
    parts = {name: sum(r.get(f"{name}_s", 0.0) for r in rows if r["step"] > start)
             for name in ("rollout", "reward", "train", "weight_sync")}
    split = ", ".join(f"{name} {format_duration(value)}" for name, value in parts.items() if value)
    initial_file = os.path.join(run_dir, "eval_initial.json")
    accuracy = ""
    if final and os.path.isfile(initial_file):
        with open(initial_file, encoding="utf-8") as f:
            accuracy = f"; held-out accuracy {json.load(f)['accuracy']:.3f} -> {final['accuracy']:.3f}"
    elif final:
        accuracy = f"; held-out accuracy {final['accuracy']:.3f}"
    return (f"dipo done: steps {start + 1}-{total} in {format_duration(seconds)} "
            f"({split or 'no step run'}){accuracy}")
