"""The torch / LMDeploy side of dirl-jax: JAX parameters as torch tensors with HF names.

Depends on ``dirl_jax``; ``dirl_jax`` never imports this package. Importing it (or
``torch_bridge.export``, ``torch_bridge.configuration_sdar``) needs no LMDeploy: only the code that
talks to servers imports it, when first used.
"""

import importlib
from typing import Any

_EXPORTS = {"LMDeployEngine": "lmdeploy_client", "RolloutError": "lmdeploy_client",
            "to_torch_state_dict": "state_dict", "IPCWeightPusher": "weight_push",
            "NCCLWeightPusher": "weight_push", "push_to_agents": "weight_push"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torch_bridge' has no attribute {name!r}")
    return getattr(importlib.import_module(f"torch_bridge.{_EXPORTS[name]}"), name)
