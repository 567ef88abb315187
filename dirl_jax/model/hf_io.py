"""Hugging Face checkpoint import/export for SDAR models (safetensors, no torch).

Parameter names are the HF names verbatim (the NNX module tree mirrors the HF one). Loading
streams one tensor at a time from the safetensors files into its final place (and, given a mesh,
straight into its target sharding: each device reads only its own slice). Exports are written to
a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dirl_jax.model.config import SDARConfig
from dirl_jax.model.paths import resolve_model_dir
from dirl_jax.model.sdar import SDARForCausalLM
from dirl_jax.sharding import DEFAULT_RULES, named_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_FILE_DTYPES = ("BF16", "F16", "F32")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
    "generation_config.json",  # the tokenizer directory's, when it has one, replaces ours
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model (names, shapes or dtypes)."""


def resolve_dtype(dtype: Any) -> Any:
    """``"bfloat16"`` / ``jnp.bfloat16`` / None (platform default: bf16 on TPU/GPU, fp32 on CPU)."""
    if dtype is None:
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


def hf_name(path: Sequence[Any]) -> str:
    """The HF parameter name of an NNX state path, e.g. ``model.layers.0.mlp.up_proj.weight``."""
    return ".".join(str(p) for p in path)


def abstract_model(config: SDARConfig, *, dtype: Any = None, param_dtype: Any = None,
                   remat: bool = False) -> SDARForCausalLM:
    """The model with ``jax.ShapeDtypeStruct`` leaves: nothing is allocated."""
    dtype = resolve_dtype(dtype)
    param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else dtype
    return nnx.eval_shape(lambda: SDARForCausalLM(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat))


