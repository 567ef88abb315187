"""``python -m dirl_jax.train --config configs/<name>.py [--config.a.b=v ...]``: the command line
of both training tasks. ``task = "sft"`` runs :func:`dirl_jax.trainers.sft.run_sft` (blockwise
diffusion SFT), ``task = "dipo"`` :func:`dirl_jax.trainers.dipo.run_dipo` (online RL)."""

from __future__ import annotations

from ml_collections import ConfigDict

from dirl_jax.cli import run_config_command
from dirl_jax.config import sft_defaults


def train(config: ConfigDict) -> None:
    """Runs the task the config names."""
    if config.task == "dipo":
        from dirl_jax.trainers.dipo import run_dipo
        run_dipo(config)
    else:
        from dirl_jax.trainers.sft import run_sft
        run_sft(config)


if __name__ == "__main__":
    run_config_command(train, __doc__, sft_defaults)
