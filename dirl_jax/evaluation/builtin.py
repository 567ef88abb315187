"""Held-out evaluation of the built-in arithmetic task (the SFT and DiPO demos)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from dirl_jax.data import sft as sft_data
from dirl_jax.data.tokenizer import stop_token_ids
from dirl_jax.model import SDARConfig, SDARForCausalLM
from dirl_jax.rewards import extract_last_boxed
from dirl_jax.rollout.decoder import decode_prompts
from dirl_jax.rollout.sampler import SamplingConfig

log = logging.getLogger(__name__)
HELDOUT_FILE = "heldout.jsonl"


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


def write_heldout(run_dir: str, records: list[dict[str, Any]]) -> None:
    """``RUN_DIR/heldout.jsonl``: the evaluated problems (``question``, ``answer`` per line)."""
    path = os.path.join(run_dir, HELDOUT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                     for r in records)
    os.replace(path + ".tmp", path)


def evaluate_builtin(model: SDARForCausalLM, model_config: SDARConfig, tokenizer,
                     records: list[dict[str, Any]], config: ConfigDict, run_dir: str
                     ) -> dict[str, Any]:
    """Held-out exact match of the boxed answer under the ``eval`` section's decoding (greedy by
    default) on the first ``eval.num_examples`` held-out records, which are written to
    ``RUN_DIR/heldout.jsonl``."""
    records = records[:config.eval.num_examples]
    if jax.process_index() == 0:
        write_heldout(run_dir, records)
    sampling = SamplingConfig.from_fields(
        config.eval, block_size=model_config.block_size, mask_token_id=model_config.mask_token_id,
        stop_ids=stop_token_ids(tokenizer), attn_impl=config.model.attention_impl)
    prompts = [sft_data.encode_prompt(r["messages"][:-1], tokenizer) for r in records]
    results = decode_prompts(model, prompts, sampling, seed=0, slots=config.eval.batch_size,
                             pad_token_id=tokenizer.pad_token_id or 0) if prompts else []
    correct = [int(extract_last_boxed(tokenizer.decode(result["token_ids"][:result["length"]]))
                   == record["answer"])
               for record, result in zip(records, results)]
    tokens_per_step = [result["tokens_per_step"] for result in results]
    accuracy = sum(correct) / max(len(records), 1)
    return {"accuracy": accuracy, "accuracy_ci95": wilson_interval(sum(correct), len(records)),
            "num_examples": len(records),
            "tokens_per_step": float(np.mean(tokens_per_step)) if tokens_per_step else 0.0,
            "strategy": config.eval.strategy, "correct": correct}


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> list[float]:
    """The 95 % Wilson score interval of a binomial proportion (``[0, 1]`` without trials)."""
    if trials == 0:
        return [0.0, 1.0]
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return [float(centre - half), float(centre + half)]
