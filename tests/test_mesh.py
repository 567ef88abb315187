"""The device mesh: data / FSDP / tensor-parallel updates equal the single-device update (8 CPU
devices, fp32), invalid meshes are refused before compiling, and a 2-process x 4-device run
(JAX's CPU collectives) reproduces the single-process losses and writes a checkpoint that
resumes on another mesh."""

from __future__ import annotations


import jax
import numpy as np
import pytest
from flax import nnx

from conftest import train_cli
from dirl_jax import mesh as mesh_lib
from dirl_jax import run as run_lib
from dirl_jax.trainers import sft as sft_trainer
from dirl_jax.trainers.steps import make_train_step
from dirl_jax.config import ConfigValueError, sft_defaults
from dirl_jax.data import sft as sft_data
from dirl_jax.optim import make_optimizer

MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (4, 1, 2), (1, 4, 2)]


def small_config():
    config = sft_defaults()
    config.tokenizer = "builtin:toy"
    config.data.update(max_length=96, builtin_train_size=200, builtin_eval_size=0)
    config.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config.train.update(global_batch=8, adam_eps=1.0)  # eps 1: the update is smooth in the gradient
    return config


def one_update(config, shape, devices, local_batch, seed):
    tokenizer = run_lib.build_tokenizer(config)
    model_config = run_lib.build_model_config(config, tokenizer)
    mesh = mesh_lib.make_mesh(shape, devices)
    model = run_lib.build_model(config, model_config, mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config.train)
    opt_state = mesh_lib.on_mesh(tx.init(params), mesh)
    step = make_train_step(graphdef, tx, config, model_config)
    batch = mesh_lib.global_batch({k: v[None] for k, v in local_batch.items()}, mesh, row_axis=1)
    new_params, _, metrics = step(params, opt_state, batch, jax.random.key(seed))
    return params, jax.device_get(new_params), jax.device_get(metrics)


def test_data_fsdp_and_tensor_meshes_give_the_single_device_update(seed):
    config = small_config()
    tokenizer = run_lib.build_tokenizer(config)
    records, _ = run_lib.sft_records(config)
    examples, _ = sft_data.prepare_examples(records, tokenizer, block_size=4, max_length=96,
                                            overlong="drop")
    batch = next(iter(sft_data.packed_batches(examples, seq_len=96, rows=8, seed=seed, pad_id=0)))
    _, want_params, want = one_update(config, (1, 1, 1), jax.devices()[:1], batch, seed)
    for shape in MESHES:
        params, got_params, got = one_update(config, shape, jax.devices(), batch, seed)
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(params)}
        if shape[1] > 1:
            assert any("fsdp" in s for s in specs), shape  # parameters really are sharded
        if shape[2] > 1:
            assert any("tensor" in s for s in specs), shape
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, err_msg=str(shape))
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5, err_msg=str(shape))
        for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(shape))


@pytest.mark.parametrize("mesh,match", [
    (dict(data=3, fsdp=1, tensor=1), r"config.mesh: data x fsdp x tensor = 3x1x1 = 3, but the run has 8"),
    (dict(data=0, fsdp=3, tensor=1), r"config.mesh: fsdp x tensor = 3 does not divide the 8 devices"),
    (dict(data=0, fsdp=1, tensor=4), r"config.mesh.tensor: \(4\) must divide the model's num_key_value_heads \(2\)"),
    (dict(data=1, fsdp=8, tensor=1), r"config.mesh.fsdp: \(8\) must divide the model's hidden_size \(36\)"),
    (dict(data=0, fsdp=1, tensor=1), r"config.train.global_batch: a micro-batch of 4 rows must be "
                                     r"divisible by mesh.data x mesh.fsdp = 8 \(the next multiple: 8\)"),
])
def test_invalid_meshes_are_refused_before_compiling(tmp_path, mesh, match):
    config = small_config()
    config.run_dir = str(tmp_path / "run")
    config.model.hidden_size = 36
    config.train.update(global_batch=8, grad_accum=2)
    config.mesh.update(**mesh)
    with pytest.raises(ConfigValueError, match=match):
        sft_trainer.run_sft(config)
    assert not (tmp_path / "run").exists()  # nothing written


