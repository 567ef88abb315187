"""JAX model parameters -> torch tensors keyed by the HF SDAR parameter names.

The JAX model already stores every parameter under its HF name and in the HF layout (Linear
weights ``[out, in]``), so the conversion is a rename-free dtype cast plus a change of framework.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx

from dirl_jax.model import SDARForCausalLM, hf_name, to_host

_JAX_DTYPES = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}


def jax_dtype(dtype: torch.dtype) -> jnp.dtype:
    """The JAX dtype of a supported torch floating dtype."""
    if dtype not in _JAX_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(map(str, _JAX_DTYPES))}, got {dtype}")
    return _JAX_DTYPES[dtype]


def _single_gpu(value: jax.Array) -> jax.Array | None:
    """``value`` on one GPU (gathered onto its first local GPU when it spans several), or None
    when it is not wholly on this process's GPUs."""
    devices = value.devices()
    if not value.is_fully_addressable or any(d.platform != "gpu" for d in devices):
        return None
    if len(devices) > 1:
        return jax.device_put(value, min(devices, key=lambda d: d.id))
    return value


def _host_tensor(value: jax.Array) -> torch.Tensor:
    """A torch CPU copy through NumPy (bf16 through its 16-bit pattern: torch cannot read
    NumPy's ml_dtypes bfloat16)."""
    host = np.array(to_host(value), copy=True)  # owns its memory, writable
    if host.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(host.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def to_torch(value: jax.Array | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """One JAX (or NumPy) array as a torch tensor of ``dtype``, cast by JAX on its device.

    On GPU the result shares the JAX buffer through DLPack (no host copy): copy it before that
    buffer may be donated or deleted. Anywhere else (CPU, TPU) it is a host copy.
    """
    value = jnp.asarray(value, dtype=jax_dtype(dtype))
    on_gpu = _single_gpu(value)
    if on_gpu is not None:
        return torch.from_dlpack(on_gpu)
    return _host_tensor(value)


def named_tensors(params: nnx.State, dtype: torch.dtype = torch.bfloat16
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, torch tensor)`` of every variable in ``params`` (e.g. ``nnx.state(model,
    nnx.Param)``), converted lazily one at a time so at most one extra tensor is alive."""
    for path, var in nnx.to_flat_state(params):
        yield hf_name(path), to_torch(var.get_value(), dtype)


def to_torch_state_dict(model: SDARForCausalLM, dtype: torch.dtype = torch.bfloat16
                        ) -> dict[str, torch.Tensor]:
    """Every parameter as a CPU torch tensor of ``dtype``, named as in HF checkpoints."""
    return {name: tensor.cpu() for name, tensor in named_tensors(nnx.state(model, nnx.Param), dtype)}
