"""What the command lines share. ``python -m dirl_jax.train`` / ``dirl_jax.evaluate`` take the
``--config`` flag (a ``configs/*.py`` file with ``--config.a.b=value`` overrides) and the
multi-host flags, defined when the command starts (never on import). Every command ends a problem
the user can fix (a config field or file, a data file, a model path, a checkpoint, a locked run
directory, a full disk) with one line, ``error: <what and where>``, and exit status 2; the
traceback only with ``--verbose`` or ``DIRL_DEBUG=1``. ``--help`` lists the config's fields with
their current values and exits 0."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from ml_collections import ConfigDict

USER_ERROR_STATUS = 2
DEBUG_ENV = "DIRL_DEBUG"
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message alone tells the user what to fix (each names its field,
    file or path)."""
    from dirl_jax.checkpoint import CheckpointCorrupt, CheckpointWriteError
    from dirl_jax.config import ConfigValueError
    from dirl_jax.data.records import DataError
    from dirl_jax.metrics import MetricsWriteError
    from dirl_jax.model import CheckpointError, ConfigError, ModelPathError
    from dirl_jax.run_lock import RunDirLocked
    return (ConfigValueError, DataError, ConfigError, CheckpointError, CheckpointCorrupt,
            CheckpointWriteError, ModelPathError, RunDirLocked, MetricsWriteError,
            FileNotFoundError, FileExistsError)  # these name their path


def debugging(argv: Sequence[str]) -> bool:
    """Tracebacks wanted: ``--verbose`` on the command line or ``DIRL_DEBUG`` set (not 0)."""
    return "--verbose" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def fail(message: str) -> NoReturn:
    """Ends the command with ``error: message`` (one line) and the user-error status."""
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


def error_message(e: BaseException) -> str:
    """The message of a user error (an ``OSError(errno, text)`` without its ``[Errno n]``)."""
    if isinstance(e, OSError) and e.strerror and e.filename is None:
        return e.strerror
    return str(e)


@contextlib.contextmanager
def one_line_errors(verbose: bool, errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turns :func:`user_errors` (and ``errors``) raised inside into :func:`fail`, unless
    ``verbose``."""
    try:
        yield
    except user_errors() + errors as e:
        if verbose:
            raise
        fail(error_message(e))


# ----------------------------------------------------------------------------- --config commands
def config_flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One line for a failure to load ``--config`` or apply a ``--config.a.b=v`` override."""
    from absl import flags
    config_path = flag_value(argv, "--config")
    if isinstance(e, flags.Error):
        return str(e).splitlines()[0]
    if isinstance(e, (KeyError, AttributeError)):
        lines = str(e.args[0] if e.args else e).strip("'\"").replace("\\'", "'").split("\\n")
        lines = [line for part in lines for line in part.splitlines()]
        key = lines[0].strip("'\"")
        if "get_config" in key:
            return f"--config {config_path}: defines no get_config() returning a ConfigDict"
        hint = next((re.sub(r'Did you mean "(.*?)".*', r"did you mean '\1'?", line)
                     for line in lines[1:] if line.startswith("Did you mean")), "")
        flag = next((a.split("=")[0] for a in argv
                     if a.startswith("--config.") and key in a.split("=")[0].split(".")), None)
        where = f"{flag}: " if flag else ""
        return f"{where}the config has no field {key!r}" + (f" ({hint})" if hint else "")
    if config_path is not None and not os.path.isfile(config_path):
        return f"--config {config_path}: no such file"
    if isinstance(e, SyntaxError):
        return f"--config {config_path}: line {e.lineno}: {e.msg}"
    return f"--config {config_path}: cannot be loaded: {type(e).__name__}: {e}"


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``name`` given as ``name=v`` or ``name v`` (None when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def config_fields(config: ConfigDict, prefix: str = "config") -> list[str]:
    """``config.a.b = value`` for every leaf field, in the config's order."""
    lines = []
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ConfigDict):
            lines.extend(config_fields(value, name))
        else:
            lines.append(f"{name} = {value!r}")
    return lines


def help_text(doc: str, config: ConfigDict, source: str) -> str:
    usage = re.sub(r"\n\s*\n", "\n\n", doc.strip())
    return (f"{usage}\n\nflags:\n  --config FILE        a configs/*.py file (get_config())\n"
            "  --config.a.b=VALUE   overrides one field (unknown fields and wrong types are refused)\n"
            "  --verbose            tracebacks for errors (or DIRL_DEBUG=1)\n"
            "  multi-host: --coordinator HOST:PORT, --num_processes N, --process_id I (default: detected)\n\n"
            f"config fields ({source}):\n  " + "\n  ".join(config_fields(config)) + "\n")


def run_config_command(task: Callable[[ConfigDict], object], doc: str,
                       defaults: Callable[[], ConfigDict], argv: Sequence[str] | None = None,
                       errors: tuple[type[BaseException], ...] = (), join_run: bool = True) -> None:
    """Parses ``argv`` (default ``sys.argv``) and runs ``task(config)`` after joining a multi-host
    run; ``defaults`` is the config ``--help`` lists when no ``--config`` is given; ``errors``
    are the command's own user errors (one line each, as :func:`user_errors`); ``join_run=False``
    for a command that never spans hosts."""
    from absl import flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    from dirl_jax import distributed

    argv = list(sys.argv if argv is None else argv)
    verbose = debugging(argv)
    argv = [a for a in argv if a != "--verbose"]
    wants_help = any(a in HELP_FLAGS for a in argv)
    argv = [a for a in argv if a not in HELP_FLAGS]
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    distributed.define_flags()
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS.config
        if config is not None:
            config = config.copy_and_resolve_references()  # loads the file now, not at first use
    except Exception as e:  # noqa: BLE001 - every parse failure becomes one line
        if verbose:
            raise
        fail(config_flag_error(e, argv))
    if wants_help:
        source = flag_value(argv, "--config") or "the defaults; --config FILE lists that file's"
        print(help_text(doc, config if config is not None else defaults(), source))
        sys.exit(0)
    if len(rest) > 1:
        fail(f"unexpected arguments: {' '.join(rest[1:])} (fields are set as --config.a.b=value)")
    if config is None:
        fail("--config is required: a configs/*.py file (e.g. configs/sft_tiny.py); --help lists "
             "the fields")
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    if join_run:
        distributed.initialize_from_flags()  # multi-host: before any JAX computation
    with one_line_errors(verbose, errors):
        task(config)
