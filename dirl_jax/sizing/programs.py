"""Every compiled program of a run, lowered from abstract inputs on a device mesh: no weights, no
data. The programs are the trainers' own (:func:`dirl_jax.trainers.steps.make_train_step`,
:class:`~dirl_jax.trainers.steps.Updater`, the rollout decoder's jitted admit / chunk
functions), their inputs ``jax.ShapeDtypeStruct`` with the shardings a run gives them: parameters
by the logical-axis table, optimizer moments like the parameters, batches by rows over
``data x fsdp``. Lowering happens under ``jax.set_mesh(mesh)``, so every platform-dependent choice
(the attention kernel, interpret mode, the commit mode) follows the mesh's devices, e.g. a TPU
topology compiled for from a CPU host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import dipo
from dirl_jax import mesh as mesh_lib
from dirl_jax.attention import recording_impls
from dirl_jax.model import SDARConfig, abstract_model
from dirl_jax.model.hf_io import resolve_dtype
from dirl_jax.optim import make_optimizer
from dirl_jax.rollout import decoder
from dirl_jax.rollout.engine import rollout_mesh
from dirl_jax.rollout.sampler import SamplingConfig
from dirl_jax.sharding import named_shardings
from dirl_jax.trainers.steps import Updater, make_train_step

# the config fields that shrink each program's memory, named when it does not fit
FIELDS_TO_CHANGE = {
    "sft_train_step": "train.grad_accum (a smaller micro-batch), mesh.fsdp, mesh.tensor, "
                      "model.remat, diffusion.loss_chunk",
    "dipo_gradients": "train.canvas_rows, train.row_length, mesh.fsdp, mesh.tensor, model.remat, "
                      "train.logprob_chunk",
    "dipo_score": "train.canvas_rows, train.row_length, mesh.fsdp, mesh.tensor, train.logprob_chunk",
    "dipo_apply": "mesh.fsdp, mesh.tensor",
    "rollout_prefill": "rollout.slots, rollout.max_prompt_tokens",
    "rollout_block_step": "rollout.slots, rollout.max_new_tokens",
    "rollout_chunk": "rollout.slots, rollout.max_new_tokens",
}


@dataclasses.dataclass
class Program:
    """One program of a run: ``lower()`` gives its ``jax.stages.Lowered`` (tracing records the
    attention implementations it calls into ``attention_impls``)."""

    name: str
    mesh: jax.sharding.Mesh
    build: Callable[[], Any]
    detail: str = ""
    engine: dict[str, int] = dataclasses.field(default_factory=dict)  # rollout: slots, capacity
    attention_impls: list[str] = dataclasses.field(default_factory=list)

    def lower(self) -> Any:
        with jax.set_mesh(self.mesh), recording_impls() as self.attention_impls:
            return self.build()

    @property
    def fields_to_change(self) -> str:
        return FIELDS_TO_CHANGE[self.name]


# ----------------------------------------------------------------------------- abstract state
def _abstract(x: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_train_model(config: ConfigDict, model_config: SDARConfig):
    """The run's model with abstract leaves: compute dtype, parameter dtype and remat as configured."""
    return abstract_model(model_config, dtype=resolve_dtype(config.train.compute_dtype),
                          param_dtype=resolve_dtype(config.train.param_dtype),
                          remat=config.model.remat)


def sharded_params(model, mesh: jax.sharding.Mesh, which: Any = nnx.Param):
    """``(graphdef, parameters)`` of an abstract model, each leaf carrying its sharding on ``mesh``."""
    graphdef, params = nnx.split(model, which) if which is not None else nnx.split(model)
    shardings = named_shardings(params, mesh)
    return graphdef, jax.tree.map(_abstract, params, shardings)


def optimizer_state(tx, params, mesh: jax.sharding.Mesh):
    """The abstract optimizer state of ``tx`` for ``params``: subtrees shaped like the parameters
    (the AdamW moments) sharded like them, every other leaf (counters) replicated, as
    :func:`dirl_jax.mesh.on_mesh` places a fresh state."""
    state = jax.eval_shape(tx.init, params)
    structure = jax.tree.structure(params)

    def like_params(node: Any) -> bool:
        return jax.tree.structure(node) == structure

    def place(node: Any) -> Any:
        if like_params(node):
            return jax.tree.map(lambda s, p: _abstract(s, p.sharding), node, params)
        return _abstract(node, mesh_lib.replicated(mesh))
    return jax.tree.map(place, state, is_leaf=lambda x: like_params(x) or hasattr(x, "shape"))


