"""The names a config may give a rollout engine (kept apart from the engines themselves, so the
config checks import no engine)."""

from __future__ import annotations

# Short names for external engines (resolved by import path: dirl_jax never imports them).
ENGINE_ALIASES = {"lmdeploy": "torch_bridge.lmdeploy_client:LMDeployEngine"}


def engine_spec_problem(spec: str) -> str | None:
    """Why ``spec`` names no engine (None when it does): ``"jax"``, an alias or ``module:Class``."""
    if spec in ("jax", *ENGINE_ALIASES) or ":" in spec:
        return None
    return f"must be 'jax', one of {tuple(ENGINE_ALIASES)} or 'module:Class', got {spec!r}"
