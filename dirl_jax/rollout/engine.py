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

from dirl_jax.model.sdar import SDARForCausalLM
from dirl_jax.rollout.sampler import SamplingConfig, decode_prompts


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int, row_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One result per prompt (see :func:`dirl_jax.rollout.sampler.decode_prompts`); with
        ``row_seeds``, each prompt's sample depends only on ``seed`` and its own row seed."""

    def update_weights(self, params: nnx.State) -> None:
        """Makes the next ``generate`` sample from ``params`` (an ``nnx.Param`` state)."""


class InProcessEngine:
    """Decodes with the trainer's own model on the trainer's devices.

    ``update_weights`` swaps the parameter arrays in place (no host round trip, no disk): the
    engine and the trainer share device buffers.
    """

    def __init__(self, model: SDARForCausalLM, *, pad_token_id: int = 0,
                 mesh: jax.sharding.Mesh | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.mesh = mesh

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int, row_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
        return decode_prompts(self.model, [list(p) for p in prompts], sampling, seed=seed,
                              row_seeds=row_seeds, pad_token_id=self.pad_token_id, mesh=self.mesh)

    def update_weights(self, params: nnx.State) -> None:
        nnx.update(self.model, params)


# Short names for external engines (resolved by import path: dirl_jax never imports them).
ENGINE_ALIASES = {"lmdeploy": "torch_bridge.lmdeploy_client:LMDeployEngine"}


def make_engine(spec: str, model: SDARForCausalLM, sampling: SamplingConfig, *, pad_token_id: int,
                tokenizer: str, options: dict[str, Any] | None = None) -> RolloutEngine:
    """The engine named by ``spec``: ``"jax"`` is the in-process engine over this host's devices;
    ``"lmdeploy"`` or any ``"module:Class"`` (see ``ENGINE_ALIASES``) is constructed with
    the decoding settings its servers must have been launched with, the ``tokenizer`` path and
    ``options`` (servers, weight push, ...). ``dirl_jax`` itself never imports such a module."""
    if spec == "jax":
        devices = jax.local_devices()
        mesh = jax.sharding.Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
        return InProcessEngine(model, pad_token_id=pad_token_id, mesh=mesh)
    module, _, name = ENGINE_ALIASES.get(spec, spec).partition(":")
    if not module or not name:
        raise ValueError(f"engine: expected 'jax' or 'module:Class', got {spec!r}")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(tokenizer=tokenizer, block_size=sampling.block_size,
                        strategy=sampling.strategy, threshold=sampling.threshold,
                        denoising_steps=sampling.denoising_steps, **dict(options or {}))