def test_host_copies_and_local_replicas_hold_the_same_values(seed):
    rng = np.random.default_rng(seed)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    rows = rng.normal(size=(8, 5)).astype(np.float32)
    placed = mesh_lib.from_host_copy(rows, mesh_lib.batch_sharding(mesh, 2, 0))
    assert placed.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(placed, rows)
    weights = jax.device_put(rng.normal(size=(4, 6)).astype(np.float32),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")))
    devices = jax.devices()[4:]
    (replica,) = jax.tree.leaves(mesh_lib.local_replica({"w": weights}, devices))
    assert set(replica.sharding.device_set) == set(devices) and replica.sharding.is_fully_replicated
    for shard in replica.addressable_shards:
        np.testing.assert_array_equal(shard.data, weights)


def sharding_constraints(jaxpr) -> list[jax.sharding.PartitionSpec]:
    """The specs of every sharding constraint in ``jaxpr`` and its sub-jaxprs."""
    specs = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            specs.append(eqn.params["sharding"].spec)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            specs += sharding_constraints(sub)
    return specs


@pytest.mark.parametrize("batch", [4, 2])
def test_activations_are_sharded_as_the_logical_axis_table_says(seed, batch):
    from conftest import random_model, tiny_config
    from jax.sharding import PartitionSpec as P
    model = random_model(tiny_config(vocab=64), seed)  # tensor = 2 divides heads, MLP, vocab
    graphdef, state = nnx.split(model)
    rows = ("data", "fsdp") if batch % 4 == 0 else None  # data x fsdp = 4 must divide the rows
    ids = np.random.default_rng(seed).integers(0, 50, (batch, 8))
    positions = np.broadcast_to(np.arange(8), (batch, 8))
    mask = np.ones((batch, 8, 8), bool)
    with jax.set_mesh(mesh_lib.make_mesh((2, 2, 2))):
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, positions, mask))(state)
    specs = sharding_constraints(jaxpr.jaxpr)
    free = P.UNCONSTRAINED
    layers = model.config.num_hidden_layers
    want = ([P(rows, None, None)] * (1 + layers)  # embeddings, each layer's residual output
            + [P(rows, None, "tensor", None)] * 3 * layers + [P(rows, None, "tensor")] * layers
            + [P(free, free, "tensor")])  # q, k, v; the MLP intermediate; logits
    assert sorted(map(str, specs)) == sorted(map(str, want))


def cli(run_dir, devices: int, *extra: str, processes: int = 1) -> list[dict]:
    """``python -m dirl_jax.train`` on the toy task, as ``processes`` local processes."""
    common = ["--config", "configs/sft_tiny.py", f"--config.run_dir={run_dir}", "--config.seed=5",
              "--config.train.global_batch=8", "--config.train.log_every=1",
              "--config.train.schedule=constant",  # the same lr whatever num_steps
              "--config.train.warmup_steps=1", "--config.checkpoint.every_steps=3",
              "--config.eval.num_examples=0", "--config.export.enabled=false",
              "--config.data.builtin_train_size=300", "--config.data.builtin_eval_size=0",
              "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32",
              "--config.model.intermediate_size=64", *extra]
    return train_cli(common, run_dir, devices, processes)


@pytest.mark.slow
def test_two_processes_reproduce_one_and_their_checkpoint_resumes_on_another_mesh(tmp_path):
    reference = cli(tmp_path / "one", 8, "--config.train.num_steps=4", "--config.mesh.fsdp=2")
    two = cli(tmp_path / "two", 4, "--config.train.num_steps=3", "--config.mesh.fsdp=2", processes=2)
    assert [r["step"] for r in two] == [1, 2, 3]
    for got, want in zip(two, reference):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
    # the 2-process checkpoint (step 3) resumes in one process on a tensor-parallel mesh
    resumed = cli(tmp_path / "two", 8, "--config.train.num_steps=4", "--config.mesh.tensor=2")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    np.testing.assert_allclose(resumed[-1]["loss"], reference[-1]["loss"], rtol=1e-5)