def _rows(shape: tuple[int, ...], dtype: Any, mesh: jax.sharding.Mesh, row_axis: int
          ) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(mesh, len(shape), row_axis))


def _replicated(shape: tuple[int, ...], dtype: Any, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.replicated(mesh))


def _key(mesh: jax.sharding.Mesh, shape: tuple[int, ...] = ()) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), max(1, int(np.prod(shape)))))
    return jax.ShapeDtypeStruct(shape, key.dtype, sharding=mesh_lib.replicated(mesh))


# ----------------------------------------------------------------------------- SFT
def sft_programs(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh
                 ) -> list[Program]:
    """The SFT train step at the config's micro-batch, gradient accumulation and sample length."""
    t = config.train
    accum, micro, length = t.grad_accum, t.global_batch // t.grad_accum, config.data.max_length
    graphdef, params = sharded_params(abstract_train_model(config, model_config), mesh)
    tx = make_optimizer(t)
    opt_state = optimizer_state(tx, params, mesh)
    step = make_train_step(graphdef, tx, config, model_config)
    batch = {name: _rows((accum, micro, length), jnp.int32, mesh, 1)
             for name in ("tokens", "labels", "positions", "segment_ids")}
    detail = (f"{micro} rows x {length} tokens per micro-batch ({2 * length}-token canvas), "
              f"grad_accum {accum}")
    return [Program("sft_train_step", mesh, lambda: step.lower(params, opt_state, batch, _key(mesh)),
                    detail)]


# ----------------------------------------------------------------------------- DiPO
def dipo_micro_batch(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh
                     ) -> dict[str, jax.ShapeDtypeStruct]:
    """An abstract DiPO micro-batch with the trainer's exact fields, shapes and dtypes (those
    :func:`dirl_jax.dipo.micro_batches` makes, placed as :meth:`Updater.place` places them)."""
    t, b = config.train, model_config.block_size
    one = dipo.Trajectory(prompt=[0], response=[0] * b, step_map=[1] * b, num_loss_tokens=b)
    packed = dipo.pack_rounds([one], block_size=b, mask_token_id=model_config.mask_token_id,
                              row_length=t.row_length)
    host = dipo.micro_batches(packed, [one], np.zeros(b, np.float32), rows=t.canvas_rows,
                              scored_per_row=t.row_length,
                              aggregation=t.loss_aggregation)[0]
    if t.kl_beta > 0:
        host["ref_logp"] = host["old_logp"]
    return {k: _rows(v.shape, v.dtype, mesh, 0) if v.ndim == 2 else _replicated(v.shape, v.dtype, mesh)
            for k, v in host.items()}


def dipo_update_programs(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh
                         ) -> list[Program]:
    """The DiPO update's programs: a micro-batch's gradients, the optimizer apply and the
    log-prob scoring pass (reference / trainer-side old log-probs)."""
    graphdef, params = sharded_params(abstract_train_model(config, model_config), mesh)
    tx = make_optimizer(config.train)
    opt_state = optimizer_state(tx, params, mesh)
    jitted = Updater(graphdef, tx, config, mesh).programs
    batch = dipo_micro_batch(config, model_config, mesh)
    t = config.train
    detail = f"{t.canvas_rows} canvas rows x {t.row_length} slots"
    return [
        Program("dipo_gradients", mesh, lambda: jitted["dipo_gradients"].lower(params, batch), detail),
        Program("dipo_apply", mesh, lambda: jitted["dipo_apply"].lower(params, opt_state, params),
                "AdamW over every parameter"),
        Program("dipo_score", mesh, lambda: jitted["dipo_score"].lower(params, batch), detail),
    ]


