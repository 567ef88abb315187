"""The online DiPO loop end to end on a tiny random model: two steps, metrics, resume, errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO, save_toy_chat_model
from dirl_jax.config import ConfigValueError, dipo_defaults
from dirl_jax.run import validate_dipo
from dirl_jax.trainers.dipo import check_canvas_fits, run_dipo
from dirl_jax.trainers.steps import Updater


def tiny_run_config(tmp_path, seed):
    save_toy_chat_model(tmp_path / "sft", seed)
    run = dipo_defaults()
    run.run_dir = str(tmp_path / "dipo")
    run.init_from = str(tmp_path / "sft" / "model")
    run.seed = seed
    run.data.update(builtin_train_size=200, builtin_eval_size=8)
    run.rollout.update(prompts_per_step=2, group_size=3, max_new_tokens=8)
    run.train.update(num_steps=2, canvas_rows=8, row_length=256, dynamic_sampling=False,
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


def test_resume_is_bit_exact(tmp_path, seed):
    """Three steps straight, or two then a resume to three: the same rows
    (every number but timings) and bit-identical final weights."""
    from safetensors.numpy import load_file
    runs = {}
    for name in ("straight", "resumed"):
        config = tiny_run_config(tmp_path / name, seed)
        config.export.update(enabled=True, dtype="float32")
        config.eval.every_steps = 2
        config.train.num_steps = 3 if name == "straight" else 2
        run_dipo(config)
        if name == "resumed":
            config.train.num_steps = 3
            run_dipo(config)
        lines = (tmp_path / name / "dipo" / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([{k: v for k, v in json.loads(line).items() if not k.endswith(("_s", "tokens_per_s"))}
                       for line in lines], load_file(tmp_path / name / "dipo" / "export" / "model.safetensors"))
    (rows_a, weights_a), (rows_b, weights_b) = runs["straight"], runs["resumed"]
    assert [r["step"] for r in rows_a] == [0, 1, 2, 3] and rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert (weights_a[name] == weights_b[name]).all(), name


def test_reference_kl_trainer_old_logprobs_micro_batches_and_ppo_iterations(tmp_path, seed,
                                                                            monkeypatch):
    from dirl_jax.rewards import registry
    # a random model is never right: a reward that varies with the text gives every group a signal
    monkeypatch.setitem(registry.REWARDS, "text_sum", lambda r: sum(map(ord, r.text)) % 97 / 97)
    config = tiny_run_config(tmp_path, seed)
    config.rewards.names = ("text_sum",)
    config.rollout.group_size = 5  # 10 trajectories, at most two per 128-slot row
    config.mesh.update(data=0, fsdp=1, tensor=2)  # rows in multiples of 4: at least two micro-batches
    config.train.update(num_steps=1, kl_beta=0.1, old_logprobs="trainer", ppo_iterations=2,
                        loss_aggregation="sequence_mean", canvas_rows=4, row_length=128)
    config.eval.num_examples = 0
    run_dipo(config)
    (row,) = [json.loads(line) for line in (tmp_path / "dipo" / "metrics.jsonl").read_text().splitlines()]
    assert row["micro_batches"] == -(-row["canvas_rows"] // 4) >= 2
    assert row["log_ratio_abs_max"] < 1e-4  # the trainer's old log-probs equal the sampler's
    assert row["last_log_ratio_abs_max"] > 1e-6 and row["kl"] > 0  # iteration 2 saw the update
    assert 0 <= row["clip_fraction"] <= 1


def test_an_update_on_a_sharded_mesh_equals_the_data_parallel_one(tmp_path, seed):
    rows = []
    for name, mesh in (("data", dict(data=0, fsdp=1, tensor=1)), ("sharded", dict(data=0, fsdp=2, tensor=2))):
        config = tiny_run_config(tmp_path / name, seed)
        config.train.num_steps = 1
        config.eval.num_examples = 0
        config.mesh.update(**mesh)
        run_dipo(config)
        rows.append(json.loads((tmp_path / name / "dipo" / "metrics.jsonl").read_text()))
    for field in ("loss", "grad_norm", "log_ratio_abs_max", "entropy"):
        assert rows[0][field] == pytest.approx(rows[1][field], rel=1e-4, abs=1e-6), field


def test_bad_dipo_config_names_the_field(tmp_path):
    config = dipo_defaults()
    with pytest.raises(ConfigValueError, match="config.init_from: must name"):
        run_dipo(config)
    config.init_from = str(tmp_path)
    config.rollout.group_size = 1
    with pytest.raises(ConfigValueError, match="config.rollout.group_size: must be > 1"):
        run_dipo(config)
    config.rollout.group_size = 2
    config.rollout.min_new_tokens = 8  # the sampler's log-probs would not be the trainer's
    with pytest.raises(ConfigValueError, match="config.rollout.min_new_tokens: must be 0 in DiPO"):
        run_dipo(config)
    config.rollout.min_new_tokens = 0
    config.train.loss_aggregation = "mean"
    with pytest.raises(ConfigValueError, match="config.train.loss_aggregation: must be one of"):
        run_dipo(config)


def load_config_file(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_dipo_tiny_config_validates():
    config = load_config_file("dipo_tiny")
    validate_dipo(config)
    assert config.init_from == "runs/sft_tiny" and config.task == "dipo"


# The original's RL recipe (paper §3.2 and the released scripts), with where DIRL_SPEC says so.
PAPER_RL_RECIPE = {
    "rollout.prompts_per_step": (128, "§2.5 num_task_per_step"),
    "rollout.group_size": (32, "§4.8 paper: 32 rollouts per prompt"),
    "rollout.max_new_tokens": (8192, "§4.8 8k length"),
    "rollout.strategy": ("low_confidence_dynamic", "§2.3 server config"),
    "rollout.threshold": (0.9, "§2.3"),
    "rollout.steps": (0, "§2.3 4 denoising steps per block of 4 = the block size"),
    "rollout.temperature": (1.0, "§2.2"),
    "rollout.top_k": (50, "§2.2 top_k via extra_body"),
    "rollout.top_p": (1.0, "§2.2"),
    "rollout.oversample": (0, "§2.5 m: the original's rule, 2 when k >= 16"),
    "rollout.max_prompt_tokens": (1024, "§4.1 max_prompt_len"),
    "rewards.names": (("accuracy",), "§3.3 REWARD_FUNCS=accuracy"),
    "train.num_steps": (40, "§4.8 40 steps"),
    "train.learning_rate": (1e-6, "§4.7"),
    "train.warmup_steps": (10, "§4.7 constant_with_warmup, 10 steps"),
    "train.schedule": ("constant", "§4.7"),
    "train.weight_decay": (0.0, "§4.7"),
    "train.b1": (0.9, "§4.7"),
    "train.b2": (0.999, "§4.7"),
    "train.adam_eps": (1e-8, "§4.7"),
    "train.max_grad_norm": (1.0, "§4.7"),
    "train.eps_low": (0.2, "§4.5 1 - eps"),
    "train.eps_high": (0.28, "§4.5 1 + eps + 0.08"),
    "train.log_ratio_clamp": (10.0, "§4.5 clip(log ratio, ±10)"),
    "train.advantage": ("zscore", "§3.3 population-std z-score"),
    "train.kl_beta": (0.0, "§4.8 the scripts set KL=0"),
    "train.ppo_iterations": (1, "§4.6 num_iterations 1"),
    "train.dynamic_sampling": (True, "§2.5 DAPO filter"),
}


@pytest.mark.parametrize("field", sorted(PAPER_RL_RECIPE))
def test_paper_rl_recipe_value(field):
    config = load_config_file("dipo_sdar8b")
    section, name = field.split(".")
    expected, where = PAPER_RL_RECIPE[field]
    value = config[section][name]
    assert (tuple(value) if isinstance(expected, tuple) else value) == expected, \
        f"{field} = {value!r}; the original's is {expected!r} (DIRL_SPEC {where})"


def test_paper_rl_recipe_oversamples_as_the_original():
    from dirl_jax.dipo import oversample_factor
    config = load_config_file("dipo_sdar8b")
    r = config.rollout
    assert oversample_factor(r.oversample, dynamic_sampling=config.train.dynamic_sampling,
                             group_size=r.group_size, source=config.data.source) == 2


def test_paper_rl_recipe_validates_and_traces_abstractly(shared_dir):
    """configs/dipo_sdar8b.py: the paper's numbers, a canvas row that holds any trajectory, and
    one micro-batch gradient of the 8B model traced (shapes only, nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dirl_jax.mesh import make_mesh
    from dirl_jax.model import SDARConfig, abstract_model
    from dirl_jax.optim import make_optimizer
    config = load_config_file("dipo_sdar8b")
    validate_dipo(config)
    r, t = config.rollout, config.train
    assert (t.learning_rate, t.weight_decay, r.prompts_per_step, r.group_size, r.max_new_tokens,
            r.strategy, r.threshold, t.num_steps) == (1e-6, 0.0, 128, 32, 8192,
                                                       "low_confidence_dynamic", 0.9, 40)
    model_config = SDARConfig.from_pretrained(shared_dir / "data" / "sdar_tokenizer")
    assert model_config.block_size == 4
    check_canvas_fits(config, model_config.block_size)
    from dirl_jax.mesh import check_mesh_fits, mesh_shape
    check_mesh_fits(mesh_shape(config.mesh, 8), model_config, t.canvas_rows)  # one 8-GPU node
    model = abstract_model(model_config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    graphdef, params = nnx.split(model, nnx.Param)
    updater = Updater(graphdef, make_optimizer(t), config, make_mesh((1, 1, 1), jax.devices()[:1]))
    rows, length = t.canvas_rows, t.row_length
    canvas = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
              for k in ("tokens", "positions", "stream_ids", "block_ids", "segment_ids")}
    scored = {k: jax.ShapeDtypeStruct((rows, length), dtype) for k, dtype in
              (("score_slot", jnp.int32), ("score_token", jnp.int32),
               ("advantage", jnp.float32), ("old_logp", jnp.float32), ("weight", jnp.float32),
               ("loss_mask", jnp.float32))}
    grads, stats = jax.eval_shape(updater._gradients, params, {**canvas, **scored})
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert stats["loss"].shape == () and stats["log_ratio_abs_max"].dtype == jnp.float32
    config.train.row_length = 8192
    with pytest.raises(ConfigValueError, match="config.train.row_length: .* cannot hold"):
        check_canvas_fits(config, model_config.block_size)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_init_from_a_run_directory_continues_from_its_latest_checkpoint(tmp_path, param_dtype):
    """A run directory as ``init_from`` gives its latest checkpoint's (fp32) parameters, cast to
    the new run's ``param_dtype``; never its bf16 export."""
    import jax
    import numpy as np
    from flax import nnx

    from dirl_jax import run as run_lib
    from dirl_jax.checkpoint import restore_params
    from dirl_jax.mesh import make_mesh
    from dirl_jax.model import abstract_model, load_model
    from dirl_jax.trainers.sft import run_sft
    from test_train import tiny_run_config as sft_run_config

    sft = sft_run_config(tmp_path / "sft", num_steps=4)
    sft.export.dtype = "bfloat16"
    run_sft(sft)
    config = dipo_defaults()
    config.init_from = str(tmp_path / "sft")
    config.train.param_dtype = param_dtype
    tokenizer = run_lib.build_tokenizer(config)
    model_config = run_lib.build_model_config(config, tokenizer)
    model = run_lib.build_model(config, model_config, make_mesh((1, 1, 1), jax.devices()[:1]))
    got = nnx.to_flat_state(nnx.state(model, nnx.Param))
    _, abstract = nnx.split(abstract_model(model_config, dtype=jax.numpy.float32), nnx.Param)
    saved = nnx.to_flat_state(restore_params(tmp_path / "sft" / "checkpoints", 4, abstract))
    export, _ = load_model(tmp_path / "sft", "float32")
    exported = dict(nnx.to_flat_state(nnx.state(export, nnx.Param)))
    differs_from_export = False
    for (path, var), (_, want) in zip(got, saved):
        value = np.asarray(var[...])
        assert value.dtype == np.dtype(param_dtype)
        np.testing.assert_array_equal(value, np.asarray(want[...]).astype(param_dtype))
        differs_from_export |= not np.array_equal(value.astype(np.float32),
                                                  np.asarray(exported[path][...]))
    assert differs_from_export == (param_dtype == "float32")
