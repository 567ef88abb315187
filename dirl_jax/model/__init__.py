"""SDAR model: configuration, Flax NNX modules, HF checkpoint I/O (the logical sharding axes are
in :mod:`dirl_jax.sharding`)."""

from dirl_jax.model.config import ConfigError, SDARConfig
from dirl_jax.model.hf_io import (CheckpointError, abstract_model, atomic_directory, hf_name,
                                  load_model, parameter_shapes, plan_shards, resolve_dtype,
                                  save_model, to_host)
from dirl_jax.model.paths import ModelPathError, is_run_dir, resolve_model_dir, run_export_dir
from dirl_jax.model.sdar import SDARForCausalLM

__all__ = ["CheckpointError", "ConfigError", "ModelPathError", "SDARConfig", "SDARForCausalLM",
           "abstract_model", "atomic_directory", "hf_name", "is_run_dir", "load_model",
           "parameter_shapes", "plan_shards", "resolve_dtype", "resolve_model_dir", "run_export_dir",
           "save_model", "to_host"]
