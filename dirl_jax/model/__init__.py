"""SDAR model: configuration, Flax NNX modules, HF checkpoint I/O, sharding axes."""

from dirl_jax.model.config import ConfigError, SDARConfig
from dirl_jax.model.hf_io import (CheckpointError, abstract_model, load_model, parameter_shapes,
                                  save_model)
from dirl_jax.model.sdar import SDARForCausalLM

__all__ = ["CheckpointError", "ConfigError", "SDARConfig", "SDARForCausalLM", "abstract_model",
           "load_model", "parameter_shapes", "save_model"]
