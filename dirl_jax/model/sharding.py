"""Logical parameter axes of the SDAR model and their default mapping onto mesh axes."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

# Logical axis names used by the model's parameters:
#   vocab     vocabulary rows of the embedding and lm_head
#   embed     the hidden (model) dimension
#   q_heads   flattened query heads x head_dim; kv_heads likewise for keys/values
#   mlp       the SwiGLU intermediate dimension
#   norm      RMSNorm scales (replicated)
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def rules_for_mesh(mesh: jax.sharding.Mesh,
                   rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES
                   ) -> tuple[tuple[str, str | None], ...]:
    """``rules`` with mesh axes the mesh does not have replaced by None (replicated)."""
    return tuple((logical, axis if axis in mesh.axis_names else None) for logical, axis in rules)


def named_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> nnx.State:
    """The ``NamedSharding`` of every parameter of an abstract model state on ``mesh``."""
    with nnx.logical_axis_rules(rules_for_mesh(mesh, rules)):
        return nnx.get_named_sharding(abstract_state, mesh)
