"""Export for serving: a training run, one of its checkpoints or a HF SDAR directory as a model
directory that LMDeploy's PyTorch engine loads.

``python -m torch_bridge.export --checkpoint RUN_OR_CKPT --out DIR [--dtype bfloat16|float32]
[--step N] [--tokenizer DIR] [--overwrite]``

``RUN_OR_CKPT`` is one of

* a training run directory (its ``config.json`` has a ``task``): the latest committed orbax
  checkpoint in ``checkpoints/``, or ``--step N``; a run without checkpoints falls back to its
  ``export/`` HF directory;
* a checkpoint step directory ``<run>/checkpoints/<step>``;
* a HF SDAR directory (its ``config.json`` has a ``model_type``).

Only the parameters are restored from a checkpoint (no optimizer state, no data iterator). The
architecture comes from the run's ``export/config.json`` or, before the run exported, from the run
config exactly as the trainer built it (``init_from``'s ``config.json``, or ``model`` + tokenizer).
The tokenizer is the run's (``export/``, ``tokenizer/``, or ``tokenizer`` / ``init_from``).

The output holds :func:`dirl_jax.model.save_model`'s files (safetensors, ``config.json`` with
``architectures: ["SDARForCausalLM"]`` and ``model_type: "sdar"``, ``generation_config.json``,
tokenizer files) plus ``configuration_sdar.py`` (:mod:`torch_bridge.configuration_sdar`) and
``config.json``'s ``auto_map`` pointing at it, and ``dtype`` next to ``torch_dtype``. There is
deliberately no modeling file: LMDeploy runs its own SDAR implementation
(``lmdeploy/pytorch/models/sdar.py``, picked by ``architectures[0]``) and only needs the config
class, loaded as remote code, to parse ``config.json`` (``sdar`` is not a transformers model type).
Serve it with ``--trust-remote-code`` (``scripts/launch_lmdeploy.sh`` does). The weights have the
Qwen3 layout, so transformers' ``Qwen3ForCausalLM`` also loads them.

Everything is written to a temporary directory renamed into place at the end, its files
world-readable. ``--overwrite`` replaces only a previous export (it carries the marker file
``.dirl_export``) and never a directory that is or contains the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Sequence

from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import run
from dirl_jax.cli import debugging, one_line_errors
from dirl_jax.checkpoint import checkpoint_steps, restore_params
from dirl_jax.metrics import write_json_atomic
from dirl_jax.model import (SDARConfig, SDARForCausalLM,
                            abstract_model, atomic_directory, load_model, resolve_dtype,
                            resolve_model_dir, run_export_dir, save_model)
from dirl_jax.model.paths import RUN_CONFIG_KEY
from torch_bridge import configuration_sdar

EXPORT_DTYPES = ("bfloat16", "float32")
CONFIG_CLASS_FILE = "configuration_sdar.py"
AUTO_MAP = {"AutoConfig": "configuration_sdar.SDARConfig"}
TOKENIZER_CONFIG = "tokenizer_config.json"


class ExportError(ValueError):
    """The source cannot be exported; the message names the path and what was expected."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the weights come from: checkpoint ``step`` of ``run_dir``, or the HF ``hf_dir``."""

    hf_dir: str | None = None
    run_dir: str | None = None
    step: int | None = None


# ------------------------------------------------------------------------------ the source
def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from e


def _config_kind(path: str) -> str | None:
    """``"run"`` (a run config has a ``task``), ``"hf"`` (``model_type``) or None."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    config = _read_json(file)
    return "run" if RUN_CONFIG_KEY in config else "hf" if "model_type" in config else None


def _checkpoint_source(run_dir: str, step: int | None) -> Source:
    """``step`` (default: the latest committed one) of ``run_dir``'s checkpoints."""
    directory = os.path.join(run_dir, "checkpoints")
    steps = checkpoint_steps(directory) if os.path.isdir(directory) else []
    if step is not None and step not in steps:
        raise ExportError(f"{directory}: no committed checkpoint for step {step} "
                          f"(committed steps: {', '.join(map(str, steps)) or 'none'})")
    if steps:
        return Source(run_dir=run_dir, step=steps[-1] if step is None else step)
    export = run_export_dir(run_dir)
    if export == run_dir:
        raise ExportError(f"{run_dir}: training run with no committed checkpoint in checkpoints/ "
                          "and no export/config.json")
    return Source(hf_dir=export)


