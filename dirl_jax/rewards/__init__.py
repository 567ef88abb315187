"""Answer extraction and grading."""

from dirl_jax.rewards.extract import extract_last_boxed

__all__ = ["extract_last_boxed"]
