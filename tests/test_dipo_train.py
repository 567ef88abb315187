"""The online DiPO loop end to end on a tiny random model: two steps, metrics, resume, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import random_model, tiny_config
from dirl_jax import save_model
from dirl_jax.config import ConfigValueError, dipo_defaults
from dirl_jax.data import toy
from dirl_jax.dipo_train import run_dipo


def tiny_run_config(tmp_path, seed):
    tokenizer = toy.toy_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    config = dataclasses.replace(tiny_config(block_size=4, vocab=len(tokenizer)),
                                 mask_token_id=tokenizer.convert_tokens_to_ids(toy.MASK),
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.convert_tokens_to_ids(toy.IM_END))
    save_model(random_model(config, seed), config, tmp_path / "sft" / "export",
               tokenizer_dir=tmp_path / "tok", dtype="float32")
    run = dipo_defaults()
    run.run_dir = str(tmp_path / "dipo")
    run.init_from = str(tmp_path / "sft")
    run.seed = seed
    run.data.update(builtin_train_size=200, builtin_eval_size=8)
    run.rollout.update(prompts_per_step=2, group_size=3, max_new_tokens=8)
    run.train.update(num_steps=2, canvas_rows=4, row_length=256, dynamic_sampling=False,
                     learning_rate=1e-3)
    run.rewards.names = ("accuracy", "boxed")
    run.checkpoint.every_steps = 1
    run.eval.update(num_examples=8, every_steps=1, max_new_tokens=8, batch_size=8)
    run.export.enabled = False
    return run


def test_two_steps_then_resume(tmp_path, seed):
    config = tiny_run_config(tmp_path, seed)
    run_dipo(config)
    rows = [json.loads(line) for line in (tmp_path / "dipo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval_accuracy" in r for r in rows)  # including before the first update
    for row in rows[1:]:
        assert row["log_ratio_abs_max"] < 1e-4
        assert row["groups_kept"] == 2 and row["rollout_s"] > 0 and "weight_sync_s" in row
    config.train.num_steps = 3
    run_dipo(config)
    rows = [json.loads(line) for line in (tmp_path / "dipo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_bad_dipo_config_names_the_field(tmp_path):
    config = dipo_defaults()
    with pytest.raises(ConfigValueError, match="config.init_from: must name"):
        run_dipo(config)
    config.init_from = str(tmp_path)
    config.rollout.group_size = 1
    with pytest.raises(ConfigValueError, match="config.rollout.group_size: must be > 1"):
        run_dipo(config)


def test_dipo_tiny_config_validates():
    import importlib.util

    from conftest import REPO
    from dirl_jax.config import validate_dipo
    spec = importlib.util.spec_from_file_location("dipo_tiny", REPO / "configs" / "dipo_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    validate_dipo(config)
    assert config.init_from == "runs/sft_tiny" and config.task == "dipo"