def _step_dir_source(path: str, step: int | None) -> Source:
    """``<run>/checkpoints/<step>``."""
    path_step = int(os.path.basename(path))
    if step is not None and step != path_step:
        raise ExportError(f"{path}: is the checkpoint of step {path_step}, but --step {step} was given")
    run_dir = os.path.dirname(os.path.dirname(path))
    if _config_kind(run_dir) != "run":
        raise ExportError(f"{path}: looks like a checkpoint step directory, but {run_dir} has no "
                          "training run config.json (with a 'task')")
    return _checkpoint_source(run_dir, path_step)


def resolve_source(path: str | os.PathLike, step: int | None = None) -> Source:
    """Classifies ``path`` as a run directory, a checkpoint step directory or a HF directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: does not exist (expected a training run directory, "
                                "<run>/checkpoints/<step>, or a HF SDAR directory)")
    if not os.path.isdir(path):
        raise ExportError(f"{path}: is a file (expected a training run directory, "
                          "<run>/checkpoints/<step>, or a HF SDAR directory)")
    if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        return _step_dir_source(path, step)
    kind = _config_kind(path)
    if kind == "run":
        return _checkpoint_source(path, step)
    if kind == "hf":
        if step is not None:
            raise ExportError(f"{path}: is a HF model directory; --step applies to training runs")
        return Source(hf_dir=path)
    raise ExportError(f"{path}: not a training run directory (config.json with a 'task'), a "
                      "checkpoint step directory (<run>/checkpoints/<step>) or a HF SDAR "
                      "directory (config.json with a 'model_type')")


# --------------------------------------------------------------------- runs: model, tokenizer
def run_config(run_dir: str) -> ConfigDict:
    """The run's ``config.json`` (written by the trainer)."""
    return ConfigDict(_read_json(os.path.join(run_dir, "config.json")))


def run_model_config(run_dir: str, config: ConfigDict) -> SDARConfig:
    """The architecture the run trains: its export's, ``init_from``'s (a relative ``init_from``
    is taken relative to the current directory, as the trainer did), or built from the config
    exactly as the SFT trainer does (abstractly: nothing is allocated)."""
    export = run_export_dir(run_dir)
    if export != run_dir:
        return SDARConfig.from_pretrained(export)
    if config.get("init_from"):
        return SDARConfig.from_pretrained(resolve_model_dir(run_export_dir(config.init_from)))
    return run.build_model_config(config, run.build_tokenizer(config))


def run_tokenizer_dir(run_dir: str, config: ConfigDict) -> str:
    """The tokenizer the run used: its export's, its saved ``tokenizer/``, or the config's."""
    for local in (os.path.join(run_dir, "export"), os.path.join(run_dir, "tokenizer")):
        if os.path.isfile(os.path.join(local, TOKENIZER_CONFIG)):
            return local
    name = config.get("tokenizer") or config.get("init_from")
    if not name or name == run.BUILTIN_TOKENIZER:
        raise ExportError(f"{run_dir}: no tokenizer found (no export/ or tokenizer/ with "
                          f"{TOKENIZER_CONFIG}); pass --tokenizer DIR")
    return resolve_model_dir(run_export_dir(name))


def restore_run_model(run_dir: str, step: int, config: ConfigDict) -> SDARForCausalLM:
    """The model with the parameters of checkpoint ``step`` (host arrays, saved dtype)."""
    model_config = run_model_config(run_dir, config)
    param_dtype = resolve_dtype(config.train.param_dtype)
    graphdef, abstract = nnx.split(abstract_model(model_config, dtype=param_dtype), nnx.Param)
    directory = os.path.join(run_dir, "checkpoints")
    try:
        params = restore_params(directory, step, abstract)
    except ValueError as e:
        raise ExportError(f"{directory}/{step}: parameters do not match the run's architecture "
                          f"{model_config}: {e}") from e
    return nnx.merge(graphdef, params)


