"""JAX model parameters -> a torch ``state_dict`` keyed by the HF SDAR parameter names."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import nnx

from dirl_jax.model.hf_io import hf_name
from dirl_jax.model.sdar import SDARForCausalLM


def to_torch_state_dict(model: SDARForCausalLM, dtype: torch.dtype = torch.bfloat16
                        ) -> dict[str, torch.Tensor]:
    """Every parameter as a CPU torch tensor of ``dtype``, named as in HF checkpoints.

    bf16 goes through a float32 host copy (NumPy has no native bfloat16 that torch reads).
    """
    state = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        host = np.array(jax.device_get(var.get_value()), dtype=np.float32)  # writable copy
        state[hf_name(path)] = torch.from_numpy(host).to(dtype)
    return state
