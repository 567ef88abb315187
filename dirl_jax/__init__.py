"""dirl-jax: post-training of block-diffusion language models (SDAR / DiRL) in JAX."""

from dirl_jax.xla_cpu import apply_defaults

apply_defaults()  # before JAX starts a backend (dirl_jax.xla_cpu)

from dirl_jax.canvas import Canvas  # noqa: E402
from dirl_jax.model import SDARConfig, SDARForCausalLM, load_model, save_model  # noqa: E402
from dirl_jax.rollout.decoder import generate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Canvas", "SDARConfig", "SDARForCausalLM", "generate", "load_model", "save_model",
           "__version__"]