def source_tokenizer_dir(source: Source) -> str:
    """The tokenizer directory that goes with ``source``'s weights."""
    return source.hf_dir if source.hf_dir else run_tokenizer_dir(source.run_dir, run_config(source.run_dir))


def load_source_model(source: Source, dtype: str) -> tuple[SDARForCausalLM, SDARConfig]:
    """The model to export (a HF directory is read in the export dtype: no rounding twice)."""
    if source.hf_dir:
        return load_model(source.hf_dir, resolve_dtype(dtype))
    model = restore_run_model(source.run_dir, source.step, run_config(source.run_dir))
    return model, model.config


# ------------------------------------------------------------------------------ the output
def add_config_class(directory: str, dtype: str) -> None:
    """What LMDeploy needs beyond ``save_model``'s files: ``configuration_sdar.py`` and the
    ``auto_map`` (and ``dtype``, read by transformers 5 and LMDeploy) in ``config.json``."""
    file = os.path.join(directory, "config.json")
    hf = _read_json(file)
    hf.update(auto_map=dict(AUTO_MAP), dtype=dtype)
    write_json_atomic(file, hf)
    shutil.copyfile(configuration_sdar.__file__, os.path.join(directory, CONFIG_CLASS_FILE))


def _check_tokenizer_dir(path: str) -> None:
    if not os.path.isfile(os.path.join(path, TOKENIZER_CONFIG)):
        raise ExportError(f"{path}: no {TOKENIZER_CONFIG} (expected a tokenizer directory; "
                          "pass --tokenizer DIR)")


def export_for_serving(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                       dtype: str = "bfloat16", step: int | None = None,
                       tokenizer: str | os.PathLike | None = None, overwrite: bool = False) -> str:
    """Writes ``source`` (run, checkpoint step or HF directory) to ``out_dir`` as an LMDeploy
    model directory in ``dtype``; ``tokenizer`` overrides the source's tokenizer directory.
    Everything is checked before any weight is read. Returns ``out_dir`` (absolute)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    resolved = resolve_source(source, step)
    origin = os.path.realpath(resolved.run_dir or resolved.hf_dir)
    if os.path.commonpath([origin, os.path.realpath(out_dir)]) == os.path.realpath(out_dir):
        raise ExportError(f"--out {out_dir}: is or contains the source {origin}; replacing it would "
                          "delete what is being exported: choose a directory outside it")
    tokenizer_dir = os.fspath(tokenizer) if tokenizer is not None else source_tokenizer_dir(resolved)
    _check_tokenizer_dir(tokenizer_dir)
    model, model_config = load_source_model(resolved, dtype)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_model(model, model_config, tmp, tokenizer_dir=tokenizer_dir, dtype=dtype, overwrite=True)
        add_config_class(tmp, dtype)
        if resolved.run_dir:  # what the run trained on travels with its weights
            run.write_training_record(tmp, run_config(resolved.run_dir), resolved.run_dir)
    return out_dir


# ------------------------------------------------------------------------------ the CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torch_bridge.export",
        description="Export a training run / checkpoint / HF SDAR directory for LMDeploy serving.")
    parser.add_argument("--checkpoint", required=True,
                        help="training run directory, <run>/checkpoints/<step>, or HF SDAR directory")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="bfloat16",
                        help="weight dtype of the export (default: bfloat16)")
    parser.add_argument("--step", type=int, help="checkpoint step of a run (default: the latest)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command: ``error: …`` in one line and status 2 for anything the user can fix."""
    args = parse_args(argv)
    with one_line_errors(args.verbose or debugging([]),
                         errors=(ExportError, FileNotFoundError, FileExistsError)):
        out = export_for_serving(args.checkpoint, args.out, dtype=args.dtype, step=args.step,
                                 tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"exported {os.path.abspath(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
