"""Rollouts: the in-process JAX block-diffusion engine and its unmasking rules."""
