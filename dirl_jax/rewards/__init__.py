"""Answer extraction, grading and the reward registry."""

from dirl_jax.rewards.extract import extract_last_boxed
from dirl_jax.rewards.grading import grade, grade_all
from dirl_jax.rewards.registry import REWARDS, Response, weighted_rewards

__all__ = ["REWARDS", "Response", "extract_last_boxed", "grade", "grade_all", "weighted_rewards"]
