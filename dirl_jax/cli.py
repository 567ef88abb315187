"""What the ``python -m dirl_jax.train`` / ``dirl_jax.evaluate`` command lines share: the
``--config`` flag (a ``configs/*.py`` file with ``--config.a.b=value`` overrides) and the
multi-host flags, defined when the command starts (never on import), then the task. A problem
the user can fix (a config field, a data file, a checkpoint, a locked run directory, a full disk)
ends the command with one line, ``error: <what and where>``, and exit status 1."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

from dirl_jax import distributed


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message alone tells the user what to fix (each names its field,
    file or path)."""
    from dirl_jax.checkpoint import CheckpointCorrupt, CheckpointWriteError
    from dirl_jax.config import ConfigValueError
    from dirl_jax.data.records import DataError
    from dirl_jax.metrics import MetricsWriteError
    from dirl_jax.model import CheckpointError, ConfigError
    from dirl_jax.run_lock import RunDirLocked
    return (ConfigValueError, DataError, ConfigError, CheckpointError, CheckpointCorrupt,
            CheckpointWriteError, RunDirLocked,
            MetricsWriteError)


def run_config_command(task: Callable[[ConfigDict], object], config_help: str) -> None:
    """Parses the command line and runs ``task(config)`` after joining a multi-host run."""
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    distributed.define_flags()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if flags.FLAGS.config is None:
            raise app.UsageError(f"--config is required: {config_help}")
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
        distributed.initialize_from_flags()  # multi-host: before any JAX computation
        try:
            task(flags.FLAGS.config)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(main)
