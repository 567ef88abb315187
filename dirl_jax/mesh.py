"""The device mesh of a run: ``data x fsdp x tensor`` over every device of every process.

Parameters are sharded by their logical axes (:mod:`dirl_jax.sharding`: the hidden dimension
over ``fsdp``, heads / MLP / vocabulary over ``tensor``); batches are sharded over
``data x fsdp`` by rows. The same config runs on one device, on several, and on many hosts: a mesh
axis of size 1 shards nothing. Every size is checked against the model and the batch before
anything is compiled, with an error naming the config field.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax.config import check
from dirl_jax.model import SDARConfig
from dirl_jax.sharding import DEFAULT_RULES, named_shardings, rules_for_mesh

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = dict(DEFAULT_RULES)["batch"]  # rows of a batch


def mesh_shape(mesh_config: ConfigDict, device_count: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)``; ``data = 0`` ("auto") takes the devices the others leave."""
    data, fsdp, tensor = (int(mesh_config[a]) for a in AXES)
    check(fsdp >= 1 and tensor >= 1 and data >= 0, "mesh",
          f"fsdp and tensor must be >= 1 and data >= 0 (0 = auto), got {data}x{fsdp}x{tensor}")
    check(device_count % (fsdp * tensor) == 0, "mesh",
          f"fsdp x tensor = {fsdp * tensor} does not divide the {device_count} devices")
    data = data or device_count // (fsdp * tensor)
    check(data * fsdp * tensor == device_count, "mesh",
          f"data x fsdp x tensor = {data}x{fsdp}x{tensor} = {data * fsdp * tensor}, "
          f"but the run has {device_count} devices")
    return data, fsdp, tensor


def check_mesh_fits(shape: tuple[int, int, int], model_config: SDARConfig, rows_per_micro_batch: int,
                    rows_field: str = "train.global_batch") -> None:
    """Every sharded dimension divides evenly: heads, KV heads, MLP and vocabulary by ``tensor``,
    the hidden size by ``fsdp``, the rows of a micro-batch (config field ``rows_field``) by
    ``data x fsdp``."""
    data, fsdp, tensor = shape
    c = model_config
    for field, size in (("num_attention_heads", c.num_attention_heads),
                        ("num_key_value_heads", c.num_key_value_heads),
                        ("intermediate_size", c.intermediate_size), ("vocab_size", c.vocab_size)):
        check(size % tensor == 0, "mesh.tensor", f"({tensor}) must divide the model's {field} ({size})")
    check(c.hidden_size % fsdp == 0, "mesh.fsdp",
          f"({fsdp}) must divide the model's hidden_size ({c.hidden_size})")
    shards = data * fsdp
    check(rows_per_micro_batch % shards == 0, rows_field,
          f"a micro-batch of {rows_per_micro_batch} rows must be divisible by "
          f"mesh.data x mesh.fsdp = {shards} (the next multiple: {-(-rows_per_micro_batch // shards) * shards})")


def make_mesh(shape: tuple[int, int, int], devices: Any = None) -> jax.sharding.Mesh:
    """The mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, row_axis: int) -> jax.sharding.NamedSharding:
    """Rows (axis ``row_axis`` of an ``ndim`` array) over ``data x fsdp``, the rest replicated."""
    spec = [None] * ndim
    spec[row_axis] = BATCH_AXES
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, row_axis: int
                 ) -> dict[str, jax.Array]:
    """A global batch from every process's rows (``local``: this host's share, rows on
    ``row_axis``), sharded by rows over ``data x fsdp``."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, row_axis), v)
            for k, v in local.items()}


def from_host_copy(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value that every process holds in full: each process places
    the slices its own devices hold (no communication)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _identity(tree: Any) -> Any:
    return tree


def local_replica(tree: Any, devices: Any) -> Any:
    """Full copies of ``tree``'s arrays on each of ``devices`` (this host's), replicated over a
    one-axis mesh of them. Arrays sharded across hosts are all-gathered on device first (a
    collective: every process calls it); no host round trip."""
    target = replicated(jax.sharding.Mesh(np.asarray(devices), ("data",)))
    if not all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        tree = jax.jit(_identity, out_shardings=jax.tree.map(
            lambda x: x.sharding if x.is_fully_addressable else replicated(x.sharding.mesh), tree))(tree)

    def place(x: jax.Array) -> jax.Array:
        if x.is_fully_addressable:
            return jax.device_put(x, target)
        shards = {shard.device: shard.data for shard in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(x.shape, target, [shards[d] for d in devices])
    return jax.tree.map(place, tree)


def sharded_model(create: Callable[[], nnx.Module], mesh: jax.sharding.Mesh,
                  rules=DEFAULT_RULES) -> nnx.Module:
    """``create()`` built directly in its sharding: the shapes come from ``nnx.eval_shape`` and
    one jitted initialisation writes every parameter into its place, so the full model never
    materialises on one device."""
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = named_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init() -> nnx.State:
        return nnx.state(create())

    with nnx.logical_axis_rules(rules_for_mesh(mesh, rules)):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` with every leaf not already sharded over ``mesh`` replicated on it (e.g. the step
    count of a freshly initialised optimizer state, whose moments follow the parameters)."""
    def place(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated(mesh))
    return jax.tree.map(place, tree)