def parameter_shapes(model: SDARForCausalLM) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter of a (concrete or abstract) model."""
    return {hf_name(path): tuple(var.shape)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------------------- loading
def weights_signature(model_dir: str) -> str:
    """A digest of the names, sizes and modification times of ``model_dir``'s weight files:
    it changes when the weights at that path are replaced (without reading them)."""
    entries = sorted((name, stat.st_size, stat.st_mtime_ns) for name in os.listdir(model_dir)
                     if name.endswith(".safetensors") or name == INDEX_FILE
                     for stat in [os.stat(os.path.join(model_dir, name))])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _open_safetensors(file: str) -> Iterator[Any]:
    """``safe_open`` whose failures (a truncated or corrupt file) name the file."""
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


def _weight_map(model_dir: str) -> dict[str, str]:
    """HF name -> safetensors file path."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: malformed index, expected a 'weight_map' ({e!r})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to files, got a "
                                  f"{type(weight_map).__name__}")
        files = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")
        return files
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _file_entries(files: dict[str, str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """HF name -> (file, shape, safetensors dtype), read from the file headers only."""
    entries = {}
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name}: the index points to {file}, which lacks it")
                tensor_slice = f.get_slice(name)
                entries[name] = (file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return entries


def check_checkpoint(entries: dict[str, tuple[str, tuple[int, ...], str]],
                     expected: dict[str, tuple[int, ...]]) -> None:
    """Raises a CheckpointError naming every missing, unexpected, mis-shaped or mis-typed tensor."""
    problems = []
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name in sorted(set(expected) & set(entries)):
        file, shape, dtype = entries[name]
        if shape != expected[name]:
            problems.append(f"tensor {name} in {file}: shape {shape}, expected {expected[name]}")
        if dtype not in SUPPORTED_FILE_DTYPES:
            problems.append(f"tensor {name} in {file}: unsupported dtype {dtype}, "
                            f"expected one of {', '.join(SUPPORTED_FILE_DTYPES)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))


def load_model(path: str | os.PathLike, dtype: Any = None, *, param_dtype: Any = None,
               mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
               remat: bool = False, **config_overrides: Any) -> tuple[SDARForCausalLM, SDARConfig]:
    """Loads a HF SDAR/Qwen3 checkpoint (local directory or hub id) into an SDAR model.

    ``dtype`` is the compute dtype (None: bf16 on accelerators, fp32 on CPU), ``param_dtype``
    the storage dtype (default: ``dtype``). With a ``mesh``, every tensor is placed directly into
    its sharding under ``rules``. ``config_overrides`` (e.g. ``mask_token_id=151669``) take
    precedence over ``config.json``.
    """
    model_dir = resolve_model_dir(path)
    config = SDARConfig.from_pretrained(model_dir, **config_overrides)
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    entries = _file_entries(_weight_map(model_dir))
    check_checkpoint(entries, {hf_name(p): tuple(v.shape) for p, v in flat})

    shardings = dict(nnx.to_flat_state(named_shardings(params, mesh, rules))) if mesh else {}
    by_file: dict[str, list[tuple[Any, Any]]] = {}
    for path_, var in flat:
        by_file.setdefault(entries[hf_name(path_)][0], []).append((path_, var))
    loaded = []
    for file, items in by_file.items():
        with _open_safetensors(file) as f:
            for path_, var in items:
                tensor = f.get_slice(hf_name(path_))
                target = np.dtype(var.dtype)
                if mesh is None:
                    value = jnp.asarray(tensor[...].astype(target))
                else:
                    value = jax.make_array_from_callback(
                        tuple(var.shape), shardings[path_].get_value(),
                        lambda index, t=tensor, d=target: t[index].astype(d))
                loaded.append((path_, var.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(loaded), rest)
    return model, config


# ------------------------------------------------------------------------------- saving
def to_host(x: jax.Array) -> np.ndarray:
    """``x`` as a host numpy array; a multi-host array is gathered (every process must call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """``(name, bytes)`` pairs split in order into groups of at most ``max_shard_bytes`` each (a
    single tensor larger than that gets a group of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


EXPORT_MARKER = ".dirl_export"  # in every model directory save_model / the export write


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[str]:
    """Yields a temporary directory beside ``out_dir`` that becomes ``out_dir`` on success, its
    files world-readable (0644, like the directory) and marked as written here
    (:data:`EXPORT_MARKER`). ``overwrite`` replaces only a directory that carries that marker: a
    previous export, never a folder of other files."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
        if not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER)):
            raise FileExistsError(f"{out_dir}: exists and is not a model directory written by dirl-jax "
                                  f"(no {EXPORT_MARKER}); refusing to replace it: move it away or "
                                  "choose another output directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from a server run as another user
    try:
        with open(os.path.join(tmp, EXPORT_MARKER), "w", encoding="utf-8") as f:
            f.write("written by dirl-jax: `overwrite` may replace this directory\n")
        yield tmp
        for name in os.listdir(tmp):  # safetensors writes 0600, copies keep read-only modes
            if os.path.isfile(os.path.join(tmp, name)):
                os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "replaced"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _generation_config(config: SDARConfig) -> dict[str, Any]:
    return {k: v for k, v in (("bos_token_id", config.bos_token_id),
                              ("eos_token_id", config.eos_token_id),
                              ("pad_token_id", config.pad_token_id)) if v is not None}


def save_model(model: SDARForCausalLM, config: SDARConfig | None, out_dir: str | os.PathLike,
               tokenizer_dir: str | os.PathLike | None = None, *, dtype: str = "bfloat16",
               max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> str:
    """Writes ``model`` as a HF SDAR directory: safetensors (sharded with an index when larger
    than ``max_shard_bytes``), ``config.json``, ``generation_config.json`` and, given
    ``tokenizer_dir``, its tokenizer files. Peak host memory is one shard. Returns ``out_dir``.

    Multi-host: every process must call it (sharded arrays are gathered); process 0 writes.
    """
    config = model.config if config is None else config
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    params = {hf_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tokenizer_files = []
    if tokenizer_dir is not None:
        tokenizer_files = [os.path.join(tokenizer_dir, f) for f in TOKENIZER_FILES
                           if os.path.isfile(os.path.join(tokenizer_dir, f))]
        if not any(f.endswith("tokenizer_config.json") for f in tokenizer_files):
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer_config.json (not a tokenizer directory)")
    sizes = [(name, int(np.prod(v.shape)) * np_dtype.itemsize) for name, v in params.items()]
    shards = plan_shards(sizes, max_shard_bytes)
    writer = jax.process_index() == 0
    with (atomic_directory(out_dir, overwrite=overwrite) if writer
          else contextlib.nullcontext(None)) as tmp:
        weight_map = {}
        for i, names in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: to_host(params[name]).astype(np_dtype) for name in names}
            if writer:
                save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            del tensors
        if not writer:
            return os.fspath(out_dir)
        if len(shards) > 1:
            _write_json(os.path.join(tmp, INDEX_FILE), {
                "metadata": {"total_size": sum(size for _, size in sizes)},
                "weight_map": weight_map})
        _write_json(os.path.join(tmp, "config.json"), config.to_hf_dict(torch_dtype=dtype))
        _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(config))
        for file in tokenizer_files:
            shutil.copy2(file, tmp)
    return os.fspath(out_dir)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
