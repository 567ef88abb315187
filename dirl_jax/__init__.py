"""dirl-jax: post-training of block-diffusion language models (SDAR / DiRL) in JAX."""

from dirl_jax.canvas import Canvas
from dirl_jax.model import SDARConfig, SDARForCausalLM, load_model, save_model
from dirl_jax.rollout.decoder import generate

__version__ = "0.1.0"

__all__ = ["Canvas", "SDARConfig", "SDARForCausalLM", "generate", "load_model", "save_model",
           "__version__"]
