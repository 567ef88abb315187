"""Held-out evaluation of the built-in arithmetic task (the SFT and DiPO demos)."""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from dirl_jax.data import sft as sft_data
from dirl_jax.data import toy
from dirl_jax.model import SDARConfig, SDARForCausalLM
from dirl_jax.rewards import extract_last_boxed
from dirl_jax.rollout.sampler import generate

log = logging.getLogger(__name__)


def builtin_eval_runs(records: list[dict[str, Any]], config: ConfigDict) -> bool:
    """Whether the held-out evaluation runs: there are records, ``eval.num_examples > 0`` and the
    run has one process (a multi-host run is told to evaluate its export instead)."""
    if not records or config.eval.num_examples <= 0:
        return False
    if jax.process_count() > 1:
        log.warning("the built-in held-out eval runs in single-process runs; evaluate the export "
                    "with python -m dirl_jax.evaluate")
        return False
    return True


def evaluate_builtin(model: SDARForCausalLM, model_config: SDARConfig, tokenizer,
                     records: list[dict[str, Any]], config: ConfigDict) -> dict[str, Any]:
    """Held-out exact match of the boxed answer under greedy block-diffusion decoding."""
    records = records[:config.eval.num_examples]
    stop_ids = [tokenizer.convert_tokens_to_ids(toy.IM_END), tokenizer.pad_token_id]
    correct, tokens_per_step = 0, []
    for start in range(0, len(records), config.eval.batch_size):
        chunk = records[start:start + config.eval.batch_size]
        prompts = [sft_data.encode_prompt(r["messages"][:-1], tokenizer) for r in chunk]
        results = generate(
            model, prompts, block_size=model_config.block_size, temperature=0.0,
            mask_token_id=model_config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=config.eval.max_new_tokens, stop_ids=stop_ids,
            strategy=config.eval.strategy, steps=config.eval.steps or None,
            threshold=config.eval.threshold, attn_impl=config.model.attention_impl)
        for record, result in zip(chunk, results):
            text = tokenizer.decode(result["token_ids"])
            correct += extract_last_boxed(text) == record["answer"]
            tokens_per_step.append(result["tokens_per_step"])
    return {"accuracy": correct / max(len(records), 1), "num_examples": len(records),
            "tokens_per_step": float(np.mean(tokens_per_step)) if tokens_per_step else 0.0,
            "strategy": config.eval.strategy}
