"""One meaning for a model path in every command and in :func:`dirl_jax.load_model`: a training
run directory stands for its HF export (``<run>/export``), a directory with a ``config.json`` is a
HF model directory, and only a string shaped like a hub id (``org/name``) that names nothing local
is downloaded from the Hugging Face hub. Anything else is one :class:`ModelPathError` naming the
path and what was expected."""

from __future__ import annotations

import json
import os
import re

RUN_CONFIG_KEY = "task"  # a run directory's config.json names its task; a HF config never does
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelPathError(FileNotFoundError):
    """A model path that names no model: the message says what was found and what was expected."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a training run's ``config.json`` (written by the trainers)."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return False
    with open(file, encoding="utf-8") as f:
        try:
            return RUN_CONFIG_KEY in json.load(f)
        except json.JSONDecodeError:
            return False


def run_export_dir(path: str | os.PathLike) -> str:
    """A training run directory stands for its HF export (``<run>/export``); anything else is
    returned as is."""
    path = os.fspath(path)
    export = os.path.join(path, "export")
    return export if os.path.isfile(os.path.join(export, "config.json")) else path


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` whose ``org`` is not a local directory (``runs/sft_tny`` is a typo, not an id)."""
    return bool(_HUB_ID.fullmatch(path)) and not os.path.isdir(path.split("/")[0])


def resolve_model_dir(path: str | os.PathLike) -> str:
    """The local HF model directory ``path`` stands for (see the module docstring); a hub id is
    downloaded (config, weights, tokenizer) into the hub cache."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_run_dir(path):
            export = run_export_dir(path)
            if export == path:
                raise ModelPathError(
                    f"{path}: a training run without an export yet (the run writes {path}/export "
                    f"when it ends; `python -m torch_bridge.export --checkpoint {path} --out DIR` "
                    "exports its latest checkpoint)")
            return export
        return path
    if os.path.exists(path):
        raise ModelPathError(f"{path}: is a file, not a model directory (expected a HF model "
                             "directory, a training run directory or a hub id 'org/name')")
    if not looks_like_hub_id(path):
        raise ModelPathError(f"{path}: no such directory: not a model directory (expected a HF "
                             "model directory, a training run directory or a hub id 'org/name')")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.py"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line for each
        reason = " ".join(str(e).split())[:300]
        raise ModelPathError(f"{path}: no such local directory, and the Hugging Face hub cannot "
                             f"provide it ({type(e).__name__}: {reason})") from e