# ----------------------------------------------------------------------------- rollout engine
def rollout_rows(config: ConfigDict, process_count: int) -> int:
    """Rows one host decodes at once: ``rollout.slots``, else every row of a sampling round."""
    r = config.rollout
    if r.slots:
        return r.slots
    oversample = dipo.oversample_factor(r.oversample, dynamic_sampling=config.train.dynamic_sampling,
                                        group_size=r.group_size, source=config.data.source)
    return -(-r.prompts_per_step * r.group_size * oversample // process_count)


def engine_shape(config: ConfigDict, sampling: SamplingConfig, engine_mesh: jax.sharding.Mesh,
                 hosts: int, slots: int | None = None) -> tuple[int, int, int]:
    """``(slots, prompt bucket, cache slots per row)`` of the engine's largest programs: the
    slots rounded up to the data shards as the decoder rounds them, the longest prompt bucket."""
    rows = slots or rollout_rows(config, hosts)
    shards = int(np.prod([engine_mesh.shape[a] for a in decoder.row_axes(engine_mesh)]))
    rows = -(-rows // shards) * shards
    bucket = -(-config.rollout.max_prompt_tokens // decoder.PROMPT_BUCKET) * decoder.PROMPT_BUCKET
    return rows, bucket, decoder.capacity_for(bucket, sampling)


def rollout_programs(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh,
                     slots: int | None = None) -> list[Program]:
    """The in-process engine's programs on the mesh a run decodes on (the trainer's for one host;
    one host's devices with a replica of the parameters for several): the prefill of a full
    admission, one block forward (the denoising step with the previous block's fused commit, or
    the separate commit forward: one program either way) and the decode chunk the host loop
    calls, at the longest prompt bucket and the full attention window (the largest they run)."""
    r = config.rollout
    if not r.max_prompt_tokens:
        raise ValueError("rollout.max_prompt_tokens: 0 (no cap) leaves the prefill's shape open; "
                         "set the cap the run uses to size the rollout programs")
    hosts = {d.process_index for d in mesh.devices.flat}
    first_host = [d for d in mesh.devices.flat if d.process_index == min(hosts)]
    engine_mesh = rollout_mesh(mesh, first_host, len(hosts)) or mesh_lib.make_mesh(
        (1, 1, 1), first_host[:1])
    sampling = SamplingConfig.from_fields(
        r, block_size=model_config.block_size, mask_token_id=model_config.mask_token_id,
        stop_ids=(model_config.eos_token_id or 0,), attn_impl=config.model.attention_impl)
    rows, bucket, capacity = engine_shape(config, sampling, engine_mesh, len(hosts), slots)
    model = abstract_train_model(config, model_config)
    graphdef, params = sharded_params(model, engine_mesh, which=None)
    state = jax.eval_shape(lambda: decoder.empty_slots(model, rows, capacity, sampling))
    state = jax.tree.map(_abstract, state, decoder.slot_shardings(engine_mesh, state))
    platform = engine_mesh.devices.flat[0].platform
    fused = decoder.resolve_commit(r.commit, platform) == "fused"

    def ints(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return _replicated(shape, jnp.int32, engine_mesh)

    def prefill() -> Any:
        return decoder.admit_jit.lower(graphdef, params, state, ints((rows,)), ints((rows, bucket)),
                                        ints((rows,)), ints((rows,)), _key(engine_mesh, (rows,)),
                                        ints((rows,)), sampling)

    block_step = jax.jit(lambda p, s: decoder.forward_step(nnx.merge(graphdef, p), s, sampling,
                                                           capacity, fused),
                         donate_argnums=1)
    where = f"{rows} slots x {capacity} cache slots, {'fused' if fused else 'separate'} commit"
    shape = {"slots": rows, "capacity": capacity}
    return [
        Program("rollout_prefill", engine_mesh, prefill, f"{rows} prompts x {bucket} tokens",
                engine=shape),
        Program("rollout_block_step", engine_mesh, lambda: block_step.lower(params, state), where,
                engine=shape),
        Program("rollout_chunk", engine_mesh, functools.partial(
            decoder.run_chunk_jit.lower, graphdef, params, state, ints(()), sampling, capacity,
            fused, None), where, engine=shape),
    ]


def run_programs(config: ConfigDict, model_config: SDARConfig, mesh: jax.sharding.Mesh,
                 slots: int | None = None) -> list[Program]:
    """Every program of the run the config describes (SFT or DiPO)."""
    if config.task == "dipo":
        return (dipo_update_programs(config, model_config, mesh)
                + rollout_programs(config, model_config, mesh, slots))
    return sft_programs(config, model_config, mesh)
