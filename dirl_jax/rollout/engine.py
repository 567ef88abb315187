"""The rollout-engine interface the RL loop talks to, and its in-process JAX implementation.

An engine turns token-id prompts into sampled responses with step maps and log-probs
(``generate``) and takes fresh policy parameters after every update (``update_weights``). The
LMDeploy client (``torch_bridge``) implements the same two methods.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from dirl_jax import mesh as mesh_lib
from dirl_jax.model.sdar import SDARForCausalLM
from dirl_jax.rollout.engine_names import ENGINE_ALIASES
from dirl_jax.rollout.decoder import decode_prompts
from dirl_jax.rollout.sampler import SamplingConfig


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int, row_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One result per prompt (see :func:`dirl_jax.rollout.decoder.decode_prompts`); with
        ``row_seeds``, each prompt's sample depends only on ``seed`` and its own row seed."""

    def update_weights(self, params: nnx.State) -> None:
        """Makes the next ``generate`` sample from ``params`` (an ``nnx.Param`` state)."""


class InProcessEngine:
    """Decodes with the trainer's own model on this host's devices.

    In a one-process run the engine decodes on the trainer's mesh with the trainer's parameter
    arrays as they are sharded (tensor-parallel heads / MLP / vocabulary, slots over the data
    axes; fsdp-sharded weights are gathered per forward by XLA, as in training); ``update_weights``
    swaps the arrays (no copy, no host round trip). When the trainer spans hosts, each host
    decodes its own rows on its own devices from a replica of the parameters, all-gathered on
    device after every update.
    """

    def __init__(self, model: SDARForCausalLM, *, pad_token_id: int = 0,
                 mesh: jax.sharding.Mesh | None = None, slots: int = 0, commit: str = "auto"):
        graphdef, state = nnx.split(model)
        self.model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # own variables, same arrays
        self.pad_token_id = pad_token_id
        self.mesh = mesh
        self.slots = slots or None  # None: every row of a call at once
        self.commit = commit
        if jax.process_count() > 1:
            self.update_weights(nnx.state(model, nnx.Param))

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int, row_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
        return decode_prompts(self.model, [list(p) for p in prompts], sampling, seed=seed,
                              row_seeds=row_seeds, pad_token_id=self.pad_token_id, mesh=self.mesh,
                              slots=self.slots, commit=self.commit)

    def update_weights(self, params: nnx.State) -> None:
        if jax.process_count() > 1:
            devices = self.mesh.devices.flat if self.mesh is not None else jax.local_devices()[:1]
            params = mesh_lib.local_replica(params, list(devices))
        nnx.update(self.model, params)


def rollout_mesh(mesh: jax.sharding.Mesh | None, local_devices: Sequence[Any], process_count: int
                 ) -> jax.sharding.Mesh | None:
    """The mesh the in-process engine decodes on: the trainer's ``mesh`` in a one-process run;
    otherwise every host decodes its own rows on its ``local_devices`` (a ``data`` mesh of them,
    None for one device) from a replica of the parameters."""
    if mesh is not None and process_count == 1:
        return mesh
    devices = list(local_devices)
    return jax.sharding.Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def make_engine(spec: str, model: SDARForCausalLM, sampling: SamplingConfig, *, pad_token_id: int,
                tokenizer: str, options: dict[str, Any] | None = None,
                mesh: jax.sharding.Mesh | None = None, slots: int = 0,
                commit: str = "auto") -> RolloutEngine:
    """The engine named by ``spec``: ``"jax"`` is the in-process engine (on the trainer's
    ``mesh`` in a one-process run, else over this host's devices); ``"lmdeploy"`` or any
    ``"module:Class"`` (see ``ENGINE_ALIASES``) is constructed with the decoding settings its
    servers must have been launched with (``served=sampling``), the ``tokenizer`` path and
    ``options`` (servers, weight push, ...). ``dirl_jax`` itself never imports such a module.
    ``slots`` and ``commit`` configure the in-process engine (:mod:`dirl_jax.rollout.decoder`)."""
    if spec == "jax":
        return InProcessEngine(model, pad_token_id=pad_token_id,
                               mesh=rollout_mesh(mesh, jax.local_devices(), jax.process_count()),
                               slots=slots, commit=commit)
    module, _, name = ENGINE_ALIASES.get(spec, spec).partition(":")
    if not module or not name:
        raise ValueError(f"engine: expected 'jax' or 'module:Class', got {spec!r}")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(tokenizer=tokenizer, served=sampling, **dict(options or {}))
