"""The torch / LMDeploy side of dirl-jax: JAX parameters as torch tensors with HF names.

Depends on ``dirl_jax``; ``dirl_jax`` never imports this package.
"""

from torch_bridge.lmdeploy_client import LMDeployEngine, RolloutError
from torch_bridge.state_dict import to_torch_state_dict
from torch_bridge.weight_push import IPCWeightPusher, NCCLWeightPusher, push_to_agents

__all__ = ["IPCWeightPusher", "LMDeployEngine", "NCCLWeightPusher", "RolloutError",
           "push_to_agents", "to_torch_state_dict"]
