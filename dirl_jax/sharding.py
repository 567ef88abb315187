"""The logical axes of the SDAR model's parameters and activations, and their mapping onto the
mesh axes (``data``, ``fsdp``, ``tensor``; see :mod:`dirl_jax.mesh`): one table for both."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Parameters:
#   vocab        vocabulary rows of the embedding and lm_head
#   embed        the hidden (model) dimension
#   q_heads      flattened query heads x head_dim; kv_heads likewise for keys/values
#   mlp          the SwiGLU intermediate dimension
#   norm         RMSNorm scales (replicated)
# Activations:
#   batch        rows of a batch or canvas
#   length       tokens of a row (whole rows: attention needs them)
#   act_embed    the residual stream's hidden dimension
#   act_heads    attention heads of queries / outputs; act_kv_heads of keys and values
#   head_dim     the per-head dimension
#   act_mlp      the SwiGLU intermediate
#   act_vocab    logits over the vocabulary
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def _present(axis: str | tuple[str, ...] | None, names: set[str]) -> str | tuple[str, ...] | None:
    """``axis`` restricted to the mesh axes in ``names`` (None when none is left)."""
    kept = tuple(a for a in ((axis,) if isinstance(axis, str) else axis or ()) if a in names)
    return kept[0] if len(kept) == 1 else (kept or None)


def rules_for_mesh(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Rules:
    """``rules`` with mesh axes the mesh does not have dropped (a rule left with none replicates)."""
    return tuple((logical, _present(axis, set(mesh.axis_names))) for logical, axis in rules)


def named_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh,
                    rules: Rules = DEFAULT_RULES) -> nnx.State:
    """The ``NamedSharding`` of every parameter of an abstract model state on ``mesh``."""
    with nnx.logical_axis_rules(rules_for_mesh(mesh, rules)):
        return nnx.get_named_sharding(abstract_state, mesh)


def dividing_axis(mesh: Any, axis: str | tuple[str, ...] | None, *dims: int
                  ) -> str | tuple[str, ...] | None:
    """``axis`` (mesh axes, as a partition spec names them) when its shards divide every one of
    ``dims``, else ``None`` (the dimension stays whole)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    shards = math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))
    return axis if all(d % shards == 0 for d in dims) else None


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """``x`` constrained to the sharding its logical ``axes`` map to under the current mesh
    (``jax.set_mesh``); ``None`` leaves a dimension to XLA. A no-op without a mesh; mesh axes that
    are manual here (inside ``shard_map``) or that do not divide the dimension are left out."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    usable = set(mesh.axis_names) - set(mesh.manual_axes)
    if not usable:
        return x
    table = dict(rules)
    spec = []
    for size, name in zip(x.shape, axes):
        if name is None:
            spec.append(jax.sharding.PartitionSpec.UNCONSTRAINED)
            continue
        spec.append(dividing_axis(mesh, _present(table[name], usable), size))
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def local_rows(rows: int, rules: Rules = DEFAULT_RULES) -> int:
    """How many of ``rows`` batch rows one device holds under the current mesh (``jax.set_mesh``;
    all of them without one): rows are sharded over the ``batch`` rule's axes when they divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return rows
    axis = dividing_axis(mesh, dict(rules_for_mesh(mesh, rules))["batch"], rows)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return rows // math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))
