"""The torch / LMDeploy side of dirl-jax: JAX parameters as torch tensors with HF names.

Depends on ``dirl_jax``; ``dirl_jax`` never imports this package.
"""

from torch_bridge.state_dict import to_torch_state_dict

__all__ = ["to_torch_state_dict"]
